"""Held-out evaluation: draws, protocol checks, intervals, outputs, replay, overlap, corpus."""

from __future__ import annotations

import json
import os
import re
import warnings

import numpy as np
import pytest
import torch

from megaseg import Segmenter, create_model, save_checkpoint
from megaseg.data.synthetic import HELDOUT_SEED_OFFSET, SyntheticConfig
from megaseg.evaluation import (
    ArraySource,
    CorpusSource,
    Draw,
    DrawSet,
    OverlapError,
    ProtocolError,
    SyntheticSource,
    bootstrap_ci,
    check_draw,
    evaluate,
    folder_source,
    make_draws,
    stratified_bootstrap_ci,
)
from megaseg.evaluation.report import read_csv
from megaseg.evaluation.sources import sources_from_record

R = 32
TINY = {"encoder_widths": (8, 8, 8, 8)}
FAST = ("megaseg", "mean_label")


def disk_task(n_subjects: int, per_subject: int, seed: int, splits=None, empty: int = 0) -> dict:
    """Bright disks on noise; subjects split train/val/test 60/10/30 unless ``splits`` given.
    The first ``empty`` test examples get an empty label."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:R, :R]
    out = {"images": [], "labels": [], "subjects": [], "splits": []}
    for s in range(n_subjects):
        split = (
            splits[s]
            if splits
            else ("train", "val", "test")[(s >= 0.6 * n_subjects) + (s >= 0.7 * n_subjects)]
        )
        for _ in range(per_subject):
            cy, cx = rng.uniform(8, 24, 2)
            lab = ((yy - cy) ** 2 + (xx - cx) ** 2 <= rng.uniform(4, 8) ** 2).astype(np.float32)
            if split == "test" and empty > 0:
                lab[:], empty = 0.0, empty - 1
            out["images"].append(np.clip(0.2 + 0.6 * lab + rng.normal(0, 0.05, lab.shape), 0, 1))
            out["labels"].append(lab)
            out["subjects"].append(f"subject{s}")
            out["splits"].append(split)
    out["images"], out["labels"] = np.stack(out["images"]), np.stack(out["labels"])
    return out


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("universeg_v1", **TINY)


@pytest.fixture
def seg(model):
    return Segmenter(model, R, "cpu")


@pytest.fixture
def disks():
    return ArraySource(
        "Disks", {"a": disk_task(10, 2, 0), "b": disk_task(10, 2, 1), "c": disk_task(10, 1, 2)}
    )


@pytest.fixture
def single():
    return ArraySource("OneSubject", {"t": disk_task(1, 6, 3, splits=["train"])})


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ------------------------------------------------------------------------------ intervals


def test_bootstrap_ci_covers_the_true_mean_about_95_percent_of_the_time():
    # 400 simulated evaluations of 30 tasks with skewed per-task Dice, true mean 2/7.
    values = np.random.default_rng(0).beta(2, 5, size=(400, 30))
    _, lo, hi = bootstrap_ci(values, resamples=1000, seed=1)
    coverage = np.mean((lo <= 2 / 7) & (2 / 7 <= hi))
    assert 0.90 <= coverage <= 0.98, coverage


def test_bootstrap_is_seeded_and_the_stratified_form_reduces_to_it():
    v = np.random.default_rng(0).random(12)
    a, b = bootstrap_ci(v, seed=4), bootstrap_ci(v, seed=4)
    assert a == b and a[1] < v.mean() < a[2]
    assert stratified_bootstrap_ci([v], seed=[4]) == pytest.approx(tuple(float(x) for x in a))
    point, lo, hi = stratified_bootstrap_ci([v, v[:3] + 1])
    assert point == pytest.approx((v.mean() + (v[:3] + 1).mean()) / 2) and lo < point < hi
    assert bootstrap_ci(np.array([0.7]))[1:] == (0.7, 0.7)  # one task: zero width


# ------------------------------------------------------------------------------ draws


def test_draws_are_subject_disjoint_and_n_is_capped_with_one_plain_line(disks, caplog):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the cap is a log line, not a source-prefixed warning
        ds = make_draws([disks], R, support_sizes=(1, 4, 64), draws_per_n=3, ensemble=2)
    assert caplog.messages == [
        "Disks: N=64 capped to the support pool (6-12 examples) in 3 of 3 task(s)"
    ]
    tasks = {t.name: t for t in disks.tasks()}
    assert ds.tasks["Disks/a"]["support_pool"] == 12 and ds.tasks["Disks/a"]["capped"] == [64]
    for d in ds.draws:
        check_draw(d, tasks[d.task])
        t = tasks[d.task]
        query_subjects = {t.subjects[q] for q in d.queries}
        for s in d.support:
            assert not query_subjects & {t.subjects[i] for i in s}
            assert all(i.startswith("train:") for i in s) and len(set(s)) == len(s)
        assert all(q.startswith("test:") for q in d.queries)
        assert d.ensemble == 2 and d.support_size == min(d.N, len(t.support_pool))
    assert len(ds.draws) == 3 * 3 * 3  # tasks x N x r: one draw serves every query


def test_draws_are_deterministic_and_independent_of_other_datasets(disks, single):
    a = _quiet(make_draws, [disks], R, (1, 2), 2, seed=7)
    b = _quiet(make_draws, [single, disks], R, (1, 2), 2, seed=7)
    c = _quiet(make_draws, [disks], R, (1, 2), 2, seed=8)
    assert a.draws == [d for d in b.draws if d.dataset == "Disks"]
    assert a.draws != c.draws


def test_check_draw_rejects_broken_draws(disks):
    task = {t.name: t for t in disks.tasks()}["a"]
    good = _quiet(make_draws, [disks], R, (2,), 1).draws[0]
    check_draw(good, task)
    bad = [
        Draw("Disks", "a", 2, 0, 0, good.queries, (good.queries[:1] + good.support[0][:1],)),
        Draw("Disks", "a", 2, 0, 0, good.queries, (("train:0", "train:0"),)),
        Draw("Disks", "a", 2, 0, 0, ("train:0",), good.support),
        Draw("Disks", "a", 2, 0, 0, good.queries, (("train:99",),)),
        Draw("Disks", "a", 2, 0, 0, good.queries, good.support, within_subject=True),
    ]
    for d in bad:
        with pytest.raises(ProtocolError):
            check_draw(d, task)
    # a support example of a query's subject is refused even when it sits in the support pool
    q = good.queries[0]
    twin = next(i for i in task.query_pool if i != q and task.subjects[i] == task.subjects[q])
    leaky = type(task)("Disks", "a", (*task.support_pool, twin), (q,), task.subjects)
    with pytest.raises(ProtocolError, match="share subject"):
        check_draw(Draw("Disks", "a", 1, 0, 0, (q,), ((twin,),)), leaky)


def test_a_source_whose_splits_are_not_by_subject_is_refused_before_running():
    task = disk_task(4, 2, 0, splits=["train", "train", "test", "test"])
    task["splits"][5] = "train"  # subject2 now sits in both the train and the test split
    with pytest.raises(ProtocolError, match="share subject"):
        _quiet(make_draws, [ArraySource("Leaky", {"t": task})], R, (8,), 1)


def test_queries_with_empty_truth_are_excluded_and_counted():
    src = ArraySource("Holes", {"t": disk_task(10, 2, 0, empty=3)})
    ds = _quiet(make_draws, [src], R, (1,), 1)
    assert ds.tasks["Holes/t"]["excluded_empty"] == 3
    assert ds.tasks["Holes/t"]["queries"] == 6 - 3
    assert len(ds.draws[0].queries) == 3


def test_single_subject_dataset_is_evaluated_within_subject(single, seg):
    ds = _quiet(make_draws, [single], R, (2, 8), 2)
    task = single.tasks()[0]
    assert task.within_subject and ds.tasks["OneSubject/t"]["support_pool"] == 5
    assert len(ds.draws) == 2 * 2 * 6  # one draw per query
    for d in ds.draws:
        assert d.within_subject and d.queries[0] not in d.support[0]
        check_draw(d, task)
    res = _quiet(
        evaluate, seg, [single], support_sizes=(2,), draws_per_n=1, methods=FAST, progress=False
    )
    assert res.rows and all(r["within_subject"] for r in res.rows)
    assert all(s["within_subject"] for s in res.summary)
    assert "OneSubject†" in res.table and "within-subject" in res.report


# ------------------------------------------------------------------------------ end to end


def test_evaluate_writes_consistent_outputs(seg, disks, single, tmp_path):
    syn = SyntheticSource(2, config=SyntheticConfig(num_subjects=12))
    res = _quiet(
        evaluate, seg, [disks, single, syn], support_sizes=(1, 2), draws_per_n=2,
        methods=("megaseg", "mean_label", "supervised", "random_init"), supervised_steps=2,
        out_dir=tmp_path, progress=False,
    )  # fmt: skip
    for name in ("draws.json", "predictions.csv", "tasks.csv", "summary.csv", "summary.md",
                 "summary.json", "dice_vs_n_Disks.png", "dice_vs_n_OneSubject.png",
                 "dice_vs_n_synthetic.png", "dice_vs_n_mean.png", "cases_megaseg.png"):  # fmt: skip
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    rows = read_csv(tmp_path / "predictions.csv")
    draws = DrawSet.load(tmp_path / "draws.json")
    assert len(rows) == len(res.rows) == 4 * sum(len(d.queries) for d in draws.draws)
    assert {r["method"] for r in rows} == {"megaseg", "mean_label", "supervised", "random_init"}
    assert all(0 <= float(r["dice"]) <= 1 for r in rows)
    # every summary cell is the mean of its task means, inside its interval
    for s in res.summary:
        if s["scope"] == "dataset":
            ts = [
                t["dice"]
                for t in res.tasks
                if (t["method"], t["dataset"], t["N"]) == (s["method"], s["dataset"], s["N"])
            ]
            assert s["dice"] == pytest.approx(np.mean(ts)) and s["tasks"] == len(ts)
        assert s["ci_low"] - 1e-9 <= s["dice"] <= s["ci_high"] + 1e-9
    assert len(read_csv(tmp_path / "summary.csv")) == len(res.summary) == 4 * 2 * 4
    md = (tmp_path / "summary.md").read_text()
    for text in ("| Disks | megaseg |", "| **mean**", "N=1", "N=2", "supervised", "random_init"):
        assert text in md
    meta = json.loads((tmp_path / "summary.json").read_text())["meta"]
    assert meta["sources"][2]["seed_range"][0] == HELDOUT_SEED_OFFSET
    assert meta["timings"]["supervised"]["calls"] > 0


def test_replaying_draws_reproduces_the_dice(seg, disks, single, tmp_path):
    first = _quiet(evaluate, seg, [disks, single], support_sizes=(1, 4), draws_per_n=2, ensemble=2,
                   methods=FAST, out_dir=tmp_path / "a", seed=3, progress=False)  # fmt: skip
    again = _quiet(evaluate, seg, [disks, single], support_sizes=(2,), draws_per_n=1, seed=99,
                   methods=FAST, draws=tmp_path / "a" / "draws.json", progress=False)  # fmt: skip
    key = lambda r: (r["method"], r["dataset"], r["task"], r["query"], r["N"], r["r"])  # noqa: E731
    assert [key(r) for r in first.rows] == [key(r) for r in again.rows]
    np.testing.assert_allclose([r["dice"] for r in first.rows], [r["dice"] for r in again.rows])
    assert again.meta["replayed"] and again.draws.draws == first.draws.draws
    # another model on the same draws: same predictions asked, different answers
    torch.manual_seed(1)
    other = _quiet(evaluate, create_model("universeg_v1", **TINY), [disks, single], resolution=R,
                   methods=("megaseg",), draws=first.draws, progress=False)  # fmt: skip
    assert [key(r) for r in other.rows] == [key(r) for r in first.rows if r["method"] == "megaseg"]


def test_replay_refuses_other_data(seg, disks, tmp_path):
    res = _quiet(evaluate, seg, [disks], support_sizes=(1,), draws_per_n=1, methods=FAST,
                 out_dir=tmp_path, progress=False)  # fmt: skip
    changed = ArraySource(
        "Disks", {"a": disk_task(10, 2, 5), "b": disk_task(10, 2, 1), "c": disk_task(10, 1, 2)}
    )
    with pytest.raises(ValueError, match="differs from the data"):
        _quiet(
            evaluate, seg, [changed], methods=FAST, draws=tmp_path / "draws.json", progress=False
        )
    with pytest.raises(ValueError, match="not among the sources"):
        _quiet(evaluate, seg, [SyntheticSource(1)], methods=FAST, draws=res.draws, progress=False)


class _Counting(torch.nn.Module):
    """The tiny network, counting its forward passes (a plain module: no cached term)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, query, support_images, support_labels, **_):
        self.calls += 1
        return self.net(query, support_images, support_labels)


