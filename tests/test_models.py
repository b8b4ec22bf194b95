"""The network: v1 layout, the registry, and fast path == published (naive) path."""

from __future__ import annotations

import pytest
import torch

from megaseg import create_model, list_models
from megaseg.models import UniverSeg

V1_KEYS = (
    [
        f"enc_blocks.{i}.{part}"
        for i in range(4)
        for part in ("cross.cross_conv", "target.vmapped.conv", "support.vmapped.conv")
    ]
    + [
        f"dec_blocks.{i}.{part}"
        for i in range(3)
        for part in ("cross.cross_conv", "target.vmapped.conv", "support.vmapped.conv")
    ]
    + ["out_conv.conv"]
)


def test_v1_parameter_count():
    model = create_model("universeg_v1")
    assert sum(p.numel() for p in model.parameters()) == 1_182_785


def test_v1_state_dict_keys_and_cross_conv_shapes():
    state = create_model("universeg_v1").state_dict()
    expected = {f"{k}.{w}" for k in V1_KEYS for w in ("weight", "bias")}
    assert set(state) == expected
    assert state["enc_blocks.0.cross.cross_conv.weight"].shape == (64, 3, 3, 3)
    for i in (1, 2, 3):
        assert state[f"enc_blocks.{i}.cross.cross_conv.weight"].shape == (64, 128, 3, 3)
    for i in range(3):
        assert state[f"dec_blocks.{i}.cross.cross_conv.weight"].shape == (64, 256, 3, 3)
    assert state["out_conv.conv.weight"].shape == (1, 64, 1, 1)


def test_v1_loads_a_foreign_state_dict_strictly():
    # A file holding the public v1 layout (here: another instance's weights) loads with no renaming.
    source = create_model("universeg_v1").state_dict()
    target = create_model("universeg_v1")
    target.load_state_dict(source, strict=True)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in source.items())


def test_v1_has_no_norm_layers_and_zero_biases():
    model = create_model("universeg_v1")
    assert not any(
        isinstance(m, torch.nn.GroupNorm | torch.nn.BatchNorm2d) for m in model.modules()
    )
    assert all(torch.all(b == 0) for n, b in model.named_parameters() if n.endswith("bias"))
    slopes = {m.negative_slope for m in model.modules() if isinstance(m, torch.nn.LeakyReLU)}
    assert slopes == {0.01}


def test_output_shape_and_support_broadcast():
    model = create_model("universeg_v1", encoder_widths=(8, 8, 8, 8))
    q = torch.rand(3, 1, 32, 32)
    si, sl = torch.rand(1, 5, 1, 32, 32), torch.rand(1, 5, 1, 32, 32)
    shared = model(q, si, sl)
    assert shared.shape == (3, 1, 32, 32)
    expanded = model(q, si.expand(3, -1, -1, -1, -1), sl.expand(3, -1, -1, -1, -1))
    torch.testing.assert_close(shared, expanded)


def test_registry_lists_variants_and_rejects_unknown():
    assert {"universeg_v1", "universeg_v1_small", "universeg_v1_gn"} <= set(list_models())
    with pytest.raises(ValueError, match="unknown model"):
        create_model("no_such_model")


def test_every_shipped_tag_loads_and_the_default_is_the_cross_subject_generalist():
    """The weights in checkpoints/ load through the registry without pickle, and each card
    says how it was trained: the default with cross-subject brain-mask episodes, on a GPU."""
    import megaseg
    from megaseg.models.registry import _PRETRAINED, pretrained_path

    tags = _PRETRAINED["universeg_v1_small"]
    assert list(tags)[0] == "generalist" and {"cpu", "phase2", "synth64"} <= set(tags)
    models, cards = {}, {}
    for tag in tags:
        path = pretrained_path("universeg_v1_small", tag)
        models[tag], cards[tag] = megaseg.load_checkpoint(path)
        assert cards[tag]["model"]["kwargs"]["encoder_widths"] == [32, 32, 32, 32]
    for tag in ("generalist", "cpu"):
        data = cards[tag]["training"]["data"]
        assert data["cross_subject"] == 1.0
        assert ["PkgBrainHeads"] in [c["datasets"] for c in data["corpora"]]
    trainer = cards["generalist"]["config"]["trainer"]
    assert trainer["precision"] == "bf16-mixed" and trainer["max_time"]  # the GPU minutes
    assert cards["cpu"]["config"]["trainer"]["precision"] == "32-true"
    assert "cross_subject" not in cards["phase2"]["training"]["data"]  # the option came later
    default = create_model("universeg_v1_small", pretrained=True)
    shipped = models["generalist"].state_dict().values()
    for a, b in zip(default.state_dict().values(), shipped, strict=True):
        assert torch.equal(a, b)


