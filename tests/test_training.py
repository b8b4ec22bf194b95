"""LightningModule, data module and weight export, in process, on tiny inputs."""

from __future__ import annotations

import types

import pytest
import torch

import megaseg
from megaseg.training import (
    EpisodeDataModule,
    HeldOutError,
    InContextSegModule,
    WarmupCosine,
    build_card,
    export_weights,
)
from megaseg.training.module import episode_metrics

TINY = {"encoder_widths": [8, 8, 8, 8]}


def tiny_module(**kwargs) -> InContextSegModule:
    torch.manual_seed(0)
    return InContextSegModule("universeg_v1", TINY, resolution=32, support_size=3, **kwargs)


def tiny_batch(B=2, S=3, R=32) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "query": torch.rand(B, 1, R, R, generator=g),
        "query_label": (torch.rand(B, 1, R, R, generator=g) > 0.5).float(),
        "support_images": torch.rand(B, S, 1, R, R, generator=g),
        "support_labels": (torch.rand(B, S, 1, R, R, generator=g) > 0.5).float(),
    }


def test_training_step_gives_a_finite_loss_and_gradients():
    module = tiny_module()
    module.log = lambda *a, **k: None
    loss = module.training_step(tiny_batch(), 0)
    loss.backward()
    assert torch.isfinite(loss) and 0 <= loss.item() <= 1
    assert all(p.grad is not None for p in module.net.parameters() if p.requires_grad)
    # the last decoder block's support branch feeds nothing: frozen, so DDP needs no
    # find_unused_parameters
    assert module.frozen == ["dec_blocks.2.support.vmapped.conv.weight",
                             "dec_blocks.2.support.vmapped.conv.bias"]  # fmt: skip


def test_episode_metrics():
    target = torch.zeros(3, 1, 4, 4)
    target[0, 0, :2] = 1
    logits = torch.full((3, 1, 4, 4), -5.0)
    logits[0, 0, :2] = 5.0  # perfect
    logits[2, 0, 0, 0] = 5.0  # one false positive on an empty truth
    dice, empty = episode_metrics(logits, target)
    assert dice.tolist() == [1.0, 1.0, 0.0]  # empty truth and empty prediction count as 1
    assert empty.tolist() == [False, True, False]


def test_warmup_cosine_schedule():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = WarmupCosine(opt, warmup_steps=10, total_steps=110, start_factor=0.0, min_factor=0.1)
    assert sched.factor(0) == 0.0 and sched.factor(5) == pytest.approx(0.5)
    assert sched.factor(10) == pytest.approx(1.0) and sched.factor(60) == pytest.approx(0.55)
    assert sched.factor(110) == pytest.approx(0.1) and sched.factor(500) == pytest.approx(0.1)
    assert WarmupCosine(opt, warmup_steps=2).factor(1000) == 1.0


def test_optimizer_and_scheduler_come_from_the_constructor():
    module = tiny_module(
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
        lr_scheduler=lambda o: WarmupCosine(o, warmup_steps=5),
    )
    conf = module.configure_optimizers()
    assert isinstance(conf["optimizer"], torch.optim.AdamW)
    assert conf["lr_scheduler"]["interval"] == "step"
    assert isinstance(tiny_module().configure_optimizers(), torch.optim.Adam)