def test_flips_are_recorded_and_replayed_and_an_old_file_means_none(model, disks, tmp_path):
    counting = _Counting(model)
    seg = Segmenter(counting, R, "cpu")

    def run(**kwargs):
        counting.calls = 0
        res = _quiet(evaluate, seg, [disks], methods=FAST, progress=False, **kwargs)
        return res, counting.calls

    first, calls = run(support_sizes=(1, 2), draws_per_n=1, flips=True, out_dir=tmp_path / "a")
    assert calls == 4 * len(first.draws.draws)  # one support set per draw, 4 flipped views
    drawn = json.loads((tmp_path / "a" / "draws.json").read_text())
    assert drawn["settings"]["flips"] is True
    meta = json.loads((tmp_path / "a" / "summary.json").read_text())["meta"]
    assert meta["settings"]["flips"] is True and "flip TTA" in meta["timings"]["megaseg"]["detail"]
    assert "flip TTA: 4 flipped views" in (tmp_path / "a" / "summary.md").read_text()
    # replayed: flips as recorded, the same Dice
    again, calls = run(draws=tmp_path / "a" / "draws.json")
    assert calls == 4 * len(first.draws.draws) and again.draws.settings["flips"] is True
    assert [r["dice"] for r in again.rows] == [r["dice"] for r in first.rows]
    # overridden on the same draws (the paired ablation), and recorded as run
    plain, calls = run(draws=first.draws, flips=False, out_dir=tmp_path / "b")
    assert calls == len(first.draws.draws) and first.draws.settings["flips"] is True
    assert json.loads((tmp_path / "b" / "draws.json").read_text())["settings"]["flips"] is False
    assert [r["query"] for r in plain.rows] == [r["query"] for r in first.rows]
    # a draws file written before flips existed: no flips
    del drawn["settings"]["flips"]
    (tmp_path / "old.json").write_text(json.dumps(drawn))
    old, calls = run(draws=tmp_path / "old.json")
    assert calls == len(first.draws.draws) and old.meta["settings"]["flips"] is False
    assert "flip TTA" not in old.report
    drawn["settings"]["flips"] = "yes"
    (tmp_path / "bad.json").write_text(json.dumps(drawn))
    with pytest.raises(ValueError, match=r"bad.json: settings: 'flips' must be true or false"):
        run(draws=tmp_path / "bad.json")
    with pytest.raises(ValueError, match="applies to the 'megaseg' method"):
        _quiet(evaluate, seg, [disks], methods=("mean_label",), flips=True, progress=False)