def test_pretrained_without_shipped_weights_says_so():
    with pytest.raises(ValueError, match="ships no pretrained weights"):
        create_model("universeg_v1", pretrained=True)


@pytest.mark.parametrize(
    "bad",
    [
        lambda: (torch.rand(2, 32, 32), torch.rand(2, 3, 1, 32, 32), torch.rand(2, 3, 1, 32, 32)),
        lambda: (
            torch.rand(2, 1, 32, 32),
            torch.rand(2, 3, 1, 32, 32),
            torch.rand(2, 4, 1, 32, 32),
        ),
        lambda: (
            torch.rand(2, 1, 32, 32),
            torch.rand(3, 3, 1, 32, 32),
            torch.rand(3, 3, 1, 32, 32),
        ),
        lambda: (
            torch.rand(2, 1, 30, 30),
            torch.rand(2, 3, 1, 30, 30),
            torch.rand(2, 3, 1, 30, 30),
        ),
    ],
    ids=["query-3d", "label-count", "batch", "not-divisible"],
)
def test_bad_shapes_raise(bad):
    model = create_model("universeg_v1", encoder_widths=(8, 8, 8, 8))
    with pytest.raises(ValueError):
        model(*bad())


# -- fast == naive -------------------------------------------------------------------------

VARIANTS = {
    "v1": dict(encoder_widths=(64, 64, 64, 64)),
    "nonlinear_cross": dict(encoder_widths=(16, 16, 16, 16), cross_act="leaky_relu"),
    "groupnorm": dict(encoder_widths=(16, 16, 16, 16), norm_groups=4),
    "narrow": dict(encoder_widths=(8, 12, 16, 16), decoder_widths=(12, 8, 8)),
}