def test_cosine_follows_the_time_limit_of_a_run_without_a_step_limit():
    """trainer.max_time and no max_steps: warm-up, then the total is the steps the measured rate
    reaches by the deadline, so the learning rate ends at min_factor when the time is up."""
    from pytorch_lightning.callbacks import Timer

    module = tiny_module(lr_scheduler=lambda o: WarmupCosine(o, warmup_steps=10, min_factor=0.1))
    timer = Timer(duration={"seconds": 100})
    elapsed = {"t": 0.0}
    timer.time_elapsed = lambda stage="train": elapsed["t"]
    trainer = types.SimpleNamespace(estimated_stepping_batches=float("inf"), callbacks=[timer],
                                    global_step=0)  # fmt: skip
    module._trainer = trainer
    sched = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert sched.total_steps is None  # constant after warm-up until the rate is known

    def at(step: int, seconds: float) -> None:
        trainer.global_step, elapsed["t"] = step, seconds
        module._follow_time_budget()

    at(20, 5.0)  # before a tenth of the time: start-up costs would distort the rate
    assert sched.total_steps is None
    at(200, 20.0)  # 10 steps/s -> 1000 steps by the deadline
    assert sched.total_steps == 1000
    at(210, 20.5)  # not a multiple of TIME_BUDGET_EVERY: unchanged
    assert sched.total_steps == 1000
    at(600, 80.0)  # slower since: 7.5 steps/s on average -> 750
    assert sched.total_steps == 750 and sched.factor(750) == pytest.approx(0.1)
    at(800, 120.0)  # past the deadline (the last step's check): the total is where we are
    assert sched.total_steps == 801

    fixed = tiny_module(lr_scheduler=lambda o: WarmupCosine(o, warmup_steps=10))
    fixed._trainer = types.SimpleNamespace(estimated_stepping_batches=500, callbacks=[timer],
                                           global_step=0)  # fmt: skip
    assert fixed.configure_optimizers()["lr_scheduler"]["scheduler"].total_steps == 500
    assert fixed._time_budget == (None, None)  # a step limit wins over the time limit


def _fake_trainer(module, datamodule=None, step=7):
    return types.SimpleNamespace(datamodule=datamodule, global_step=step, current_epoch=0,
                                 lightning_module=module)  # fmt: skip


def test_export_round_trips_through_load_checkpoint_and_segmenter(tmp_path):
    module = tiny_module()
    dm = EpisodeDataModule(resolution=32, support_size=3, synthetic_tasks=10)
    path = export_weights(tmp_path / "w.safetensors", module, _fake_trainer(module, dm), {"a": 1})
    model, card = megaseg.load_checkpoint(path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                  module.net.state_dict().values(), strict=True))  # fmt: skip
    assert card["model"] == {"name": "universeg_v1", "kwargs": TINY}
    assert card["resolution"] == 32 and card["weights"] == "raw" and card["training"]["step"] == 7
    assert card["training"]["data"]["synthetic"]["seed_range"] == [0, 10]
    assert card["config"] == {"a": 1} and card["format_version"] == 1 and "megaseg_version" in card
    if hasattr(megaseg, "Segmenter"):
        seg = megaseg.Segmenter.from_checkpoint(path, device="cpu")
        assert seg.resolution == 32


def test_ema_weights_are_exported_when_kept(tmp_path):
    module = tiny_module(ema_decay=0.5)
    with torch.no_grad():
        for p in module.net.parameters():
            p.add_(1.0)
    module.ema.update(module.net, step=10)
    path = export_weights(tmp_path / "w.safetensors", module)
    model, card = megaseg.load_checkpoint(path)
    assert card["weights"] == "ema"
    ema_state = module.ema.module.state_dict()
    assert all(torch.equal(v, ema_state[k]) for k, v in model.state_dict().items())
    assert not torch.equal(ema_state["out_conv.conv.weight"], module.net.out_conv.conv.weight)
    raw = export_weights(tmp_path / "raw.safetensors", module, ema=False)
    assert megaseg.load_checkpoint(raw)[1]["weights"] == "raw"


def test_fit_can_start_from_exported_weights(tmp_path):
    source = tiny_module()
    path = export_weights(tmp_path / "w.safetensors", source)
    torch.manual_seed(123)
    module = InContextSegModule("universeg_v1", TINY, init_weights=str(path))
    assert torch.equal(module.net.out_conv.conv.weight, source.net.out_conv.conv.weight)
    with pytest.raises(ValueError, match="not 'universeg_v1_small'"):
        InContextSegModule("universeg_v1_small", TINY, init_weights=str(path))
    with pytest.raises(ValueError, match="do not fit"):
        InContextSegModule("universeg_v1", {"encoder_widths": [4, 4, 4, 4]}, init_weights=str(path))