def test_overlap_with_training_datasets_is_refused_unless_allowed(model, disks, tmp_path):
    ckpt = save_checkpoint(tmp_path / "m.safetensors", model, {
        "model": {"name": "universeg_v1", "kwargs": TINY}, "resolution": R,
        "training_datasets": ["disks", "Other"],
    })  # fmt: skip
    with pytest.raises(
        OverlapError, match="Disks: listed among the checkpoint's training datasets"
    ):
        evaluate(ckpt, [disks], support_sizes=(1,), draws_per_n=1, methods=FAST, progress=False)
    with pytest.warns(UserWarning, match="NOT HELD OUT"):
        res = evaluate(ckpt, [disks], support_sizes=(1,), draws_per_n=1, methods=FAST,
                       allow_overlap=True, out_dir=tmp_path / "out", progress=False)  # fmt: skip
    assert all(r["overlap"] for r in res.rows) and res.meta["overlap"]
    assert "Disks⚠" in res.table and "OVERLAP" in (tmp_path / "out" / "summary.md").read_text()
    # a card that trained on other data is fine, and so is held-out synthetic vs. trained synthetic
    card = {
        "training": {
            "data": {"corpora": [{"datasets": ["ACDC"]}], "synthetic": {"seed_range": [0, 1000]}}
        }
    }
    ok = save_checkpoint(
        tmp_path / "ok.safetensors",
        model,
        {**card, "model": {"name": "universeg_v1", "kwargs": TINY}, "resolution": R},
    )
    res = _quiet(evaluate, ok, [disks, SyntheticSource(1, config=SyntheticConfig(num_subjects=10))],
                 support_sizes=(1,), draws_per_n=1, methods=FAST, progress=False)  # fmt: skip
    assert res.meta["training_datasets"] == ["ACDC", "synthetic"] and not res.meta["overlap"]


def test_known_subject_overlaps_between_datasets_are_refused(model, disks):
    src = ArraySource("Task03_Liver", {"a": disk_task(10, 1, 0)})
    with pytest.raises(OverlapError, match="LiTS"):
        evaluate(
            model, [src], resolution=R, training_datasets=["LiTS"], methods=FAST, progress=False
        )


