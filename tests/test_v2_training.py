"""Synthetic tasks v2 wired into training and evaluation: data module, card, ``megaseg evaluate
--synthetic-version``, the "generalist" augmentation preset and ``configs/generalist_cpu.yaml``."""

from __future__ import annotations

import json
import types
import warnings
from pathlib import Path

import pytest
import torch

import megaseg
from megaseg.checkpoint import save_checkpoint
from megaseg.data.augment import Affine, EpisodeAugment, FieldOfView
from megaseg.training import EpisodeDataModule, InContextSegModule, export_weights
from megaseg.training.datamodule import make_augment

REPO = Path(__file__).resolve().parents[1]
TINY = {"encoder_widths": [8, 8, 8, 8]}
R = 32


def v2_module(**kwargs) -> EpisodeDataModule:
    return EpisodeDataModule(resolution=R, support_size=(2, 3), batch_size=2, synthetic_tasks=10,
                             val_batches=1, val_batch_size=2, synthetic_version=2, **kwargs)  # fmt: skip


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ------------------------------------------------------------------------------ data module


def test_v2_data_module_yields_episodes_of_the_v2_generator():
    dm = v2_module()
    batch = next(iter(dm.train_dataloader()))
    S = batch["support_images"].shape[1]
    assert 2 <= S <= 3 and batch["query"].shape == (2, 1, R, R)
    assert batch["support_images"].shape == batch["support_labels"].shape == (2, S, 1, R, R)
    assert batch["query_label"].shape == (2, 1, R, R)
    labels = torch.cat([batch["query_label"].flatten(), batch["support_labels"].flatten()])
    assert set(labels.unique().tolist()) <= {0.0, 1.0}
    # The episodes are v2's: the same draw through a v1 module gives other images.
    v1 = EpisodeDataModule(resolution=R, support_size=(2, 3), batch_size=2, synthetic_tasks=10)
    assert not torch.equal(next(iter(v1.train_dataloader()))["query"], batch["query"])
    val = next(iter(dm.val_dataloader()[0]))
    assert val["support_images"].shape == (2, 3, 1, R, R)  # val S: the top of the range
    assert "other_support_images" in val  # a foreign task for the support-swap metric
    gen = dm.synthetic_generator(0)
    assert gen.version == 2 and gen.label_maps is not None and gen.config.size == R


def test_v2_data_module_without_real_maps_and_bad_settings():
    gen = v2_module(synthetic_real_maps=False).synthetic_generator(0)
    assert gen.label_maps is None and "maps=none" in gen.fingerprint()
    dm = v2_module(synthetic_config={"radius_range": [0.1, 0.5], "num_subjects": 20})
    assert dm.synthetic_config.radius_range == (0.1, 0.5)  # YAML lists become the tuples
    with pytest.raises(ValueError, match="synthetic_version must be one of"):
        EpisodeDataModule(synthetic_version=3)
    with pytest.raises(ValueError, match=r"\['bogus'\] are not fields of SyntheticV2Config"):
        v2_module(synthetic_config={"bogus": 1})


def test_card_records_the_v2_generator_and_its_fingerprint(tmp_path):
    torch.manual_seed(0)
    module = InContextSegModule("universeg_v1", TINY, resolution=R, support_size=3)
    dm = v2_module(augment="generalist")
    trainer = types.SimpleNamespace(datamodule=dm, global_step=3, current_epoch=0,
                                    lightning_module=module)  # fmt: skip
    _, card = megaseg.load_checkpoint(export_weights(tmp_path / "w.safetensors", module, trainer))
    data = card["training"]["data"]
    synthetic = data["synthetic"]
    assert synthetic["generator_version"] == 2 and synthetic["label_maps"] == "mni152"
    assert synthetic["fingerprint"] == dm.synthetic_generator(0).fingerprint()
    assert synthetic["fingerprint"].startswith("v2:SyntheticV2Config(size=32")
    assert synthetic["seed_range"] == [0, 10] and data["augment_preset"] == "generalist"
    v1 = EpisodeDataModule(resolution=R, support_size=3, synthetic_tasks=10).describe()
    assert v1["synthetic"]["generator_version"] == 1 and "fingerprint" not in v1["synthetic"]


# ------------------------------------------------------------------------------ evaluation


@pytest.fixture
def tiny_checkpoint(tmp_path) -> Path:
    torch.manual_seed(0)
    model = megaseg.create_model("universeg_v1", **TINY)
    card = {"model": {"name": "universeg_v1", "kwargs": TINY}, "resolution": R}
    return save_checkpoint(tmp_path / "m.safetensors", model, card)