def _inputs(S: int, dtype: torch.dtype, size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(2, 1, size, size, generator=g, dtype=dtype)
    si = torch.rand(2, S, 1, size, size, generator=g, dtype=dtype)
    sl = (torch.rand(2, S, 1, size, size, generator=g) > 0.5).to(dtype)
    return q, si, sl


def _logits_and_grads(model: UniverSeg, inputs, fast: bool):
    q, si, sl = (x.clone().requires_grad_(True) for x in inputs)
    model.zero_grad()
    out = model(q, si, sl, fast=fast)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads, (q.grad, si.grad, sl.grad)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("S", [1, 3, 16])
# Logits: absolute tolerance. Gradients: relative to their largest entry. Float64 is where the
# two paths are shown equal (1e-10). In float32 the logits agree to 1e-4; the gradients agree to
# ~1e-6 of their scale except where a LeakyReLU input lies within rounding of zero: the two
# paths sum the convolutions in different orders, a pre-activation ~1e-7 from zero can take the
# other slope (1 vs 0.01) on one path, and that pixel's gradient changes by ~99%. Measured (v1,
# S=16, mean BCE loss): the float64 network's own input gradients move by 3% of their scale when
# its decoder-block inputs are rounded to float32 (a 6e-7 relative change), so no float32
# gradient bound tighter than these flips holds for two different summation orders. The flips
# seen over this grid stay below 5e-3 of the largest gradient entry.
@pytest.mark.parametrize(
    "dtype,tol,grad_tol",
    [(torch.float64, 1e-10, 1e-10), (torch.float32, 1e-4, 5e-3)],
    ids=["f64", "f32"],
)
def test_fast_path_equals_naive(variant, S, dtype, tol, grad_tol):
    torch.manual_seed(0)
    model = UniverSeg(**VARIANTS[variant]).to(dtype)
    if variant == "groupnorm":  # non-trivial affine norm parameters
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                torch.nn.init.normal_(m.weight, 1.0, 0.2)
                torch.nn.init.normal_(m.bias, 0.0, 0.2)
    inputs = _inputs(S, dtype, size=16 if variant == "v1" and S == 16 else 32)
    fast_out, fast_grads, fast_in = _logits_and_grads(model, inputs, fast=True)
    naive_out, naive_grads, naive_in = _logits_and_grads(model, inputs, fast=False)
    assert (fast_out - naive_out).abs().max().item() <= tol
    # The last decoder block's support branch gets no gradient on either path (unused output).
    assert set(fast_grads) == set(naive_grads)
    for name in naive_grads:
        scale = max(1.0, naive_grads[name].abs().max().item())
        assert (fast_grads[name] - naive_grads[name]).abs().max().item() <= grad_tol * scale, name
    for a, b in zip(fast_in, naive_in, strict=True):
        assert (a - b).abs().max().item() <= grad_tol * max(1.0, b.abs().max().item())


def test_mean_shortcut_used_only_where_exact():
    linear = UniverSeg(encoder_widths=(8, 8, 8, 8))
    assert linear.dec_blocks[-1].cross.is_linear
    assert (
        not UniverSeg(encoder_widths=(8, 8, 8, 8), cross_act="gelu").dec_blocks[-1].cross.is_linear
    )
    assert not UniverSeg(encoder_widths=(8, 8, 8, 8), norm_groups=4).dec_blocks[-1].cross.is_linear

    calls = []
    block = linear.dec_blocks[-1].cross
    original = block.fast_mean
    block.fast_mean = lambda *a, **k: calls.append(1) or original(*a, **k)
    q, si, sl = _inputs(3, torch.float32)
    linear(q, si, sl)
    assert calls == [1]


def test_cached_support_term_gives_same_logits():
    torch.manual_seed(0)
    model = UniverSeg(encoder_widths=(8, 8, 8, 8)).double()
    q, si, sl = _inputs(4, torch.float64)
    term = model.support_term(si, sl)
    torch.testing.assert_close(
        model(q, si, sl, support_term=term), model(q, si, sl), atol=1e-12, rtol=0
    )


@pytest.mark.parametrize("shape", [(3, 5, 8, 6), (2, 4, 16, 16), (1, 1, 7, 6)])
def test_inference_max_pool_equals_max_pool2d(shape):
    from megaseg.models.blocks import MaxPool2x2

    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    x[..., 0, 0] = float("nan")
    x[..., 2, 2] = float("-inf")
    want = torch.nn.functional.max_pool2d(x, 2)
    with torch.inference_mode():
        got = MaxPool2x2()(x)
    torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)
    x.requires_grad_(True)
    out = MaxPool2x2()(x)  # training: max_pool2d itself, one gradient entry per output
    torch.testing.assert_close(out, want, equal_nan=True, rtol=0, atol=0)
    out.nan_to_num().sum().backward()
    assert x.grad.count_nonzero() <= out.numel()


def test_support_mean_keeps_a_channels_last_layout():
    from megaseg.models.blocks import support_mean

    g = torch.Generator().manual_seed(0)
    nchw = torch.randn(6, 5, 7, 9, generator=g)  # (B*S, C, H, W)
    for x in (nchw, nchw.contiguous(memory_format=torch.channels_last)):
        got = support_mean(x.view(3, 2, 5, 7, 9))
        torch.testing.assert_close(got, x.view(3, 2, 5, 7, 9).mean(dim=1), rtol=0, atol=1e-6)
        assert got.is_contiguous(memory_format=torch.channels_last) == (x.stride(1) == 1)


@pytest.mark.parametrize("variant", ["v1", "groupnorm"])
def test_channels_last_model_gives_the_same_logits(variant):
    """The layout ``Segmenter`` gives a network on the CPU changes no result (float64: exact
    up to summation order)."""
    torch.manual_seed(0)
    model = UniverSeg(**VARIANTS[variant]).double().eval()
    inputs = _inputs(3, torch.float64)
    with torch.inference_mode():
        want = model(*inputs)
        got = model.to(memory_format=torch.channels_last)(*inputs)
    assert model.dec_blocks[0].cross.cross_conv.weight.stride(1) == 1  # it did change
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