# ------------------------------------------------------------------------------ corpus and folders


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A corpus built by the real builder: a 2D folder (10 subjects), a 3D nnU-Net dataset
    (6 subjects, 2 channels, 2 labels) and the single-subject MNI152 template."""
    from fixtures_data import write_folder2d, write_mni_nnunet, write_nnunet

    from data_prep.pipeline import build_corpus, job_from_spec
    from data_prep.specs.adhoc import spec_from_path

    tmp = tmp_path_factory.mktemp("corpus")
    raw = [write_folder2d(tmp / "raw", n_cases=10), write_nnunet(tmp / "raw", n_cases=6)]
    try:
        raw.append(write_mni_nnunet(tmp / "raw"))
    except FileNotFoundError:
        pass  # nilearn not installed: the corpus has no single-subject dataset
    summary = build_corpus([job_from_spec(spec_from_path(p), p) for p in raw], tmp / "corpus",
                           resolutions=(R,), progress=False)  # fmt: skip
    assert summary.ok, summary.text()
    return tmp / "corpus"


def test_evaluate_on_a_corpus(seg, corpus, tmp_path):
    from megaseg.data.store import Corpus
    from megaseg.evaluation import corpus_sources

    c = Corpus(corpus)
    names = [d for d in c.datasets]
    sources = corpus_sources(c, [n.lower() for n in names])  # names match case-insensitively
    res = _quiet(evaluate, seg, sources, support_sizes=(1, 2, 64), draws_per_n=2, methods=FAST,
                 out_dir=tmp_path, progress=False)  # fmt: skip
    # subject-disjointness, checked independently against the store's own subject lists
    for d in res.draws.draws:
        key = sources[[s.dataset for s in sources].index(d.dataset)]._keys[d.task]

        def subject(i, key=key):
            split, idx = i.split(":")
            return c.subjects(key, split)[int(idx)]

        if d.within_subject:
            assert d.queries[0] not in d.support[0]
            assert {subject(i) for i in (*d.queries, *d.support[0])} == {subject(d.queries[0])}
        else:
            assert not {subject(q) for q in d.queries} & {subject(i) for s in d.support for i in s}
            assert all(i.startswith("train:") for s in d.support for i in s)
            assert all(q.startswith("test:") for q in d.queries)
    datasets = {r["dataset"] for r in res.rows}
    assert {"Skin2D", "Dataset001_Tiny"} <= datasets
    if "Dataset900_MNI152" in c.datasets:
        mni = [r for r in res.rows if r["dataset"] == "Dataset900_MNI152"]
        assert mni and all(r["within_subject"] for r in mni)
        assert not any(r["within_subject"] for r in res.rows if r["dataset"] != "Dataset900_MNI152")
        assert "Dataset900_MNI152†" in res.table
    assert res.meta["sources"][0]["kind"] == "corpus"
    replay = _quiet(
        evaluate, seg, sources, methods=FAST, draws=tmp_path / "draws.json", progress=False
    )
    np.testing.assert_allclose([r["dice"] for r in replay.rows], [r["dice"] for r in res.rows])


def test_corpus_source_reads_a_larger_stored_resolution(corpus):
    src = CorpusSource(corpus, "Skin2D")
    task = src.tasks()[0]
    with pytest.warns(UserWarning, match="resizing"):
        images, labels = src.load(task.name, task.support_pool[:2], 16)
    assert images.shape == labels.shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="rebuild the corpus"):
        src.load(task.name, task.support_pool[:1], 64)


def test_folder_source_matches_the_corpus_build(corpus, tmp_path):
    from fixtures_data import write_folder2d

    src = folder_source(write_folder2d(tmp_path, n_cases=10), resolution=R)
    stored = CorpusSource(corpus, "Skin2D")
    (a,), (b,) = src.tasks(), stored.tasks()
    assert (a.name, a.support_pool, a.query_pool) == (b.name, b.support_pool, b.query_pool)
    for x, y in zip(
        src.load(a.name, a.query_pool, R), stored.load(b.name, b.query_pool, R), strict=True
    ):
        torch.testing.assert_close(x, y)


def test_folder_source_adds_slices_per_plane_and_replays_them(tmp_path):
    from fixtures_data import write_mni_nnunet

    folder = write_mni_nnunet(tmp_path)
    plain = folder_source(folder, resolution=32)
    more = folder_source(folder, resolution=32, slices_per_plane=6)
    assert [t.name for t in plain.tasks()] == [t.name for t in more.tasks()]
    for a, b in zip(plain.tasks(), more.tasks(), strict=True):
        n_plain, n_more = (len({*t.support_pool, *t.query_pool}) for t in (a, b))
        # sagittal: the template is left-right symmetric; mirror-image extras are dropped
        low = 5 if "sagittal" in a.name else 8
        assert n_plain <= 2 and low <= n_more <= 8, (a.name, n_plain, n_more)
        # the corpus's own slices come first and are unchanged
        ids = sorted({*a.support_pool, *a.query_pool})
        for x, y in zip(plain.load(a.name, ids, 32), more.load(b.name, ids, 32), strict=True):
            torch.testing.assert_close(x, y)
        images = more.load(b.name, sorted({*b.support_pool, *b.query_pool}), 32)[0]
        assert len({hash(im.numpy().tobytes()) for im in images}) == len(images)  # all different
    with pytest.raises(ValueError, match="slices_per_plane must be >= 0, got -1"):
        folder_source(folder, resolution=32, slices_per_plane=-1)
    (record,) = [more.describe()]
    assert record["slices_per_plane"] == 6
    (again,) = sources_from_record([record], 32)
    assert again.describe() == record


# ------------------------------------------------------------------------------ command line


def test_cli_refuses_overlap_then_runs_and_replays(model, corpus, tmp_path, capsys, caplog):
    from megaseg.cli.evaluate import main

    ckpt = save_checkpoint(tmp_path / "m.safetensors", model, {
        "model": {"name": "universeg_v1", "kwargs": TINY}, "resolution": R,
        "training_datasets": ["Skin2D"],
    })  # fmt: skip
    base = ["--checkpoint", str(ckpt), "--support-sizes", "1", "2", "--draws-per-n", "1",
            "--methods", "megaseg", "mean_label", "--no-progress", "--bootstrap", "200"]  # fmt: skip
    args = [*base, "--corpus", str(corpus), "--datasets", "Skin2D", "Dataset001_Tiny"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    assert "trained on" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="NOT HELD OUT"):
        assert main([*args, "--out", str(tmp_path / "a"), "--allow-overlap"]) == 0
    assert "| Skin2D⚠ | megaseg |" in capsys.readouterr().out
    first = read_csv(tmp_path / "a" / "predictions.csv")
    # replay: the sources are re-opened from draws.json
    replay = [*base, "--draws", str(tmp_path / "a" / "draws.json"), "--out", str(tmp_path / "b"),
              "--allow-overlap", "--label", "again"]  # fmt: skip
    assert _quiet(main, replay) == 0
    again = read_csv(tmp_path / "b" / "predictions.csv")
    assert {r["method"] for r in again} == {"again", "mean_label"}
    assert [r["dice"] for r in again] == [r["dice"] for r in first]
    assert main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "c")]) == 2
    assert "nothing to evaluate on" in capsys.readouterr().err
    # a protocol file: names and shell patterns, case-insensitive; absent names are reported
    (tmp_path / "p.yaml").write_text("name: p\nheld_out: [dataset001_*, ACDC]\n")
    code = main([*base, "--corpus", str(corpus), "--protocol", str(tmp_path / "p.yaml"),
                 "--out", str(tmp_path / "d")])  # fmt: skip
    assert "held-out datasets not in the corpus: ACDC" in caplog.text
    assert code == 0 and {r["dataset"] for r in read_csv(tmp_path / "d" / "predictions.csv")} == {
        "Dataset001_Tiny"
    }


def test_cli_flips_are_recorded_replayed_and_overridden(model, corpus, tmp_path, capsys):
    from megaseg.cli.evaluate import main

    ckpt = save_checkpoint(tmp_path / "m.safetensors", model, {
        "model": {"name": "universeg_v1", "kwargs": TINY}, "resolution": R,
        "training_datasets": ["SomethingElse"],
    })  # fmt: skip
    base = ["--checkpoint", str(ckpt), "--methods", "megaseg", "--no-progress", "--bootstrap", "50"]
    data = ["--corpus", str(corpus), "--datasets", "Skin2D", "--support-sizes", "2",
            "--draws-per-n", "1"]  # fmt: skip

    def settings(name):
        return json.loads((tmp_path / name / "draws.json").read_text())["settings"]

    assert _quiet(main, [*base, *data, "--flips", "--out", str(tmp_path / "a")]) == 0
    assert settings("a")["flips"] is True
    replay = [*base, "--draws", str(tmp_path / "a" / "draws.json")]
    assert _quiet(main, [*replay, "--out", str(tmp_path / "b")]) == 0
    assert settings("b")["flips"] is True
    dice = [[r["dice"] for r in read_csv(tmp_path / x / "predictions.csv")] for x in "ab"]
    assert dice[0] == dice[1]
    assert _quiet(main, [*replay, "--no-flips", "--out", str(tmp_path / "c")]) == 0
    assert settings("c")["flips"] is False
    capsys.readouterr()
    code, err = _run_cli(
        [*base, *data, "--methods", "mean_label", "--flips", "--out", str(tmp_path / "d")], capsys
    )
    assert code == 2 and "flips: flip test-time augmentation applies to the 'megaseg'" in err


# ------------------------------------------------------------------------------ CLI refusals
# Each user error ends as one line on stderr and exit code 2, never a traceback.


@pytest.fixture(scope="module")
def first_run(corpus, tmp_path_factory):
    """One small evaluation on the corpus, run from the corpus's parent with a RELATIVE
    --corpus path: (arguments shared by replays, its out folder)."""
    import os

    from megaseg.cli.evaluate import main

    tmp = tmp_path_factory.mktemp("first_run")
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp / "m.safetensors", create_model("universeg_v1", **TINY),
                           {"model": {"name": "universeg_v1", "kwargs": TINY}, "resolution": R,
                            "training_datasets": ["SomethingElse"]})  # fmt: skip
    base = ["--checkpoint", str(ckpt), "--support-sizes", "1", "2", "--draws-per-n", "2",
            "--methods", "mean_label", "--no-progress", "--bootstrap", "50"]  # fmt: skip
    cwd = os.getcwd()
    os.chdir(corpus.parent)
    try:
        code = _quiet(main, [*base, "--corpus", corpus.name, "--datasets", "Skin2D",
                             "--out", str(tmp / "a")])  # fmt: skip
    finally:
        os.chdir(cwd)
    assert code == 0
    return base, tmp / "a"


def _run_cli(argv, capsys) -> tuple[int, str]:
    from megaseg.cli import main

    code = _quiet(main, ["evaluate", *argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def _edited_draws(first_run, tmp_path, edit) -> str:
    data = json.loads((first_run[1] / "draws.json").read_text())
    edit(data)
    path = tmp_path / "edited" / "draws.json"
    path.parent.mkdir()
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


def _set(path, value):
    """An edit of draws.json: ``path`` is a list of keys into the JSON."""

    def edit(data):
        for key in path[:-1]:
            data = data[key]
        data[path[-1]] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (_set(["draws", 0, "N"], 10**9), r"draws\[0\]: N=1000000000 is not one of the file's "
                                         r"support sizes \[1, 2\]"),
        (_set(["draws", 0, "N"], "1"), r"draws\[0\]: 'N' must be int, got '1'"),
        (_set(["draws", 0, "r"], 7), r"draws\[0\]: r=7, but the file has draws_per_n=2"),
        (_set(["draws", 0, "support"], [["train:999"]]),
         r"draws\[0\]: .*support ids not in the task's support pool: \['train:999'\]"),
        (_set(["draws", 0, "queries"], ["train:0"]),
         r"draws\[0\]: .*queries not in the task's query pool: \['train:0'\]"),
        (_set(["draws", 0, "task"], "no/such/task"),
         r"draws\[0\]: task 'no/such/task' is not in the source 'Skin2D'"),
        (_set(["draws", 0, "support"], [[]]), r"draws\[0\]: 'support' must be a non-empty list"),
        (_set(["draws", 0, "support"], [["train:0"], ["train:1"]]),
         r"draws\[0\]: 2 support set\(s\), but the file's ensemble is 1"),
        (_set(["settings", "draws_per_n"], None), r"'draws_per_n' must be int, got None"),
        (_set(["draws"], []), r"'draws' is empty"),
    ],
)  # fmt: skip
def test_cli_refuses_an_edited_draws_file_naming_it(first_run, tmp_path, capsys, edit, reason):
    base, _ = first_run
    draws = _edited_draws(first_run, tmp_path, edit)
    code, err = _run_cli([*base, "--draws", draws, "--out", str(tmp_path / "out")], capsys)
    assert code == 2
    assert err.startswith(f"megaseg evaluate: {draws}: "), err
    assert re.search(reason, err), err
    assert not (tmp_path / "out").exists()  # refused before anything was evaluated or written


def test_cli_refuses_a_support_size_that_is_not_min_of_n_and_pool(first_run, tmp_path, capsys):
    def shrink(data):
        d = next(d for d in data["draws"] if d["N"] == 2)
        d["support"] = [d["support"][0][:1]]

    base, _ = first_run
    draws = _edited_draws(first_run, tmp_path, shrink)
    code, err = _run_cli([*base, "--draws", draws, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "support sets of 1 examples, but N=2 on a pool of" in err


def test_cli_refuses_the_query_as_its_own_support(first_run, tmp_path, capsys):
    def leak(data):
        d = data["draws"][0]
        d["support"] = [[d["queries"][0]]]  # a test-split id: not a support candidate

    base, _ = first_run
    draws = _edited_draws(first_run, tmp_path, leak)
    code, err = _run_cli([*base, "--draws", draws, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "not in the task's support pool" in err and draws in err


def test_cli_refuses_unreadable_draws_and_protocol_files(first_run, corpus, tmp_path, capsys):
    base, _ = first_run
    bad = tmp_path / "draws.json"
    bad.write_text("{not json")
    code, err = _run_cli([*base, "--draws", str(bad)], capsys)
    assert code == 2 and f"{bad}: cannot read the draws file" in err
    protocol = tmp_path / "p.yaml"
    protocol.write_text("held_out: [WBC\nname: : x\n")
    code, err = _run_cli([*base, "--corpus", str(corpus), "--protocol", str(protocol)], capsys)
    assert code == 2 and f"{protocol}: not a readable protocol YAML" in err
    assert len(err.strip().splitlines()) == 1  # one line, yaml's multi-line detail folded


def test_cli_replays_from_another_folder(first_run, corpus, tmp_path, capsys, monkeypatch):
    base, first = first_run
    recorded = json.loads((first / "draws.json").read_text())["sources"][0]["root"]
    assert recorded == str(corpus.resolve())  # made with a relative --corpus, recorded absolute
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, _ = _run_cli([*base, "--draws", str(first / "draws.json"), "--out", "b"], capsys)
    assert code == 0
    dice = [r["dice"] for r in read_csv(first / "predictions.csv")]
    assert [r["dice"] for r in read_csv(elsewhere / "b" / "predictions.csv")] == dice
    written = sorted(p.name for p in (elsewhere / "b").iterdir())
    assert "draws.json" in written and "summary.json" in written
    # atomic writes leave no temporaries; the record of what megaseg wrote (megaseg.outputs) stays
    assert not [n for n in written if n.startswith(".") and n != ".megaseg-outputs.json"]
    # a draws file of an older version, with the root relative to the draws file's folder
    old = json.loads((first / "draws.json").read_text())
    old["sources"][0]["root"] = corpus.name
    legacy = corpus.parent / "legacy_draws.json"
    legacy.write_text(json.dumps(old))
    code, _ = _run_cli([*base, "--draws", str(legacy), "--out", "c"], capsys)
    assert code == 0
    assert [r["dice"] for r in read_csv(elsewhere / "c" / "predictions.csv")] == dice


def test_cli_reports_capped_n_as_one_clean_line(first_run, corpus, tmp_path, capsys, caplog):
    base, _ = first_run
    args = [*base, "--corpus", str(corpus), "--datasets", "Skin2D", "--support-sizes", "1", "500",
            "--out", str(tmp_path / "o")]  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the no-overlap note is not what is tested here
        from megaseg.cli import main

        assert main(["evaluate", *args]) == 0
    capped = [m for m in caplog.messages if "capped" in m]
    assert len(capped) == 1 and "\n" not in capped[0]
    assert re.fullmatch(r"Skin2D: N=500 capped to the support pool \(\d+ examples\) in 1 of 1 "
                        r"task\(s\)", capped[0]), capped  # fmt: skip


def test_cli_never_replaces_an_output_it_did_not_write(first_run, tmp_path, capsys):
    base, first = first_run
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.csv").write_text("my own table\n")
    replay = [*base, "--draws", str(first / "draws.json"), "--out", str(out)]
    code, err = _run_cli(replay, capsys)
    assert code == 2 and f"{out / 'summary.csv'}: exists and was not written by megaseg" in err
    assert "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["summary.csv"]  # refused before running
    assert (out / "summary.csv").read_text() == "my own table\n"
    assert _run_cli([*replay, "--overwrite"], capsys)[0] == 0  # said explicitly
    assert (out / "summary.csv").read_text() != "my own table\n"
    assert _run_cli(replay, capsys)[0] == 0  # now its own outputs: replaced without a word
    (out / "draws.json").write_text((out / "draws.json").read_text() + " ")  # a user's edit
    code, err = _run_cli(replay, capsys)
    assert code == 2 and f"{out / 'draws.json'}: exists and was not written by megaseg" in err


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_cli_never_replaces_the_draws_file_it_replays(first_run, tmp_path, capsys, overwrite):
    base, first = first_run
    folder = tmp_path / "mine"
    folder.mkdir()
    draws = folder / "draws.json"
    draws.write_bytes((first / "draws.json").read_bytes())
    before = draws.read_bytes()
    code, err = _run_cli([*base, "--draws", str(draws), "--out", str(folder), *overwrite], capsys)
    assert code == 2 and f"{draws}: is the draws file this evaluation replays" in err
    assert draws.read_bytes() == before and sorted(os.listdir(folder)) == ["draws.json"]


def test_cli_out_naming_a_file_is_one_line(first_run, tmp_path, capsys):
    base, first = first_run
    out = tmp_path / "results.txt"
    out.write_text("not a folder")
    code, err = _run_cli([*base, "--draws", str(first / "draws.json"), "--out", str(out)], capsys)
    assert code == 2 and f"{out}: exists and is not a folder" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("training", "corpus A", r"training must be an object, got 'corpus A'"),
        ("training", {"data": {"corpora": [7]}}, r"training.data.corpora\[0\] must be an object"),
        ("training", {"data": {"synthetic": {"seed_range": "0-9"}}},
         r"training.data.synthetic.seed_range must be \[low, high\]"),
        ("preprocessing", {"window": "wide"}, r"preprocessing.window must be \[low, high\]"),
        ("preprocessing", {"window": [400, -100]}, r"preprocessing.window must be \[low, high\]"),
        ("preprocessing", {"modality": 3}, r"preprocessing.modality must be a string"),
    ],
)  # fmt: skip
def test_cli_a_malformed_card_is_one_line_naming_it(
    first_run, tmp_path, capsys, field, value, reason
):
    base, first = first_run
    ckpt = save_checkpoint(tmp_path / "m.safetensors", create_model("universeg_v1", **TINY),
                           {"model": {"name": "universeg_v1", "kwargs": TINY}, "resolution": R,
                            field: value})  # fmt: skip
    args = [*base[2:], "--checkpoint", str(ckpt), "--draws", str(first / "draws.json"),
            "--out", str(tmp_path / "out")]  # fmt: skip
    code, err = _run_cli(args, capsys)
    assert code == 2 and re.search(rf"{re.escape(str(ckpt.with_suffix('.json')))}: {reason}", err)
    assert len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------ CLI help


def test_cli_help_imports_no_torch_and_shows_every_default(tmp_path):
    import os
    import subprocess
    import sys
    import time

    script = (
        "import sys\nfrom megaseg.cli import main\n"
        "try:\n    main(['evaluate', '--help'])\nexcept SystemExit as e:\n    code = e.code\n"
        "heavy = [m for m in ('torch', 'monai', 'lightning', 'numpy') if m in sys.modules]\n"
        "print('RESULT', code, heavy)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MEGASEG_WORK"}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path, env=env)  # fmt: skip
    seconds = time.perf_counter() - start
    assert out.stdout.strip().endswith("RESULT 0 []"), out.stdout + out.stderr
    assert seconds < 10  # ~0.1 s measured; importing torch alone took 2-4 s before
    text = " ".join(out.stdout.split())
    for default in ("(default: megaseg_work/eval)", "(default: 5)", "(default: 300)",
                    "(default: 2000)", "(default: [1, 2, 4, 8, 16, 32, 64])"):  # fmt: skip
        assert default in text, default
    assert list(tmp_path.iterdir()) == []  # --help writes nothing


def test_cli_every_option_is_explained_and_out_defaults_to_the_work_dir(monkeypatch):
    from megaseg.cli.evaluate import parser

    monkeypatch.setenv("MEGASEG_WORK", "/some/work")
    p = parser()
    assert isinstance(p.formatter_class, type) and issubclass(
        p.formatter_class, __import__("argparse").ArgumentDefaultsHelpFormatter
    )
    assert "(default: None)" not in p.format_help()  # e.g. the required --checkpoint
    assert all(a.help for a in p._actions), [a.dest for a in p._actions if not a.help]
    assert str(p.parse_args(["--checkpoint", "x"]).out) == "/some/work/eval"


def test_cli_refuses_a_bad_checkpoint_card_naming_it(model, tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "m.safetensors", model, {
        "model": {"name": "universeg_v1", "kwargs": {"encoder_widths": [100000] * 4}},
    })  # fmt: skip
    code, err = _run_cli(["--checkpoint", str(ckpt), "--synthetic-tasks", "1"], capsys)
    assert code == 2 and f"{ckpt}: weights do not fit the model" in err


# ------------------------------------------------------------------------------ draw intervals


def _rows(task_means: dict, draw_offsets, methods=("megaseg",), queries: int = 4) -> list[dict]:
    """Prediction rows: per method, task ``t`` (dataset ``name``) and draw ``r``: Dice
    ``task_means[(name, t)] + draw_offsets[r]`` for each of ``queries`` queries, N=16."""
    rows = []
    for m in methods:
        for (dataset, task), mean in task_means.items():
            for r, off in enumerate(draw_offsets):
                for q in range(queries):
                    rows.append({
                        "method": m, "dataset": dataset, "task": task, "N": 16,
                        "support_size": 16, "r": r, "seed": 100 + r, "query": f"test:{q}",
                        "dice": mean + off, "within_subject": False, "overlap": False,
                    })  # fmt: skip
    return rows


def _cell(summary, method, dataset, N=16):
    (row,) = [s for s in summary if (s["method"], s["dataset"], s["N"]) == (method, dataset, N)]
    return row


def test_draw_interval_covers_the_draws_and_the_task_interval_the_tasks():
    from megaseg.evaluation.report import summarize, task_means

    # Tasks far apart (0.3 ... 0.9), draws close together (+-0.01): the draw interval is narrow.
    spread = {("Far", f"t{i}"): 0.3 + 0.1 * i for i in range(7)}
    rows = _rows(spread, [-0.01, 0.004, 0.01, -0.006, 0.002])
    s = _cell(summarize(task_means(rows), resamples=500, seed=2), "megaseg", "Far")
    assert s["ci_high"] - s["ci_low"] > 0.2 and s["ci_draws_high"] - s["ci_draws_low"] < 0.02
    assert s["ci_draws_low"] <= s["dice"] <= s["ci_draws_high"] and s["draws"] == 7 * 5
    # The other way round: identical tasks, draws far apart: the task interval has zero width.
    same = {("Same", f"t{i}"): 0.5 for i in range(4)}
    rows = _rows(same, [-0.2, 0.1, 0.15, -0.05, 0.0])
    t = _cell(summarize(task_means(rows), resamples=500, seed=2), "megaseg", "Same")
    assert (
        t["ci_low"] == pytest.approx(t["ci_high"]) and t["ci_draws_high"] - t["ci_draws_low"] > 0.05
    )
    assert t["ci_draws_low"] <= t["dice"] <= t["ci_draws_high"]
    # Seeded: the same seed gives the same numbers, another seed other resamples.
    again = _cell(summarize(task_means(rows), resamples=500, seed=2), "megaseg", "Same")
    other = _cell(summarize(task_means(rows), resamples=500, seed=3), "megaseg", "Same")
    assert again == t
    assert (other["ci_draws_low"], other["ci_draws_high"]) != (
        t["ci_draws_low"],
        t["ci_draws_high"],
    )
    # The mean over datasets: its draw interval is inside the range of the dataset values.
    both = summarize(task_means(_rows({**spread, **same}, [-0.01, 0.01, 0.0])), resamples=500)
    m = _cell(both, "megaseg", "mean")
    assert m["ci_draws_low"] <= m["dice"] <= m["ci_draws_high"] and m["draws"] == (7 + 4) * 3


def test_draws_are_weighted_by_their_queries():
    from megaseg.evaluation.report import summarize, task_means

    # One draw of 3 queries at 0.9, one of 1 query at 0.1: the task's Dice is the query mean
    # 0.7, and a resample of both draws gives that same 0.7 (not the draw mean 0.5).
    rows = _rows({("W", "t"): 0.0}, [0.9], queries=3) + [
        {**_rows({("W", "t"): 0.0}, [0.1], queries=1)[0], "r": 1, "seed": 7}
    ]
    (task,) = task_means(rows)
    assert [(u["r"], u["queries"]) for u in task["draws"]] == [(0, 3), (1, 1)]
    s = _cell(summarize([task], resamples=2000), "megaseg", "W")
    assert s["dice"] == pytest.approx(0.7)
    # resamples: both draws once (0.7), draw 0 only (0.9), draw 1 only (0.1), 2:1 mixes
    assert 0.1 - 1e-12 <= s["ci_draws_low"] < 0.7 < s["ci_draws_high"] <= 0.9 + 1e-12


def test_paired_differences_of_identical_methods_are_exactly_zero():
    from megaseg.evaluation.report import differences, markdown_report, summarize, task_means

    tasks = {("A", "t0"): 0.4, ("A", "t1"): 0.8, ("B", "t0"): 0.6}
    rows = _rows(tasks, [-0.05, 0.02, 0.03], methods=("megaseg", "copy"))
    rows += [{**r, "method": "worse", "dice": r["dice"] - 0.1 * (r["r"] + 1) / 3}
             for r in rows if r["method"] == "megaseg"]  # fmt: skip
    summary = summarize(task_means(rows), resamples=300)
    for d in ("A", "B", "mean"):
        s = _cell(summary, "copy", d)
        assert s["paired_ref"] == "megaseg" and s["paired_diff"] == 0.0
        assert (s["paired_ci_low"], s["paired_ci_high"]) == (0.0, 0.0)
        assert (s["paired_ci_draws_low"], s["paired_ci_draws_high"]) == (0.0, 0.0)
        assert _cell(summary, "megaseg", d)["paired_ref"] is None  # the reference itself
        w = _cell(summary, "worse", d)
        # worse = megaseg - 0.033/0.067/0.1 by draw: the same in every task, so the task
        # interval is a point and the draw interval spans the draw offsets
        assert w["paired_diff"] == pytest.approx(0.2 / 3)
        assert w["paired_ci_low"] == pytest.approx(0.2 / 3) == pytest.approx(w["paired_ci_high"])
        assert 0.1 / 3 - 1e-9 <= w["paired_ci_draws_low"] < 0.2 / 3 < w["paired_ci_draws_high"]
        assert w["paired_ci_draws_high"] <= 0.1 + 1e-9
    diffs = differences(summary)
    assert {(x["method_a"], x["method_b"]) for x in diffs} == {
        ("megaseg", "copy"),
        ("megaseg", "worse"),
    }
    report = markdown_report(summary, {})
    assert "| A | megaseg − copy | 2 | +0.0 [0.0, 0.0]; draws [0.0, 0.0] |" in report
    assert "Interval over draws" in report and "NOT other subjects" in report


def test_old_summary_fields_keep_their_values(seed_offset=5):
    from megaseg.evaluation.report import SUMMARY_COLUMNS, summarize, task_means

    old = ("method", "scope", "dataset", "N", "dice", "ci_low", "ci_high", "tasks",
           "predictions", "within_subject", "overlap")  # fmt: skip
    assert SUMMARY_COLUMNS[:11] == old
    rng = np.random.default_rng(0)
    means = {(d, f"t{i}"): float(rng.uniform(0.2, 0.9)) for d in ("A", "B") for i in range(5)}
    tasks = task_means(_rows(means, [-0.02, 0.0, 0.03], methods=("megaseg", "mean_label")))
    summary = summarize(tasks, resamples=400, seed=seed_offset)
    for d_index, d in enumerate(("A", "B")):
        values = [t["dice"] for t in sorted(tasks, key=lambda t: t["task"])
                  if (t["method"], t["dataset"]) == ("megaseg", d)]  # fmt: skip
        expected = bootstrap_ci(np.array(values), 400, seed=seed_offset + d_index)
        s = _cell(summary, "megaseg", d)
        assert (s["dice"], s["ci_low"], s["ci_high"]) == tuple(float(x) for x in expected)
    # tasks read back from a tasks.csv (no draws): same old fields, no draw interval
    bare = [{k: v for k, v in t.items() if k != "draws"} for t in tasks]
    plain = summarize(bare, resamples=400, seed=seed_offset)
    for old, new in zip(plain, summary, strict=True):
        assert {k: old[k] for k in SUMMARY_COLUMNS[:11]} == {
            k: new[k] for k in SUMMARY_COLUMNS[:11]
        }
        assert old["ci_draws_low"] is None and old["draws"] is None
        if old["method"] == "mean_label":  # the paired interval over tasks needs no draws
            assert (
                old["paired_ci_low"] == new["paired_ci_low"] and old["paired_ci_draws_low"] is None
            )


def test_compare_runs_pairs_folders_on_the_same_draws_and_refuses_others(seg, disks, tmp_path):
    import shutil

    from megaseg.evaluation.compare import compare_runs

    kw = dict(methods=FAST, progress=False, resamples=200)
    first = _quiet(evaluate, seg, [disks], support_sizes=(1, 2), draws_per_n=2,
                   out_dir=tmp_path / "a", **kw)  # fmt: skip
    drawn = tmp_path / "a" / "draws.json"
    _quiet(evaluate, seg, [disks], draws=drawn, out_dir=tmp_path / "b", **kw)
    flips = _quiet(
        evaluate, seg, [disks], draws=drawn, flips=True, out_dir=tmp_path / "flips", **kw
    )
    # one model against itself on the same draws: exactly 0
    for x in compare_runs(tmp_path / "a", tmp_path / "b", resamples=200):
        assert (x["diff"], x["ci_low"], x["ci_high"]) == (0.0, 0.0, 0.0)
        assert (x["ci_draws_low"], x["ci_draws_high"]) == (0.0, 0.0)
    # the summary's own differences are what compare_runs gives between the two methods
    diffs = compare_runs(tmp_path / "a", tmp_path / "a", "megaseg", "mean_label", resamples=200)
    saved = json.loads((tmp_path / "a" / "summary.json").read_text())["summary"]
    for x in diffs:
        s = _cell(saved, "mean_label", x["dataset"], x["N"])
        assert s["paired_ref"] == "megaseg" and s["paired_diff"] == pytest.approx(x["diff"])
        assert (s["paired_ci_low"], s["paired_ci_draws_low"]) == pytest.approx(
            (x["ci_low"], x["ci_draws_low"])
        )
        cell = (x["dataset"], x["N"])
        assert x["diff"] == pytest.approx(
            first.dice("megaseg", *cell) - first.dice("mean_label", *cell)
        )
    assert "Paired differences" in (tmp_path / "a" / "summary.md").read_text()
    # with flips on the same draws (only the settings differ): paired
    for x in compare_runs(tmp_path / "flips", tmp_path / "a"):
        assert x["diff"] == pytest.approx(flips.dice(dataset=x["dataset"], N=x["N"])
                                          - first.dice(dataset=x["dataset"], N=x["N"]))  # fmt: skip
    # other draws: refused, naming both files
    _quiet(evaluate, seg, [disks], support_sizes=(1, 2), draws_per_n=2, seed=9,
           out_dir=tmp_path / "c", **kw)  # fmt: skip
    with pytest.raises(ValueError, match=r"a/draws.json and .*c/draws.json hold different draws"):
        compare_runs(tmp_path / "a", tmp_path / "c")
    # same draws.json but predictions of other queries (a row dropped): refused, naming both
    shutil.copytree(tmp_path / "b", tmp_path / "d")
    lines = (tmp_path / "d" / "predictions.csv").read_text().splitlines()
    (tmp_path / "d" / "predictions.csv").write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    pattern = (
        r"a/predictions.csv \(megaseg: \d+ rows\) and .*d/predictions.csv "
        r"\(megaseg: \d+ rows\) are not predictions of the same draws and queries"
    )
    with pytest.raises(ValueError, match=pattern):
        compare_runs(tmp_path / "a", tmp_path / "d")
    with pytest.raises(ValueError, match=r"no rows of method 'supervised'"):
        compare_runs(tmp_path / "a", tmp_path / "b", method_b="supervised")
    (tmp_path / "d" / "draws.json").unlink()
    with pytest.raises(ValueError, match=r"d/draws.json: cannot read the draws file"):
        compare_runs(tmp_path / "a", tmp_path / "d")


class _CountingMethod:
    """The mean-label baseline, counting its calls and the support sizes it was given."""

    name = "counted"

    def __init__(self):
        from megaseg.evaluation.baselines import MeanLabel

        self.inner, self.sizes = MeanLabel(), []

    def predict(self, query, support_images, support_labels, *, seed=0):
        self.sizes.append(support_images.shape[0])
        return self.inner.predict(query, support_images, support_labels, seed=seed)


def test_capped_n_is_not_predicted_again_and_the_outputs_say_so(disks, tmp_path):
    counted = _CountingMethod()
    ds = _quiet(make_draws, [disks], R, support_sizes=(2, 32, 64), draws_per_n=2)
    res = _quiet(
        evaluate, torch.nn.Identity(), [disks], draws=ds, methods=[counted],
        training_datasets=[], out_dir=tmp_path, progress=False, resolution=R,
    )  # fmt: skip
    # pools of 6-12 examples: N=32 and N=64 draw the same (whole) pools; predicted once, at 32
    assert len(counted.sizes) == 3 * 2 * 2  # tasks x r x {N=2, N=32}, not x 3 Ns
    assert all(n <= 12 for n in counted.sizes)
    by = {(r["task"], r["r"], r["query"], r["N"]): r for r in res.rows}
    assert len(by) == len(res.rows) and {r["N"] for r in res.rows} == {2, 32, 64}
    for (task, r, q, N), row in by.items():
        if N == 64:
            assert row["dice"] == by[(task, r, q, 32)]["dice"]
            assert row["support_size"] == by[(task, r, q, 32)]["support_size"] < 32
    assert res.meta["timings"]["counted"]["calls"] == 3 * 2 * 2
    assert "not predicted again" in (tmp_path / "summary.md").read_text()


def test_cases_plot_title_names_the_support_sizes_used(disks, tmp_path, monkeypatch):
    from megaseg.evaluation import report

    titles = []

    real = report.plot_cases

    def plot_cases(panels, path, title=""):
        titles.append(title)
        return real(panels, path, title)

    monkeypatch.setattr(report, "plot_cases", plot_cases)
    _quiet(
        evaluate, torch.nn.Identity(), [disks], support_sizes=(1, 64), draws_per_n=1,
        methods=[_CountingMethod()], training_datasets=[], out_dir=tmp_path, progress=False,
        resolution=R,
    )  # fmt: skip
    assert titles == ["counted: best, median and worst predictions at N=64 (support sizes 6-12)"]


@pytest.mark.parametrize(
    ("methods", "expected", "said"),
    [
        ([], ["megaseg", "mean_label", "random_init"], True),
        (["--methods", "megaseg", "supervised"], ["megaseg", "supervised"], False),
    ],
)
def test_cli_leaves_supervised_out_on_a_cpu_unless_named(
    first_run, monkeypatch, capsys, methods, expected, said
):
    import megaseg.evaluation

    seen = []

    def stop(*args, methods, **kwargs):
        seen.append(list(methods))
        raise ValueError("stopped before running")

    monkeypatch.setattr(megaseg.evaluation, "evaluate", stop)
    ckpt = first_run[0][1]
    code, err = _run_cli(["--checkpoint", ckpt, "--synthetic-tasks", "1", "--device", "cpu",
                          *methods], capsys)  # fmt: skip
    assert code == 2 and seen == [expected]
    assert ("supervised is left out (one U-Net training per support set)" in err) == said


def test_folder_source_reads_through_data_prep_and_names_unusable_cases(tmp_path):
    """folder_source is one call of data_prep.pipeline.process_folder (the corpus build's
    reader, pipeline and splits, uint8 as stored); a folder with no usable case is refused
    naming the cases and why."""
    from fixtures_data import write_folder2d

    from data_prep.pipeline import process_folder
    from data_prep.specs.adhoc import spec_from_path

    folder = write_folder2d(tmp_path / "ok", n_cases=6)
    built = process_folder(folder, spec_from_path(folder), 32)
    src = folder_source(folder, resolution=32)
    assert built.num_cases == 6 and not built.skipped
    assert sorted(built.tasks) == [t.name for t in src.tasks()]
    for task in src.tasks():
        arrays = built.tasks[task.name]
        assert arrays["images"].dtype == np.uint8 and arrays["images"].shape[1:] == (32, 32)
        # the source's example ids are "<split>:<k>", the k-th example of that split
        rows = {}
        for row, split in enumerate(arrays["splits"]):
            rows[f"{split}:{sum(1 for x in arrays['splits'][:row] if x == split)}"] = row
        ids = [*task.support_pool, *task.query_pool]
        images, labels = src.load(task.name, ids, 32)
        picked = [rows[i] for i in ids]
        torch.testing.assert_close(images[:, 0], torch.from_numpy(arrays["images"][picked]) / 255.0)
        torch.testing.assert_close(labels[:, 0], torch.from_numpy(arrays["labels"][picked]) / 255.0)
    bad = write_folder2d(tmp_path / "bad", n_cases=2)
    for png in (bad / "images").iterdir():
        png.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"no usable case \(2 found, 2 skipped; img_000: "):
        folder_source(bad, resolution=32)