def test_fit_refuses_to_start_from_nan_weights(tmp_path):
    source = tiny_module()
    with torch.no_grad():
        source.net.out_conv.conv.weight[0].fill_(float("nan"))
    path = export_weights(tmp_path / "w.safetensors", source)
    with pytest.raises(ValueError, match=r"NaN or inf values: out_conv\.conv\.weight"):
        InContextSegModule("universeg_v1", TINY, init_weights=str(path))


def test_held_out_datasets_are_refused_for_training(tmp_path):
    protocol = tmp_path / "p.yaml"
    protocol.write_text("name: demo\nheld_out: [WBC-*, STARE]\n")
    with pytest.raises(HeldOutError, match=r"\['wbc-cv', 'Stare'\] are held out by protocol"):
        EpisodeDataModule(corpora=["x"], datasets=["ACDC", "wbc-cv", "Stare"],
                          protocol=str(protocol), synthetic_ratio=0.0)  # fmt: skip
    with pytest.raises(HeldOutError, match="held_out"):
        EpisodeDataModule(corpora=["x"], datasets=["A"], held_out=["a"], synthetic_ratio=0.5)
    dm = EpisodeDataModule(corpora=["x"], protocol=str(protocol), synthetic_ratio=0.5)
    assert dm.held_out == ["STARE", "WBC-*"]


def test_synthetic_only_needs_ratio_one():
    with pytest.raises(ValueError, match="synthetic_ratio: 1.0"):
        EpisodeDataModule(synthetic_ratio=0.5)


def test_training_stream_starts_where_the_trainer_resumes():
    dm = EpisodeDataModule(resolution=16, support_size=2, batch_size=2, synthetic_tasks=10)
    dm.trainer = types.SimpleNamespace(global_step=5, accumulate_grad_batches=2, global_rank=1)
    stream = dm.train_dataloader().dataset
    assert (stream.start_step, stream.rank) == (10, 1)
    batch = next(iter(dm.train_dataloader()))
    assert batch["index"].tolist() == [0, 0, 1, 10]
    names = [n for n, _ in dm.eval_sets("val")]
    assert names == ["synthetic"]


def test_card_without_trainer():
    card = build_card(tiny_module())
    assert card["training"]["step"] is None and card["model"]["name"] == "universeg_v1"


def test_augmentation_presets_are_deterministic_per_step():
    plain = EpisodeDataModule(resolution=32, support_size=3, batch_size=2, synthetic_tasks=10)
    dm = EpisodeDataModule(resolution=32, support_size=3, batch_size=2, synthetic_tasks=10,
                           augment="reference")  # fmt: skip
    a, b = next(iter(dm.train_dataloader())), next(iter(dm.train_dataloader()))
    c = next(iter(plain.train_dataloader()))
    assert a["support_images"].shape == (2, 3, 1, 32, 32) and a["task"] == c["task"]
    assert torch.equal(a["query"], b["query"]) and not torch.equal(a["query"], c["query"])
    assert 0 <= float(a["support_labels"].min()) and float(a["support_labels"].max()) <= 1
    with pytest.raises(ValueError, match="augment must be one of"):
        EpisodeDataModule(augment="strong")


def test_data_module_passes_support_size_log_to_the_sampler_and_card():
    dm = EpisodeDataModule(resolution=16, support_size=(2, 8), batch_size=1, synthetic_tasks=10,
                           support_size_log=True)  # fmt: skip
    sampler = dm.train_dataloader().dataset.sampler
    assert sampler.support_size_log is True
    assert dm.describe()["support_size_log"] is True
    plain = EpisodeDataModule(resolution=16, support_size=(2, 8), batch_size=1, synthetic_tasks=10)
    assert plain.train_dataloader().dataset.sampler.support_size_log is False
    assert plain.describe()["support_size_log"] is False