def _evaluate(argv, capsys) -> tuple[int, str]:
    from megaseg.cli import main

    code = _quiet(main, ["evaluate", *argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_evaluate_on_v2_tasks_records_the_version_and_replays(tiny_checkpoint, tmp_path, capsys):
    from megaseg.evaluation.report import read_csv

    base = ["--checkpoint", str(tiny_checkpoint), "--support-sizes", "1", "2", "--draws-per-n",
            "1", "--max-queries", "2", "--methods", "megaseg", "mean_label", "--no-progress",
            "--bootstrap", "50"]  # fmt: skip
    first = tmp_path / "v2"
    args = [*base, "--synthetic-tasks", "2", "--synthetic-version", "2", "--out", str(first)]
    assert _evaluate(args, capsys)[0] == 0
    (record,) = json.loads((first / "draws.json").read_text())["sources"]
    assert record["generator_version"] == 2 and record["label_maps"] == "mni152"
    assert "kind_weights" in record["config"]  # a SyntheticV2Config, not v1's

    draws = str(first / "draws.json")
    assert _evaluate([*base, "--draws", draws, "--out", str(tmp_path / "again")], capsys)[0] == 0
    dice = [r["dice"] for r in read_csv(first / "predictions.csv")]
    assert [r["dice"] for r in read_csv(tmp_path / "again" / "predictions.csv")] == dice

    code, err = _evaluate([*base, "--draws", draws, "--synthetic-version", "1",
                           "--out", str(tmp_path / "x")], capsys)  # fmt: skip
    assert code == 2 and "generator version 2, not 1" in err
    # v1 held-out tasks are other tasks: their draws do not replay on v2.
    v1 = tmp_path / "v1"
    assert _evaluate([*base, "--synthetic-tasks", "1", "--out", str(v1)], capsys)[0] == 0
    assert "label_maps" not in json.loads((v1 / "draws.json").read_text())["sources"][0]
    code, err = _evaluate([*base, "--draws", str(v1 / "draws.json"), "--synthetic-version", "2",
                           "--out", str(tmp_path / "y")], capsys)  # fmt: skip
    assert code == 2 and "generator version 1, not 2" in err
    code, err = _evaluate([*base, "--synthetic-version", "2", "--out", str(tmp_path / "z")], capsys)
    assert code == 2 and "--synthetic-version names the generator of --synthetic-tasks" in err


def test_a_draws_file_of_an_unknown_generator_version_is_refused(tmp_path):
    from megaseg.evaluation.sources import SyntheticSource, sources_from_record

    record = SyntheticSource(1, version=2).describe()
    assert sources_from_record([record], R)[0].describe() == record
    with pytest.raises(ValueError, match="synthetic generator version 7 is unknown"):
        sources_from_record([{**record, "generator_version": 7}], R)


# ------------------------------------------------------------------------------ augmentation


def _in_task_draw(augment: EpisodeAugment, kind: type, B: int = 4, N: int = 9):
    params = augment.sample(B, N, torch.Generator().manual_seed(0))
    (draw,) = [d for d in params.draws if not d.task_level and type(d.transform) is kind]
    return draw


def test_generalist_preset_draws_per_example_zooms_from_half_to_double():
    draw = _in_task_draw(make_augment("generalist"), Affine, B=16, N=16)
    scale = draw.params["scale"]
    assert scale.shape == (256,)  # one draw per example (B * N), not per episode
    assert float(scale.min()) >= 0.5 and float(scale.max()) <= 2.0
    # log-uniform: as many zooms below x1 as above, and both ends reached
    assert 0.4 < float((scale < 1).float().mean()) < 0.6  # uniform in [0.5, 2]: 1/3
    assert float(scale.min()) < 0.6 and float(scale.max()) > 1.7
    assert 0.6 < float(draw.active.float().mean()) < 0.95  # p = 0.8
    reference = _in_task_draw(make_augment("reference"), Affine, B=16, N=16)
    assert float(reference.params["scale"].min()) >= 0.8
    assert float(reference.params["scale"].max()) <= 1.1
    assert not any(isinstance(t, FieldOfView) for t in make_augment("reference").in_task.transforms)


def test_field_of_view_keeps_a_rectangle_of_at_least_min_keep_per_side():
    images, labels = torch.rand(64, 1, 40, 40) + 0.5, torch.ones(64, 1, 40, 40)
    fov = FieldOfView(min_keep=0.55)
    out_x, out_y = fov(images, labels, torch.Generator().manual_seed(1))
    kept = out_y[:, 0] > 0
    rows, cols = kept.any(dim=2), kept.any(dim=1)  # (n, H) rows, (n, W) columns kept
    assert torch.equal(out_x > 0, out_y > 0)  # image and label cut alike
    assert int(rows.sum(1).min()) >= 0.55 * 40 - 1 and int(cols.sum(1).min()) >= 0.55 * 40 - 1
    area = rows.sum(1) * cols.sum(1)
    assert torch.equal(kept.sum(dim=(1, 2)), area)  # a rectangle
    assert int(area.min()) < 40 * 40 * 0.6  # some subjects lose much of their field of view


def test_generalist_config_fits_and_resumes_with_ckpt_path_last(tmp_path, monkeypatch):
    """The config as is but small, on a stand-in for its packaged corpus (every subject in
    train, as there) and stand-in SPM12 maps: the real ones are built and fetched on the
    campaign's machine, not in a test."""
    from test_synthetic_v2 import _fake_packaged_maps
    from test_training import _one_split_corpus

    from megaseg.cli import main

    _fake_packaged_maps(monkeypatch, R)
    corpus = _one_split_corpus(tmp_path / "corpus", "train")
    root = tmp_path / "run"
    small = ["--trainer.default_root_dir", str(root), "--data.resolution", "32",
             "--data.corpora", f"[{corpus}]",
             "--data.protocol", str(REPO / "configs" / "protocols" / "packaged.yaml"),
             "--data.support_size", "[2, 3]", "--data.val_support_size", "3",
             "--data.batch_size", "1", "--data.val_batch_size", "1", "--data.val_batches", "1",
             "--data.num_workers", "0", "--data.synthetic_tasks", "20",
             "--model.model_kwargs", '{"encoder_widths": [8, 8, 8, 8]}',
             "--trainer.log_every_n_steps", "1", "--ckpt_path", "last"]  # fmt: skip
    config = ["fit", "--config", str(REPO / "configs" / "generalist_cpu.yaml")]
    _quiet(main, [*config, *small, "--trainer.max_steps", "2"])
    assert torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    _quiet(main, [*config, *small, "--trainer.max_steps", "3"])
    _, card = megaseg.load_checkpoint(root / "export" / "final.safetensors")
    assert card["training"]["step"] == 3 and card["weights"] == "ema"
    data = card["training"]["data"]
    assert data["synthetic"]["generator_version"] == 2 and data["augment_preset"] == "generalist"
    assert data["synthetic"]["label_maps"] == "mni152+spm12" and data["support_size_log"]
    assert [c["datasets"] for c in data["corpora"]] == [["Solo"]]
    assert sorted(p.name for p in (root / "lightning_logs").iterdir()) == [
        "version_0",
        "version_1",
    ]


def _phase_two_overlay_card(main, overlay: str, root: Path, corpus: Path) -> dict:
    """Fit 1 shrunk step of generalist_cpu_128.yaml + ``overlay`` on ``corpus``; the exported
    card's ``training.data``."""
    small = ["--trainer.default_root_dir", str(root), "--data.resolution", "32",
             "--data.corpora", f"[{corpus}]", "--model.init_weights", "null",
             "--data.support_size", "[2, 3]", "--data.val_support_size", "3",
             "--data.val_batch_size", "1", "--data.val_batches", "1",
             "--data.num_workers", "0", "--data.synthetic_tasks", "20",
             "--model.model_kwargs", '{"encoder_widths": [8, 8, 8, 8]}',
             "--trainer.max_steps", "1"]  # fmt: skip
    configs = [f"--config={REPO / 'configs' / c}" for c in ("generalist_cpu_128.yaml", overlay)]
    _quiet(main, ["fit", *configs, *small])
    _, card = megaseg.load_checkpoint(root / "export" / "final.safetensors")
    return card["training"]["data"]


def test_heads_config_layers_cross_subject_on_phase_two(tmp_path, monkeypatch):
    """configs/generalist_cpu_128_heads.yaml on top of generalist_cpu_128.yaml: phase 2's
    recipe with cross-subject episodes, recorded in the exported card."""
    from test_synthetic_v2 import _fake_packaged_maps
    from test_training import _one_split_corpus

    from megaseg.cli import main

    _fake_packaged_maps(monkeypatch, R)
    corpus = _one_split_corpus(tmp_path / "corpus", "train")
    root = tmp_path / "run"
    data = _phase_two_overlay_card(main, "generalist_cpu_128_heads.yaml", root, corpus)
    assert data["cross_subject"] == 1.0 and data["augment_preset"] == "light"
    assert data["synthetic"]["generator_version"] == 2 and data["synthetic_ratio"] == 0.75


def test_xs_config_mixes_the_new_sources_with_cross_subject_episodes(tmp_path, monkeypatch):
    """configs/generalist_xs.yaml (#22) on top of generalist_cpu_128.yaml: the shipped model
    continued with the new multi-subject corpus beside the current ones, every multi-subject
    task drawn across subjects; a shrunk run fits and records it in its card."""
    import yaml
    from test_synthetic_v2 import _fake_packaged_maps
    from test_training import _one_split_corpus

    from megaseg.cli import main

    own = yaml.safe_load((REPO / "configs" / "generalist_xs.yaml").read_text())
    assert own["data"]["corpora"][-1] == "megaseg_work/corpus_new"
    assert own["model"]["init_weights"] == "checkpoints/megaseg_generalist.safetensors"
    _fake_packaged_maps(monkeypatch, R)
    corpus = _one_split_corpus(tmp_path / "corpus", "train")
    root = tmp_path / "run"
    data = _phase_two_overlay_card(main, "generalist_xs.yaml", root, corpus)
    assert data["cross_subject"] == 1.0 and data["augment_preset"] == "light"
    assert data["synthetic_ratio"] == 0.75


def test_gpu_configs_fit_on_a_cpu_and_layer_the_wide_network(tmp_path, monkeypatch):
    """configs/generalist_gpu.yaml (+ generalist_gpu_w64.yaml), shrunk and on the CPU: bf16
    autocast, a time limit instead of a step limit, and the overlay's optimizer and start."""
    from test_synthetic_v2 import _fake_packaged_maps
    from test_training import _one_split_corpus

    from data_prep.synth import write_synthetic
    from megaseg.cli import main

    _fake_packaged_maps(monkeypatch, R)
    corpus = _one_split_corpus(tmp_path / "corpus", "train")
    store = tmp_path / "synth"  # the config reads its synthetic tasks from a store
    write_synthetic(store, 2, 6, resolutions=(R,), generator_version=2,
                    label_maps="mni152+spm12", progress=False)  # fmt: skip
    for overlay in ((), ("generalist_gpu_w64.yaml",)):
        root = tmp_path / f"run{len(overlay)}"
        small = ["--trainer.default_root_dir", str(root), "--trainer.accelerator", "cpu",
                 "--data.resolution", "32", "--data.corpora", f"[{corpus}]",
                 "--model.init_weights", "null", "--data.batch_size", "2",
                 "--data.support_size", "[2, 4]", "--data.val_support_size", "3",
                 "--data.val_batch_size", "1", "--data.val_batches", "1",
                 "--data.num_workers", "0", "--data.synthetic_tasks", "2",
                 "--data.synthetic_store", str(store),
                 "--data.synthetic_config", '{"num_subjects": 6}',
                 "--model.model_kwargs", '{"encoder_widths": [8, 8, 8, 8]}',
                 "--trainer.max_steps", "2"]  # fmt: skip
        configs = [f"--config={REPO / 'configs' / c}" for c in ("generalist_gpu.yaml", *overlay)]
        _quiet(main, ["fit", *configs, *small])
        _, card = megaseg.load_checkpoint(root / "export" / "final.safetensors")
        config, data = card["config"], card["training"]["data"]
        assert config["trainer"]["precision"] == "bf16-mixed"
        assert config["trainer"]["max_time"] == "00:00:05:30"
        assert data["cross_subject"] == 1.0 and data["augment_preset"] == "light"
        assert data["synthetic"]["generator_version"] == 2
        assert data["support_size_buckets"] and data["augment_on_device"]
        assert data["synthetic"]["store"]["root"] == str(store)
        lr = config["model"]["optimizer"]["init_args"]["lr"]
        assert lr == (4e-4 if overlay else 2e-4)


# ------------------------------------------------------------------------------ label-map sets


def test_data_module_and_held_out_source_record_the_mni152_spm12_maps(monkeypatch):
    from test_synthetic_v2 import _fake_packaged_maps

    from megaseg.evaluation.sources import SyntheticSource, sources_from_record

    _fake_packaged_maps(monkeypatch, R)
    dm = v2_module(synthetic_real_maps="mni152+spm12")
    mni = v2_module(synthetic_real_maps=True)
    card, mni_card = dm.describe()["synthetic"], mni.describe()["synthetic"]
    assert card["label_maps"] == "mni152+spm12" and mni_card["label_maps"] == "mni152"
    assert card["fingerprint"] != mni_card["fingerprint"]
    n = mni.synthetic_generator(0).label_maps.shape[0]
    assert dm.synthetic_generator(0).label_maps.shape[0] == n + 2
    assert v2_module(synthetic_real_maps=False).describe()["synthetic"]["label_maps"] is None
    with pytest.raises(ValueError, match="real label maps must be"):
        v2_module(synthetic_real_maps="aal")

    record = SyntheticSource(1, version=2, real_maps="mni152+spm12").describe()
    assert record["label_maps"] == "mni152+spm12"
    (again,) = sources_from_record([record], R)
    assert again.real_maps == "mni152+spm12" and again.describe() == record
    assert again._generator(R).label_maps.shape[0] == n + 2
    none = SyntheticSource(1, version=2, real_maps=False).describe()
    assert none["label_maps"] is None
    assert sources_from_record([none], R)[0].describe() == none
    # a v2 record of before the label_maps entry existed replays with the MNI152 maps
    old = {k: v for k, v in SyntheticSource(1, version=2).describe().items() if k != "label_maps"}
    assert sources_from_record([old], R)[0].real_maps == "mni152"
