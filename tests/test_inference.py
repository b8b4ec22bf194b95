"""The notebook inference API: Segmenter.set_support / predict / predict_volume, segment()."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from megaseg import Segmenter, create_model, save_checkpoint, segment
from megaseg.inference import Prediction, flip_tta, merge_labels
from megaseg.outputs import RECORD
from megaseg.preprocess import prepare_image, to_grayscale

RES = 32
TINY = {"encoder_widths": (8, 8, 8, 8)}


def _disk(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return ((yy - cy) ** 2 + (xx - cx) ** 2 <= r**2).astype(np.uint8)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("universeg_v1", **TINY)


@pytest.fixture
def seg(model):
    return Segmenter(model, resolution=RES, device="cpu")


@pytest.fixture
def support():
    """Four examples of different sizes: a noisy image and a disk label each."""
    rng = np.random.default_rng(0)
    sizes = [(40, 50), (32, 32), (64, 20), (25, 45)]
    labels = [_disk(h, w, h / 2, w / 2, min(h, w) / 4) for h, w in sizes]
    images = [lab * 100.0 + rng.normal(0, 10, lab.shape) for lab in labels]
    return images, labels


@pytest.fixture
def query():
    return np.random.default_rng(1).random((37, 53)) * 300 - 50


# ---------------------------------------------------------------------- shapes and input forms


def test_query_of_any_size_comes_back_at_its_size(seg, support, query):
    pred = seg.set_support(*support).predict(query)
    assert isinstance(pred, Prediction)
    assert pred.probs.shape == (37, 53) and pred.probs.dtype == np.float32
    assert pred.mask.dtype == bool
    np.testing.assert_array_equal(pred.mask, pred.probs > 0.5)
    assert pred.labels == (1,) and pred.label_probs.shape == (1, 37, 53)


def test_pad_and_unpad_put_content_back_in_place(seg, support, monkeypatch):
    # Make the network the identity on the prepared query: the result must then be the
    # (normalized) query itself, in the same place, at its original size.
    seg.set_support(*support)
    monkeypatch.setattr(seg, "predict_prepared", lambda q, *a, **k: q[None].clone())
    image = np.zeros((24, 64))
    image[4:12, 40:56] = 1.0  # off-centre block in a wide (padded) image
    probs = seg.predict(image).probs
    assert probs.shape == image.shape
    ys, xs = np.nonzero(probs > 0.5)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (4, 11, 40, 55)


def test_rgb_query_equals_its_grayscale(seg, support, query):
    rgb = np.stack([query, query * 0.5, query * 0.2], axis=-1)
    seg.set_support(*support)
    a = seg.predict(rgb).probs
    b = seg.predict(to_grayscale(rgb)).probs
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_rgb_support_equals_its_grayscale(seg, support, query):
    images, labels = support
    rgb = [np.repeat(x[..., None], 3, axis=-1) for x in images]
    a = seg.set_support(rgb, labels).predict(query).probs
    b = seg.set_support(images, labels).predict(query).probs
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_stacked_support_equals_list_and_torch_equals_numpy(seg, query):
    rng = np.random.default_rng(2)
    labels = np.stack([_disk(30, 30, 15, 15, r) for r in (5, 8, 11)])
    images = labels * 1.0 + rng.random(labels.shape)
    a = seg.set_support(list(images), list(labels)).predict(query).probs
    b = seg.set_support(images, labels).predict(query).probs
    c = (
        seg.set_support(torch.from_numpy(images), torch.from_numpy(labels))
        .predict(torch.from_numpy(query))
        .probs
    )
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, c, atol=1e-6)


def test_batch_of_queries_gives_a_list_in_order(seg, support, query):
    seg.set_support(*support)
    other = np.random.default_rng(3).random((20, 11))
    preds = seg.predict([query, other])
    assert [p.probs.shape for p in preds] == [(37, 53), (20, 11)]
    np.testing.assert_allclose(preds[1].probs, seg.predict(other).probs, atol=1e-6)


# ---------------------------------------------------------------------- multi-label


def test_multi_label_gives_one_task_per_value(seg, support, query):
    images, labels = support
    multi = [lab * 3 + _disk(*lab.shape, 2, 2, 3) * 7 * (1 - lab) for lab in labels]
    pred = seg.set_support(images, multi).predict(query)
    assert pred.labels == (3, 7)
    assert pred.label_probs.shape == (2, 37, 53)
    assert set(np.unique(pred.label_map)) <= {0, 3, 7}
    np.testing.assert_array_equal(pred.probs, pred.label_probs.max(axis=0))


def test_multi_label_merge_rule(seg, support, monkeypatch):
    images, labels = support
    multi = [lab * 2 + _disk(*lab.shape, 2, 2, 3) * 5 * (1 - lab) for lab in labels]
    seg.set_support(images, multi)
    # Per-label probabilities (label 2 first, then 5) of 4 pixels of a 32x32 query:
    # both low -> 0; 5 wins; 2 wins; a tie above 0.5 goes to the first label.
    p2 = np.full((RES, RES), 0.1, np.float32)
    p5 = np.full((RES, RES), 0.2, np.float32)
    p2[0, :4], p5[0, :4] = [0.4, 0.6, 0.9, 0.7], [0.5, 0.8, 0.55, 0.7]
    stub = torch.from_numpy(np.stack([p2, p5]))[:, None, None]  # (K, B, 1, R, R)
    monkeypatch.setattr(seg, "predict_prepared", lambda q, *a, **k: stub)
    pred = seg.predict(np.zeros((RES, RES)))
    np.testing.assert_array_equal(pred.label_map[0, :4], [0, 5, 2, 2])
    assert not pred.label_map[1:].any()
    np.testing.assert_array_equal(pred.mask[0, :4], [False, True, True, True])
    assert pred.label_map.dtype == np.uint8


def test_merge_labels_keeps_values_beyond_uint8():
    probs = np.array([[[0.9, 0.2]], [[0.1, 0.7]]], np.float32)  # (K=2, 1, 2)
    out = merge_labels(probs, (1, 1000))
    assert out.dtype == np.int16
    np.testing.assert_array_equal(out, [[1, 1000]])


def test_soft_labels_are_one_task(seg, support, query):
    images, labels = support
    soft = [lab * 0.8 + 0.1 for lab in labels]
    assert seg.set_support(images, soft).labels == (1,)


# ---------------------------------------------------------------------- ensembles, chunks, cache


def test_ensemble_is_repeatable_with_a_seed_and_differs_across_seeds(seg, support, query):
    seg.set_support(*support)
    a = seg.predict(query, ensemble=3, support_size=2, seed=1).probs
    b = seg.predict(query, ensemble=3, support_size=2, seed=1).probs
    c = seg.predict(query, ensemble=3, support_size=2, seed=2).probs
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_prediction_does_not_depend_on_the_support_order(seg, support, query):
    full = seg.set_support(*support).predict(query).probs
    images, labels = support
    reverse = seg.set_support(images[::-1], labels[::-1]).predict(query).probs
    np.testing.assert_allclose(reverse, full, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "distinct"),
    [
        ({"ensemble": 4, "support_size": 4}, 1),  # four copies of the whole support
        ({"ensemble": 4}, 1),  # the same rule without support_size
        ({"ensemble": 5, "support_size": 3}, 4),  # C(4, 3) = 4 < 5
    ],
)
def test_ensemble_of_repeated_subsets_is_refused(seg, support, query, kwargs, distinct):
    seg.set_support(*support)
    with pytest.raises(ValueError, match=rf"has {distinct} distinct subset\(s\)") as err:
        seg.predict(query, **kwargs)
    assert f"ensemble={kwargs['ensemble']} needs" in str(err.value)
    assert str(err.value).startswith("support_size: ")


def test_ensemble_members_are_distinct_subsets(seg, support):
    seg.set_support(*support)
    # C(4, 3) = 4 subsets for 4 members: random draws would repeat one with probability
    # 1 - 4!/4**4 = 0.91; every member must be a different subset.
    subsets = seg._draw_subsets(4, 3, seed=0)
    assert len({tuple(sorted(s.tolist())) for s in subsets}) == 4


def test_chunked_prediction_equals_one_batch(model, support):
    queries = list(np.random.default_rng(4).random((5, 30, 30)))
    one = Segmenter(model, RES, "cpu", max_batch=100).set_support(*support).predict(queries)
    chunked = Segmenter(model, RES, "cpu", max_batch=2).set_support(*support).predict(queries)
    for a, b in zip(one, chunked, strict=True):
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-6)


def test_batch_size_follows_the_memory_budget(model):
    # per query: 6 units x S=4 x C=8 x 32 x 32 x 4 bytes = 786,432 bytes = 0.75 MB
    assert Segmenter(model, RES, "cpu", memory_budget_mb=3).batch_size(4) == 4
    assert Segmenter(model, RES, "cpu", memory_budget_mb=0.1).batch_size(4) == 1
    assert Segmenter(model, RES, "cpu", max_batch=7, memory_budget_mb=0.1).batch_size(4) == 7


def test_cpu_batches_keep_the_widest_tensor_within_a_heap_block():
    # v1 (C=64) at R=128: (B, S, 128, 128, 128) float32 is B x S x 8 MiB; the block is 32 MiB
    v1 = create_model("universeg_v1")
    seg = Segmenter(v1, 128, "cpu")
    assert [seg.batch_size(s) for s in (1, 2, 3, 4, 64)] == [4, 2, 1, 1, 1]
    assert Segmenter(v1, 128, "cpu", max_batch=16).batch_size(2) == 16  # asked for: as is
    # the memory budget binds first: 6 units x S=1 x 64 x 128 x 128 x 4 B = 24 MiB per query
    assert Segmenter(v1, 128, "cpu", memory_budget_mb=50).batch_size(1) == 2


def test_cached_support_term_equals_no_cache_and_the_network(model, support, query):
    cached = Segmenter(model, RES, "cpu").set_support(*support)
    assert cached._support.term is not None
    plain = Segmenter(model, RES, "cpu", cache_support_term=False).set_support(*support)
    assert plain._support.term is None
    np.testing.assert_allclose(cached.predict(query).probs, plain.predict(query).probs, atol=1e-6)
    # and both match the published (naive) forward on the same prepared tensors
    q = prepare_image(query, RES)[0][None]
    sup = cached._support
    with torch.no_grad():
        ref = torch.sigmoid(model(q, sup.images[None], sup.labels[0][None], fast=False))
    torch.testing.assert_close(cached.predict_prepared(q)[0], ref, atol=1e-5, rtol=0)


def test_device_defaults_to_cuda_when_available(model):
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert Segmenter(model, RES).device.type == expected


# ---------------------------------------------------------------------- 3D


def test_volume_along_each_axis_keeps_the_shape(seg, support):
    seg.set_support(*support)
    volume = np.random.default_rng(5).random((6, 20, 24)) * 1000
    for axis in (0, 1, 2):
        out, probs = seg.predict_volume(volume, axis=axis, return_probs=True)
        assert out.shape == volume.shape and out.dtype == np.uint8
        assert probs.shape == (1, *volume.shape)
        np.testing.assert_array_equal(out, probs[0] > 0.5)


def test_volume_slices_in_chunks_equal_slice_by_slice(model, support):
    volume = np.random.default_rng(6).random((5, 20, 24))
    big = Segmenter(model, RES, "cpu", max_batch=64).set_support(*support)
    one = Segmenter(model, RES, "cpu", max_batch=1).set_support(*support)
    _, a = big.predict_volume(volume, axis=0, return_probs=True)
    _, b = one.predict_volume(volume, axis=0, return_probs=True)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_nifti_round_trip_keeps_affine_and_header(seg, support, tmp_path):
    images, labels = support
    multi = [lab * 2 + _disk(*lab.shape, 2, 2, 3) * 4 * (1 - lab) for lab in labels]
    seg.set_support(images, multi, modality="CT")
    affine = np.array(
        [[0.0, -0.8, 0.0, 12.5], [0.7, 0.0, 0.0, -30.0], [0.0, 0.0, 2.5, 4.0], [0, 0, 0, 1]]
    )
    volume = np.random.default_rng(7).integers(-1000, 1500, (20, 24, 5)).astype(np.int16)
    src = nib.Nifti1Image(volume, affine)
    src.header.set_zooms((0.7, 0.8, 2.5))
    src.header["descrip"] = b"megaseg test"
    nib.save(src, tmp_path / "ct.nii.gz")

    out = seg.predict_volume(tmp_path / "ct.nii.gz", axis=2, out_path=tmp_path / "seg.nii.gz")
    assert out.shape == volume.shape and set(np.unique(out)) <= {0, 2, 4}
    back = nib.load(tmp_path / "seg.nii.gz")
    np.testing.assert_allclose(back.affine, affine, atol=1e-6)
    assert back.header.get_data_dtype() == np.uint8
    assert back.header["descrip"] == b"megaseg test"
    np.testing.assert_array_equal(np.asarray(back.dataobj), out)


# ---------------------------------------------------------------------- bad input

_ok = np.ones((8, 8))
_lab = np.eye(8, dtype=np.uint8)


@pytest.mark.parametrize(
    ("images", "labels", "match"),
    [
        ([], [], r"support_images: the support set is empty"),
        ([_ok, _ok], [_lab], r"support_labels: 1 label maps for 2 support_images"),
        ([_ok, np.ones((8, 9))], [_lab, _lab], r"support_labels\[1\]: shape \(8, 8\) differs"),
        ([_ok, np.full((8, 8), np.nan)], [_lab, _lab], r"support_images\[1\]: contains NaN"),
        ([_ok, np.full((8, 8), np.inf)], [_lab, _lab], r"support_images\[1\]: contains NaN or inf"),
        ([_ok, _ok, _ok], [_lab, _lab * 0, _lab], r"support_labels\[1\]: no foreground"),
        (np.ones((2, 2, 8, 8, 1)), [_lab, _lab], r"support_images: expected a list"),
        (_ok, _lab, r"support_images: expected a list of 2D images or a stacked array"),
        ([np.ones((5, 8, 8))], [_lab], r"support_images\[0\]: cannot read"),
        ([_ok], [np.ones((2, 8, 8))], r"support_labels\[0\]: expected a 2D label map"),
        ([_ok], [_lab * 2.5], r"support_labels\[0\]: soft \(non-integer\) labels"),
    ],
)
def test_bad_support_is_refused_with_the_argument_named(seg, images, labels, match):
    with pytest.raises(ValueError, match=match):
        seg.set_support(images, labels)


@pytest.mark.parametrize(
    ("query", "match"),
    [
        (np.ones((5, 8, 8)), r"query: shape \(5, 8, 8\) is a 3D volume but the support set is 2D"),
        (np.ones((2, 2, 8, 8, 1)), r"query: expected a 2D image"),
        (np.ones(8), r"query: expected a 2D image"),
        (np.full((8, 8), np.nan), r"query: contains NaN"),
        ([_ok, np.full((8, 8), np.inf)], r"query\[1\]: contains NaN or inf"),
        ([], r"query: the list of queries is empty"),
    ],
)
def test_bad_query_is_refused_with_the_argument_named(seg, query, match):
    seg.set_support([_ok], [_lab])
    with pytest.raises(ValueError, match=match):
        seg.predict(query)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"ensemble": 2, "support_size": 3},
            r"support_size: 3 is not between 1 and .* \(2 examples\)",
        ),
        ({"ensemble": 2}, r"support_size: ensemble=2 needs 2 .* 1 distinct subset"),
        ({"ensemble": 0, "support_size": 1}, r"ensemble: must be >= 1"),
    ],
)
def test_bad_ensemble_is_refused(seg, kwargs, match):
    seg.set_support([_ok, _ok], [_lab, _lab])
    with pytest.raises(ValueError, match=match):
        seg.predict(_ok, **kwargs)


def test_bad_volume_is_refused(seg):
    seg.set_support([_ok], [_lab])
    with pytest.raises(ValueError, match=r"volume: expected a 3D volume.*use predict\(\)"):
        seg.predict_volume(_ok)
    with pytest.raises(ValueError, match=r"volume: .*NaN"):
        seg.predict_volume(np.full((2, 8, 8), np.nan))
    with pytest.raises(ValueError, match=r"axis: must be 0, 1 or 2"):
        seg.predict_volume(np.ones((2, 8, 8)), axis=3)


def test_predict_before_set_support_says_what_to_do(seg):
    with pytest.raises(RuntimeError, match=r"set_support"):
        seg.predict(_ok)


def test_resolution_must_fit_the_network_depth(model):
    with pytest.raises(ValueError, match=r"resolution: 30 must be a positive multiple of 8"):
        Segmenter(model, resolution=30, device="cpu")


# ---------------------------------------------------------------------- checkpoints, segment()


def _card(**extra):
    return {"model": {"name": "universeg_v1", "kwargs": TINY}, **extra}


def test_from_checkpoint_safetensors_gives_identical_logits(model, support, query, tmp_path):
    path = save_checkpoint(tmp_path / "tiny.safetensors", model, _card(resolution=RES))
    loaded = Segmenter.from_checkpoint(path, device="cpu")
    assert loaded.resolution == RES and loaded.card["resolution"] == RES
    model = Segmenter(model, RES, "cpu").model  # the same memory layout (channels-last on CPU)
    q = torch.rand(2, 1, RES, RES)
    s, y = torch.rand(1, 3, 1, RES, RES), (torch.rand(1, 3, 1, RES, RES) > 0.5).float()
    with torch.no_grad():
        assert torch.equal(loaded.model(q, s, y), model(q, s, y))


def test_a_network_in_the_cpu_layout_saves_and_loads(model, tmp_path):
    net = Segmenter(model, RES, "cpu").model  # channels-last weights: not contiguous
    assert not net.dec_blocks[0].cross.cross_conv.weight.is_contiguous()
    path = save_checkpoint(tmp_path / "cl.safetensors", net, _card(resolution=RES))
    loaded = Segmenter.from_checkpoint(path, device="cpu").model
    for (name, a), b in zip(net.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_from_checkpoint_reads_resolution_from_the_card_tolerantly(model, tmp_path):
    a = save_checkpoint(tmp_path / "a.safetensors", model, _card(preprocessing={"size": 64}))
    b = save_checkpoint(tmp_path / "b.safetensors", model, _card())
    assert Segmenter.from_checkpoint(a, "cpu").resolution == 64
    assert Segmenter.from_checkpoint(b, "cpu").resolution == 128
    assert Segmenter.from_checkpoint(b, "cpu", resolution=RES).resolution == RES


def test_from_checkpoint_accepts_a_raw_state_dict(model, tmp_path):
    torch.save(model.state_dict(), tmp_path / "raw.pt")
    (tmp_path / "raw.json").write_text(
        '{"model": {"name": "universeg_v1", "kwargs": {"encoder_widths": [8, 8, 8, 8]}}}'
    )
    loaded = Segmenter.from_checkpoint(tmp_path / "raw.pt", "cpu", resolution=RES)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v)


class _Payload:
    """Any custom class: unpickling it could run code, so it must be refused."""


def test_from_checkpoint_refuses_a_pickled_object(tmp_path):
    torch.save({"weights": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"refused, the file holds pickled objects") as e:
        Segmenter.from_checkpoint(tmp_path / "evil.pt", "cpu")
    # one plain line naming the refused class: no terminal colour codes from torch's message
    assert "\x1b" not in str(e.value) and "\n" not in str(e.value)
    assert "Unsupported global" in str(e.value) and "_Payload" in str(e.value)


def test_from_checkpoint_by_name_reports_no_shipped_weights_and_points_to_the_official():
    with pytest.raises(ValueError, match=r"ships no pretrained weights for 'universeg_v1'") as e:
        Segmenter.from_checkpoint("universeg_v1", "cpu")
    assert "from_pretrained('universeg-v1-official', accept_license=True)" in str(e.value)
    assert "from_checkpoint('megaseg_generalist')" in str(e.value)


def test_the_shipped_default_loads_by_its_name_and_by_its_architecture_name():
    by_name = Segmenter.from_checkpoint("megaseg_generalist", "cpu")
    by_model = Segmenter.from_checkpoint("universeg_v1_small", "cpu")
    assert by_name.weights_path == by_model.weights_path
    assert by_name.weights_path.name == "megaseg_generalist.safetensors"
    older = Segmenter.from_checkpoint("megaseg_small_synth64", "cpu")
    assert older.weights_path.name == "megaseg_small_synth64.safetensors"
    with pytest.raises(FileNotFoundError, match=r"not the name of shipped weights \(megaseg_gen"):
        Segmenter.from_checkpoint("megaseg_generalis", "cpu")


def test_from_checkpoint_unknown_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no such checkpoint file"):
        Segmenter.from_checkpoint(tmp_path / "missing.safetensors", "cpu")


def test_segment_in_one_call_equals_the_segmenter(model, support, query):
    expected = Segmenter(model, RES, "cpu").set_support(*support).predict(query).probs
    got = segment(query, *support, model=model, resolution=RES, device="cpu").probs
    np.testing.assert_allclose(got, expected, atol=1e-6)


# ---------------------------------------------------------------------- ambiguous layouts


@pytest.mark.parametrize("channels", [3, 4])
def test_channels_first_query_is_refused_as_ambiguous(seg, support, query, channels):
    seg.set_support(*support)
    stack = np.stack([query] * channels)  # (3|4, H, W): RGB(A) or 3-4 slices of a volume?
    with pytest.raises(ValueError, match=rf"query: shape \({channels}, 37, 53\) is ambiguous") as e:
        seg.predict(stack)
    assert "(H,W,3)" in str(e.value) and "single 2D slice" in str(e.value)
    # Channels-last is the image readers' layout: read as RGB(A) without a word.
    assert seg.predict(np.moveaxis(stack, 0, -1)).probs.shape == query.shape


def test_channels_first_support_image_is_refused_but_a_stack_of_them_is_nchw(seg, support, query):
    images, labels = support
    with pytest.raises(ValueError, match=r"support_images\[0\]: shape \(3, 40, 50\) is ambiguous"):
        seg.set_support([np.stack([images[0]] * 3)] + images[1:], labels)
    same = [np.full((30, 30), 40.0) * (1 + lab) for lab in [_disk(30, 30, 15, 15, 8)] * 2]
    masks = [_disk(30, 30, 15, 15, 8)] * 2
    gray = seg.set_support(same, masks).predict(query).probs
    nchw = np.stack([np.stack([x] * 3) for x in same])  # (S, 3, H, W): the S axis is explicit
    np.testing.assert_allclose(seg.set_support(nchw, masks).predict(query).probs, gray, atol=1e-5)


def test_resolution_is_bounded(model):
    with pytest.raises(ValueError, match=r"resolution: 1048576 is above the largest supported"):
        Segmenter(model, resolution=2**20, device="cpu")


# ---------------------------------------------------------------------- output next to the input


@pytest.fixture
def scan(tmp_path):
    volume = np.random.default_rng(8).integers(0, 1000, (20, 24, 3)).astype(np.int16)
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    return path


@pytest.mark.parametrize("how", ["same", "relative", "symlink", "hardlink", "image"])
def test_out_path_equal_to_the_input_is_refused_and_the_input_survives(
    seg, support, scan, how, monkeypatch
):
    seg.set_support(*support)
    before = scan.read_bytes()
    volume, out = scan, scan
    if how == "relative":
        monkeypatch.chdir(scan.parent)
        out = "./" + scan.name
    elif how == "symlink":
        out = scan.parent / "link.nii.gz"
        out.symlink_to(scan)
    elif how == "hardlink":
        out = scan.parent / "hard.nii.gz"
        out.hardlink_to(scan)
    elif how == "image":
        volume = nib.load(scan)
    with pytest.raises(ValueError, match=r"out_path: .* is the input volume .*overwrite_input"):
        seg.predict_volume(volume, out_path=out)
    assert scan.read_bytes() == before
    assert sorted(p.name for p in scan.parent.iterdir() if p.name.startswith(".")) == []


def test_overwrite_input_replaces_it_atomically(seg, support, scan):
    seg.set_support(*support)
    image = nib.load(scan)  # its data is read lazily from the file being replaced
    labels = seg.predict_volume(image, out_path=scan, overwrite_input=True)
    np.testing.assert_array_equal(np.asarray(nib.load(scan).dataobj), labels)
    # no temporary left; the record of what megaseg wrote (megaseg.outputs) is expected
    assert [p.name for p in scan.parent.iterdir() if p.name != RECORD] == ["scan.nii.gz"]


def test_failed_write_leaves_the_previous_output_untouched(seg, support, scan, monkeypatch):
    seg.set_support(*support)
    out = scan.parent / "seg.nii.gz"
    out.write_bytes(b"previous result")

    def broken_save(img, filename):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):  # a file megaseg did not write: overwrite=True
        seg.predict_volume(scan, out_path=out, overwrite=True)
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in scan.parent.iterdir()) == ["scan.nii.gz", "seg.nii.gz"]


# ---------------------------------------------------------------------- flip test-time augmentation


class _Ramp(nn.Module):
    """A known function of the query and the support that is NOT flip-equivariant (a ramp
    over the pixel position is added): ``6 q - 3 + ramp(y, x) + 3 mean_i(label_i)``."""

    def forward(self, query, support_images, support_labels, support_term=None):
        H, W = query.shape[-2:]
        ramp = torch.linspace(-2, 2, W) + 0.5 * torch.linspace(-1, 1, H)[:, None]
        return 6 * query - 3 + ramp + 3 * support_labels.mean(1)


class _Corner(nn.Module):
    """Ignores the query: logit +10 everywhere if the support's label is set at the top-left
    pixel, else -10. Flipping only the query (not the support) would leave it at +10."""

    def forward(self, query, support_images, support_labels, support_term=None):
        corner = support_labels[:, :, 0, 0, 0].mean(1)  # (Bs,)
        return (20 * corner - 10)[:, None, None, None].expand(query.shape[0], 1, *query.shape[-2:])


def _views(x: torch.Tensor) -> list[torch.Tensor]:
    """Identity, horizontal, vertical and both flips of ``(..., H, W)``, written out by hand."""
    return [x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2)]


def test_flips_average_the_four_predictions_flipped_back(support, query):
    stub = _Ramp()
    seg = Segmenter(stub, RES, "cpu").set_support(*support)
    q = prepare_image(query, RES)[0][None]  # (1, 1, R, R)
    images, labels = seg._support.images[None], seg._support.labels[0][None]
    plain = torch.sigmoid(stub(q, images, labels))
    # flips=False: the network's own output, untouched
    assert torch.equal(seg.predict_prepared(q, flips=False)[0], plain)
    outs = [
        torch.sigmoid(stub(fq, fi, fl))
        for fq, fi, fl in zip(_views(q), _views(images), _views(labels), strict=True)
    ]
    by_hand = [_views(out)[i] for i, out in enumerate(outs)]  # each flip is its own inverse
    got = seg.predict_prepared(q, flips=True)[0]
    torch.testing.assert_close(got, torch.stack(by_hand).mean(0), atol=1e-6, rtol=0)
    assert (got - plain).abs().max() > 0.05  # the ramp is not flip-equivariant: views differ
    # flip_tta, which evaluate() wraps around any method, is the same average
    generic = flip_tta(
        lambda fq, fi, fl: torch.sigmoid(stub(fq, fi[None], fl[None])), q, images[0], labels[0]
    )
    torch.testing.assert_close(generic, got, atol=1e-6, rtol=0)


def test_flips_flip_the_support_with_the_query(seg):
    # Support: square images labelled in their top-left quadrant only. Of the 4 flipped tasks
    # only the identity has a label at the top-left pixel: mean (s(10) + 3 s(-10)) / 4 ~ 0.25.
    corner = Segmenter(_Corner(), RES, "cpu")
    label = np.zeros((RES, RES), np.uint8)
    label[: RES // 2, : RES // 2] = 1
    rng = np.random.default_rng(8)
    corner.set_support([label + rng.random(label.shape) for _ in range(2)], [label, label])
    query = rng.random((RES, RES))
    assert corner.predict(query).probs.min() > 0.999
    np.testing.assert_allclose(corner.predict(query, flips=True).probs, 0.25, atol=1e-3)
    # the same through predict_volume (each slice flipped in-plane)
    _, probs = corner.predict_volume(rng.random((3, RES, RES)), 0, flips=True, return_probs=True)
    np.testing.assert_allclose(probs, 0.25, atol=1e-3)


def test_flipped_task_gives_the_flipped_prediction(seg):
    # A real (random) network: with flips the prediction is equivariant, flip in -> flip out.
    rng = np.random.default_rng(7)
    labels = [_disk(RES, RES, cy, cx, 6) for cy, cx in ((10, 12), (20, 9), (14, 22))]
    images = [lab + rng.random((RES, RES)) * 0.5 for lab in labels]
    q = rng.random((RES, RES))
    a = seg.set_support(images, labels).predict(q, flips=True).probs
    for flip in (np.fliplr, np.flipud, lambda x: np.flipud(np.fliplr(x))):
        seg.set_support([flip(x) for x in images], [flip(y) for y in labels])
        np.testing.assert_allclose(flip(seg.predict(flip(q), flips=True).probs), a, atol=1e-5)
    # ...which the network alone is not (else the check above would show nothing)
    plain = seg.set_support(images, labels).predict(q).probs
    seg.set_support([np.fliplr(x) for x in images], [np.fliplr(y) for y in labels])
    assert np.abs(np.fliplr(seg.predict(np.fliplr(q)).probs) - plain).max() > 1e-3


def test_flips_with_chunks_and_the_cached_term_equal_a_plain_run(model, support):
    # The cached support term is the unflipped support's: flipped views must not reuse it.
    queries = list(np.random.default_rng(9).random((5, 30, 30)))
    plain = Segmenter(model, RES, "cpu", max_batch=100, cache_support_term=False)
    chunked = Segmenter(model, RES, "cpu", max_batch=2)
    a = plain.set_support(*support).predict(queries, flips=True)
    b = chunked.set_support(*support).predict(queries, flips=True)
    assert chunked._support.term is not None
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x.probs, y.probs, atol=1e-5)


def test_flips_combine_with_an_ensemble(model, support, query):
    seg = Segmenter(model, RES, "cpu").set_support(*support)
    ens = seg.predict(query, ensemble=2, support_size=3, seed=5, flips=True).probs
    images, labels = support
    members = []
    for idx in seg._draw_subsets(2, 3, seed=5):
        one = Segmenter(model, RES, "cpu")
        one.set_support([images[i] for i in idx.tolist()], [labels[i] for i in idx.tolist()])
        members.append(one.predict(query, flips=True).probs)
    np.testing.assert_allclose(ens, np.mean(members, axis=0), atol=1e-6)
    got = segment(query, *support, model=seg, ensemble=2, support_size=3, seed=5, flips=True)
    np.testing.assert_allclose(got.probs, ens, atol=1e-6)


# ---------------------------------------------------------------------- CT without a modality


def _hu_support():
    """Two CT-like slices in Hounsfield units: air -1000 around a body at 40 HU, a 300 HU disk."""
    labels = [_disk(40, 40, 20, 20, 6), _disk(40, 40, 18, 22, 5)]
    images = []
    for lab in labels:
        img = np.full((40, 40), -1000.0)
        img[5:35, 5:35] = 40.0
        images.append(img + lab * 260.0)
    return images, labels


def test_hu_like_support_is_windowed_as_ct_with_a_warning(seg):
    images, labels = _hu_support()
    with pytest.warns(UserWarning, match=r"support_images: intensities -1000 to 300 look like CT"):
        seg.set_support(images, labels)
    assert seg._support.modality == "CT"
    guessed = seg.predict(images[0]).probs
    seg.set_support(images, labels, modality="CT")  # said: no warning, the same windowing
    np.testing.assert_allclose(seg.predict(images[0]).probs, guessed, atol=1e-6)
    seg.set_support(images, labels, modality="other")  # min-max, when asked for
    assert seg._support.modality == "other"


def test_hu_like_volume_of_a_min_max_support_is_warned_about(seg, support):
    seg.set_support(*support)  # not HU: min-max
    volume = np.full((24, 24, 3), -1000.0)
    with pytest.warns(UserWarning, match=r"volume: intensities down to -1000 look like CT"):
        seg.predict_volume(volume)


def test_volume_session_windows_a_hu_like_volume_as_ct_with_a_warning(seg):
    import warnings

    from megaseg.annotate import VolumeSession

    volume = np.stack(_hu_support()[0], axis=2)  # (40, 40, 2)
    with pytest.warns(UserWarning, match=r"volume: intensities -1000 to 300 look like CT"):
        session = VolumeSession(seg, volume, axis=2, progress=False)
    assert session.modality == "CT"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert VolumeSession(seg, volume, modality="CT", progress=False).modality == "CT"
        assert VolumeSession(seg, volume, window=(-100, 200), progress=False).modality is None
        assert VolumeSession(seg, volume * 0 + 5, progress=False).modality is None