def test_data_module_passes_cross_subject_to_the_training_sampler_only():
    dm = EpisodeDataModule(resolution=16, support_size=4, batch_size=1, synthetic_tasks=10,
                           cross_subject=1.0)  # fmt: skip
    assert dm.train_dataloader().dataset.sampler.cross_subject == 1.0
    assert dm.describe()["cross_subject"] == 1.0
    assert all(s.cross_subject == 0.0 for _, s in dm.eval_sets("val"))  # validation: usual draw
    with pytest.raises(ValueError, match="cross_subject must be in"):
        EpisodeDataModule(cross_subject=2.0)


# -- a corpus without val tasks (every subject in train) -------------------------------------


def _one_split_corpus(root, split: str, name: str = "Solo"):
    """A 4-subject 2D corpus at 32 px (a disc and a square task) whose every subject is in
    ``split``, as a packaged source's (``PackagedSpec.split``)."""
    from test_store import ArrayLoader

    from data_prep.pipeline import write_dataset
    from data_prep.specs.packaged import PackagedSpec
    from data_prep.store_writer import memory_case

    spec = PackagedSpec(name=name, reader="memory", root="", licence="CC0", source="tests",
                        split=split)  # fmt: skip
    cases = [memory_case(name, f"c{i}", f"subject{i}", {1: "disc", 2: "square"}) for i in range(4)]
    summary = write_dataset(root, spec, cases, ArrayLoader(0), lambda c: f"v1-{c.case_id}",
                            resolutions=(32,), progress=False)  # fmt: skip
    assert summary.ok, summary.text()
    return root


def test_a_corpus_without_val_tasks_is_left_out_of_validation(tmp_path, capsys):
    import pytorch_lightning as pl

    from megaseg.data import Corpus
    from megaseg.data.tasks import CorpusTaskSource, EmptySplitError

    root = _one_split_corpus(tmp_path / "corpus", "train")
    with pytest.raises(EmptySplitError, match="no val task with >= 2 examples"):
        CorpusTaskSource(Corpus(root), "val", 32)
    assert issubclass(EmptySplitError, ValueError)
    dm = EpisodeDataModule(corpora=[str(root)], synthetic_ratio=0.5, resolution=32,
                           support_size=3, batch_size=4, val_batches=1, val_batch_size=2,
                           synthetic_tasks=10)  # fmt: skip
    assert [name for name, _ in dm.eval_sets("val")] == ["synthetic"]
    assert [name for name, _ in dm.eval_sets("test")] == ["synthetic"]
    out = capsys.readouterr().out
    assert f"megaseg: {root}: no val task" in out and "no val episodes from this corpus" in out
    module = tiny_module()
    trainer = pl.Trainer(max_steps=2, val_check_interval=2, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2
    (metrics,) = trainer.validate(module, datamodule=dm, verbose=False)
    assert "val/synthetic/dice" in metrics and not any("corpus" in k for k in metrics)
    sampler = dm.train_dataloader().dataset.sampler
    tasks = [t for i in range(3) for t in sampler.batch(0, 0, 0, i)["task"]]
    assert any(t.startswith("corpus:") for t in tasks)  # training still draws from the corpus


def test_a_corpus_without_train_tasks_still_stops_training(tmp_path):
    from megaseg.data.tasks import EmptySplitError

    root = _one_split_corpus(tmp_path / "corpus", "test")
    dm = EpisodeDataModule(corpora=[str(root)], synthetic_ratio=0.5, resolution=32,
                           support_size=3, synthetic_tasks=10)  # fmt: skip
    with pytest.raises(EmptySplitError, match="no train task"):
        dm.train_dataloader()
