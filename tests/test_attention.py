"""Cross-attention interaction: support-order invariance, gradients, v1 unchanged, cost model."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megaseg import create_model
from megaseg.models import UniverSeg
from megaseg.models.attention import AttnCrossBlock, interaction_plan, network_cost, total_cost
from megaseg.models.blocks import CrossBlock

TINY = dict(encoder_widths=(8, 8, 8, 8))
ATTN_VARIANTS = ("universeg_attn_hybrid", "universeg_attn_full")
V1_KEYS = {
    f"{part}.{i}.{sub}.{w}"
    for part, n in (("enc_blocks", 4), ("dec_blocks", 3))
    for i in range(n)
    for sub in ("cross.cross_conv", "target.vmapped.conv", "support.vmapped.conv")
    for w in ("weight", "bias")
} | {"out_conv.conv.weight", "out_conv.conv.bias"}


def tiny(name: str, dtype=torch.float64, seed: int = 0, **kwargs) -> UniverSeg:
    torch.manual_seed(seed)
    return create_model(name, **{**TINY, **kwargs}).to(dtype)


def episode(B: int, S: int, size: int = 32, Bs: int | None = None, dtype=torch.float64, seed=0):
    """``query (B,1,size,size)``, ``support images/labels (Bs,S,1,size,size)``."""
    g = torch.Generator().manual_seed(seed)
    Bs = B if Bs is None else Bs
    q = torch.rand(B, 1, size, size, generator=g, dtype=dtype)
    si = torch.rand(Bs, S, 1, size, size, generator=g, dtype=dtype)
    sl = (torch.rand(Bs, S, 1, size, size, generator=g) > 0.5).to(dtype)
    return q, si, sl


# -- behaviour -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ATTN_VARIANTS)
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "naive"])
@pytest.mark.parametrize("Bs", [1, 2], ids=["shared-support", "per-query-support"])
def test_logits_do_not_depend_on_support_order(name, fast, Bs):
    model = tiny(name)
    q, si, sl = episode(2, 5, Bs=Bs)
    perm = torch.tensor([3, 0, 4, 2, 1])
    with torch.no_grad():
        out = model(q, si, sl, fast=fast)
        shuffled = model(q, si[:, perm], sl[:, perm], fast=fast)
    assert (out - shuffled).abs().max().item() <= 1e-10
    # ... while the support does matter: another support set gives other logits
    with torch.no_grad():
        other = model(q, si.flip(-1), sl.flip(-1), fast=fast)
    assert (out - other).abs().max().item() > 1e-3


@pytest.mark.parametrize("name", ATTN_VARIANTS)
def test_gradients_reach_every_parameter(name):
    model = tiny(name, dtype=torch.float32)
    q, si, sl = episode(2, 3, dtype=torch.float32)
    model(q, si, sl).square().mean().backward()
    last = len(model.dec_blocks) - 1
    # v1's known dead end: the last decoder block's support branch feeds nothing.
    unused = {f"dec_blocks.{last}.support.vmapped.conv.{w}" for w in ("weight", "bias")}
    for n, p in model.named_parameters():
        if n in unused:
            assert p.grad is None, n
        else:
            assert p.grad is not None and p.grad.abs().max() > 0, n
            assert torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize("name", ATTN_VARIANTS)
@pytest.mark.parametrize("S", [1, 2, 7])
def test_shapes_and_fast_equals_naive(name, S):
    model = tiny(name)
    for Bs in (1, 3):
        q, si, sl = episode(3, S, Bs=Bs)
        with torch.no_grad():
            out = model(q, si, sl)
            assert out.shape == (3, 1, 32, 32)
            assert (out - model(q, si, sl, fast=False)).abs().max().item() <= 1e-10
    # A shared support set (Bs=1, folded into one key set) equals the same set per query.
    q, si, sl = episode(3, S, Bs=1)
    with torch.no_grad():
        shared = model(q, si, sl)
        expanded = model(q, *(x.expand(3, -1, -1, -1, -1) for x in (si, sl)))
    assert (shared - expanded).abs().max().item() <= 1e-10


def test_cached_support_term_works_with_attention_in_the_first_block():
    model = tiny("universeg_attn_full")
    q, si, sl = episode(2, 4, Bs=1)
    term = model.support_term(si, sl)
    with torch.no_grad():
        diff = model(q, si, sl, support_term=term) - model(q, si, sl)
    assert diff.abs().max().item() <= 1e-12


def test_zero_attention_readout_is_exactly_v1():
    # The attention block is v1's block plus W_a * attention: with W_a = 0 and v1's weights
    # it computes v1's logits.
    v1 = tiny("universeg_v1")
    attn = tiny("universeg_attn_full", seed=1)
    missing, unexpected = attn.load_state_dict(v1.state_dict(), strict=False)
    assert not unexpected and all(".attn." in k for k in missing)
    for m in attn.modules():
        if isinstance(m, AttnCrossBlock):
            torch.nn.init.zeros_(m.attn.out.weight)
    q, si, sl = episode(2, 3)
    with torch.no_grad():
        assert (attn(q, si, sl) - v1(q, si, sl)).abs().max().item() <= 1e-12


def variant_losses(seed: int = 0, perturb: float = 0.0, perturb_seed: int = 0, fast: bool = True):
    """Mean training loss of the first and last 5 of 40 steps of the hybrid attention variant;
    ``perturb``: init moved as by ``learning.perturb_`` (``benchmarks/learning_margins.py``)."""
    from learning import perturb_

    # Task: the label is the image thresholded at a level that differs per episode, so it
    # can only be read from the support.
    torch.manual_seed(seed)
    model = create_model("universeg_attn_hybrid", encoder_widths=(16, 16, 16, 16), fast=fast)
    if perturb:
        perturb_(model, perturb, perturb_seed)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)

    def batch(B=4, S=4, size=32):
        smooth = torch.nn.functional.avg_pool2d(
            torch.rand(B * (S + 1), 1, size, size, generator=g), 5, 1, 2
        )
        smooth = (smooth - smooth.amin((2, 3), True)) / smooth.amax((2, 3), True)
        level = torch.rand(B, 1, 1, 1, 1, generator=g) * 0.4 + 0.3
        images = smooth.view(B, S + 1, 1, size, size)
        labels = (images > level).float()
        return images[:, 0], labels[:, 0], images[:, 1:], labels[:, 1:]

    losses = []
    for _ in range(40):
        q, ql, si, sl = batch()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(q, si, sl), ql)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    return {"first": first, "last": last, "ratio": last / first}


def test_a_variant_trains_a_few_steps():
    """Margin, from ``benchmarks/learning_margins.py attention``: last/first loss 0.433-0.446
    (bound 0.7) over 4 init perturbations of 1e-6 std, 2 threads, AVX2 kernels and the
    published forward path; other seeds: 0.16 and 0.38."""
    r = variant_losses()
    assert r["ratio"] < 0.7, r


# -- construction --------------------------------------------------------------------------


def test_all_conv_interactions_are_v1():
    torch.manual_seed(0)
    pluggable = UniverSeg(
        interactions=("conv",) * 4, decoder_interactions=("conv",) * 3, attn_pool=(8, 4, 2, 1)
    )
    torch.manual_seed(0)
    v1 = create_model("universeg_v1")
    assert sum(p.numel() for p in pluggable.parameters()) == 1_182_785
    assert set(pluggable.state_dict()) == V1_KEYS
    assert all(type(b) is CrossBlock for b in [*pluggable.enc_blocks, *pluggable.dec_blocks])
    assert all(torch.equal(v, v1.state_dict()[k]) for k, v in pluggable.state_dict().items())
    q, si, sl = episode(1, 2, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(pluggable(q, si, sl), v1(q, si, sl))


@pytest.mark.parametrize("name", ATTN_VARIANTS)
def test_attention_variants_keep_v1_names_and_add_attn(name):
    state, v1 = create_model(name).state_dict(), create_model("universeg_v1").state_dict()
    assert set(v1) <= set(state)
    assert all(state[k].shape == v1[k].shape for k in v1)
    assert all(".attn." in k for k in set(state) - set(v1))


def test_registered_plans():
    hybrid, full = create_model("universeg_attn_hybrid"), create_model("universeg_attn_full")

    def plan(model):
        return [
            ("attn", b.attn.pool) if isinstance(b, AttnCrossBlock) else ("conv", None)
            for b in [*model.enc_blocks, *model.dec_blocks]
        ]

    # encoder 128, 64, 32, 16 px; decoder 32, 64, 128 px (at 128x128 input)
    conv = ("conv", None)
    assert plan(hybrid) == [conv, conv, ("attn", 1), ("attn", 1), ("attn", 1), conv, conv]
    assert plan(full) == [("attn", 8), ("attn", 4), ("attn", 2), ("attn", 1),
                          ("attn", 2), ("attn", 4), ("attn", 8)]  # fmt: skip


def test_interaction_plan_mirrors_and_validates():
    enc, dec = interaction_plan(3, ["conv", "attn", "attn"], None, [1, 2, 1])
    assert enc == [("conv", 1), ("attn", 2), ("attn", 1)]
    assert dec == [("attn", 2), ("conv", 1)]
    _, dec = interaction_plan(3, None, ["conv", "attn"], 4)
    assert dec == [("conv", 4), ("attn", 4)]
    for bad in (
        lambda: interaction_plan(3, ["conv", "attn"], None, 1),
        lambda: interaction_plan(3, None, ["conv"], 1),
        lambda: interaction_plan(3, ["conv", "mlp", "attn"], None, 1),
        lambda: interaction_plan(3, None, None, [1, 0, 1]),
        lambda: UniverSeg(encoder_widths=(8, 8), interactions=("attn", "attn"), attn_heads=3),
    ):
        with pytest.raises(ValueError):
            bad()
    model = tiny("universeg_v1", interactions=("attn",) * 4, attn_pool=3)
    with pytest.raises(ValueError, match="does not divide"):
        model(*episode(1, 2))


# -- cost model ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["universeg_v1", *ATTN_VARIANTS])
@pytest.mark.parametrize("S", [1, 5])
def test_cost_model_counts_every_conv_and_projection(name, S):
    # FlopCounterMode counts convs and matmuls but not the fused attention kernel, which the
    # model counts separately (attn_macs).
    model = create_model(name, encoder_widths=(8, 12, 16, 16), decoder_widths=(12, 8, 8)).eval()
    q, si, sl = episode(1, S, dtype=torch.float32)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(q, si, sl)
    assert counter.get_total_flops() // 2 == total_cost(model, S, 32, 32)["conv_macs"]


def test_cost_model_at_128():
    v1 = total_cost(create_model("universeg_v1"), 64, 128, 128)
    assert v1["macs"] == pytest.approx(106.07e9, rel=1e-3)  # DESIGN.md: ~105 G on the fast path
    # the first block's support conv: its input, z, its output and the conv's reorder copy
    assert v1["peak_elements"] == (3 + 2 / 64) * 64 * 64 * 128 * 128
    hybrid = network_cost(create_model("universeg_attn_hybrid"), 64, 128, 128)
    n32, n16 = 32 * 32, 16 * 16
    attn = {c.name: c.attn_macs for c in hybrid if c.kind == "attn"}
    assert attn == {"enc2": 2 * n32 * 64 * n32 * 64, "enc3": 2 * n16 * 64 * n16 * 64,
                    "dec0": 2 * n32 * 64 * n32 * 64}  # fmt: skip


@pytest.mark.parametrize("name", ["universeg_v1", *ATTN_VARIANTS])
def test_memory_model_matches_the_allocator(name):
    from torch.profiler import ProfilerActivity, profile

    model = create_model(name, encoder_widths=(16, 16, 16, 16)).eval()
    S = 16
    q, si, sl = episode(1, S, size=64, dtype=torch.float32)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.inference_mode():
            model(q, si, sl)
    live = peak = 0
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    predicted = total_cost(model, S, 64, 64)["peak_elements"] * 4
    assert 0.9 <= peak / predicted <= 1.15, (peak, predicted)


# -- through the training CLI ----------------------------------------------------------------


def test_cli_fits_an_attention_variant_and_segmenter_loads_the_export(tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    from megaseg import Segmenter
    from megaseg.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "attn_hybrid.yaml"
    root = tmp_path / "run"
    args = ["fit", "--config", str(config), "--trainer.default_root_dir", str(root)]
    args += ["--trainer.max_steps", "3", "--trainer.callbacks", "[]", "--trainer.logger", "false"]
    args += ["--model.model_kwargs.encoder_widths", "[8, 8, 8, 8]", "--data.resolution", "32"]
    args += ["--data.support_size", "[2, 3]", "--data.batch_size", "2"]
    monkeypatch.setattr(sys, "argv", ["megaseg"])  # pytest's own arguments are not the CLI's
    assert main(args) == 0
    weights = root / "export" / "final.safetensors"
    seg = Segmenter.from_checkpoint(weights)
    assert seg.card["model"]["name"] == "universeg_attn_hybrid"
    assert any(isinstance(b, AttnCrossBlock) for b in seg.model.enc_blocks)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 32, 32, generator=g).numpy()
    labels = (torch.rand(3, 32, 32, generator=g) > 0.5).numpy().astype("uint8")
    pred = seg.set_support(images, labels).predict(images[0])
    assert pred.probs.shape == (32, 32) and bool(torch.isfinite(torch.from_numpy(pred.probs)).all())
