"""``megaseg fit|validate|test|predict --config configs/....yaml``: the LightningCLI.

The data module is the authority on the values it shares with the model: ``data.resolution``
and ``data.support_size`` are linked to ``model.resolution`` and ``model.support_size``.

Every run under ``trainer.default_root_dir`` (ROOT), and the run's last lines name them:

- ``ROOT/checkpoints/``: Lightning's resumable ``.ckpt`` files (a ``ModelCheckpoint`` without a
  ``dirpath`` is pointed here, so ``--ckpt_path last`` finds them from one run to the next);
- ``ROOT/export/{last,final}.safetensors`` + ``.json`` cards (:class:`ExportWeights`, always on);
- ``ROOT/predictions/`` (``megaseg predict``): per test-episode batch an ``.npz`` with the
  probabilities and a PNG (:class:`PredictionWriter`);
- ``ROOT/lightning_logs/version_N/``: ``metrics.csv`` (and TensorBoard events when tensorboard
  is installed), the resolved ``config.yaml``, ``val_examples/*.png``; N counts up per run.

On a CPU the run shares the cores between torch's intra-op threads and data workers
(:mod:`megaseg.training.threads`) and says so in its first lines.

A fit holds ROOT for itself and resumes only its own checkpoint (:mod:`megaseg.training.run_folder`);
checkpoints are written atomically in their folder (:mod:`megaseg.training.checkpoint_io`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import warnings
from pathlib import Path

import torch
from lightning_fabric.plugins import CheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint, ProgressBar
from pytorch_lightning.cli import LightningCLI, SaveConfigCallback
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.utilities.exceptions import SIGTERMException

from megaseg.cpu import available_cores
from megaseg.training.callbacks import (
    EpisodeThroughput,
    ExportWeights,
    PredictionWriter,
    SaveOnSigterm,
    StepProgressBar,
)
from megaseg.training.checkpoint_io import (
    AtomicCheckpointIO,
    IncompleteCheckpoint,
    check_complete,
)
from megaseg.training.datamodule import EpisodeDataModule
from megaseg.training.module import InContextSegModule
from megaseg.training.run_folder import (
    RunRefused,
    check_resumable,
    earlier_outputs,
    refuse_new_run_over,
    resolve_last,
    run_lock,
)
from megaseg.training.threads import auto_workers, plan_cpu

# Exit code of a run stopped by SIGTERM (128 + 15, as a shell reports a terminated process): the
# run is not complete, so a `megaseg fit ... && next step` chain stops there.
EXIT_SIGTERM = 143

# A run logs at least this many times, so that a short run still writes metrics.csv rows.
MIN_LOGGED_STEPS = 4


def default_loggers(root: str) -> list:
    """CSV always; TensorBoard too (same version folder) when it is installed."""
    csv = CSVLogger(root, name="lightning_logs")
    loggers = [csv]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        loggers.append(TensorBoardLogger(root, name="lightning_logs", version=csv.version))
    return loggers


class _DropLitLoggerTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet_third_party_notices() -> None:
    """Hide notices megaseg can do nothing about: Lightning's advertisement for its cloud
    logger (printed on every run), torch's deprecation of ``LeafSpec``, which Lightning's own
    pytree code still uses (pytorch_lightning/utilities/_pytree.py), and jsonargparse's
    deprecations of what Lightning's CLI calls."""
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLitLoggerTip) for f in logger.filters):
            logger.addFilter(_DropLitLoggerTip())
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
    )
    # jsonargparse deprecates calls that Lightning's own CLI code makes (instantiate_classes,
    # add_instantiator, skip_none): a notice for Lightning's developers, not for megaseg users.
    with contextlib.suppress(ImportError):  # where its name moves, the notices come back
        from jsonargparse._deprecated import JsonargparseDeprecationWarning

        warnings.filterwarnings("ignore", category=JsonargparseDeprecationWarning)
    # megaseg passes its own argv on purpose (lightning_main from Python: tests, notebooks)
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")


def _is_rank_zero() -> bool:
    # Lightning's launcher / torchrun set LOCAL_RANK, NODE_RANK, RANK; srun sets SLURM_PROCID
    ranks = ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID")
    return all(os.environ.get(name, "0") == "0" for name in ranks)


def _say(line: str) -> None:
    if _is_rank_zero():
        print(line, flush=True)


def _on_cpu(accelerator) -> bool:
    if isinstance(accelerator, str) and accelerator in ("cpu", "auto"):
        return accelerator == "cpu" or not torch.cuda.is_available()
    return False


def _processes(devices) -> int:
    if isinstance(devices, int):
        return max(1, devices)
    if isinstance(devices, str) and devices.strip().isdigit():
        return max(1, int(devices))
    if isinstance(devices, list | tuple):
        return max(1, len(devices))
    return 1


class MegasegCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.resolution", "model.resolution")
        parser.link_arguments("data.support_size", "model.support_size")
        parser.add_argument(
            "--cpu_threads",
            type=int | None,
            default=None,
            help="torch intra-op threads of a CPU run (default: the cores left after the data "
            "workers; OMP_NUM_THREADS, when set, is left to torch)",
        )

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the hyperparameters of a --ckpt_path file here, before any hook: an
        # empty or truncated file would be a bare EOFError from torch.load.
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if ckpt_path and "://" not in str(ckpt_path) and Path(ckpt_path).is_file():
            check_complete(ckpt_path)
        super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        """Share the CPU between threads and workers, and keep a short run's metrics."""
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        trainer = cfg.trainer
        if _on_cpu(trainer.accelerator):
            plan = plan_cpu(
                cfg.data.num_workers, cfg.get("cpu_threads"), _processes(trainer.devices)
            )
            cfg.data.num_workers = plan.workers
            if plan.threads is not None:
                torch.set_num_threads(plan.threads)
            _say(plan.describe(torch.get_num_threads()))
        elif cfg.data.num_workers is None:
            cores = available_cores() // _processes(trainer.devices)
            cfg.data.num_workers = auto_workers(cores)
            _say(f"megaseg: {cfg.data.num_workers} data-loader workers (--data.num_workers N)")
        if self.subcommand == "fit":
            steps, every = trainer.max_steps or -1, trainer.log_every_n_steps or 50
            if steps > 0 and every * MIN_LOGGED_STEPS > steps:
                trainer.log_every_n_steps = max(1, steps // MIN_LOGGED_STEPS)
                _say(
                    f"megaseg: logging every {trainer.log_every_n_steps} steps, not {every}: "
                    f"the run has {steps} steps"
                )

    def _instantiate_trainer(self, config: dict, callbacks: list):
        # An ExportWeights of the config's (e.g. with every_n_steps) replaces the default one.
        if any(isinstance(cb, ExportWeights) for cb in config.get("callbacks") or ()):
            defaults = self.trainer_defaults.get("callbacks") or []
            self.trainer_defaults = {
                **self.trainer_defaults,
                "callbacks": [cb for cb in defaults if not isinstance(cb, ExportWeights)],
            }
        # megaseg's step-counting bar, unless the config names a bar or turns it off
        given = config.get("callbacks") or []
        given = list(given) if isinstance(given, list | tuple) else [given]
        if config.get("enable_progress_bar") is not False and not any(
            isinstance(cb, ProgressBar) for cb in [*callbacks, *given]
        ):
            config["callbacks"] = [*given, StepProgressBar()]
        if config.get("logger") in (None, True):
            config["logger"] = default_loggers(config.get("default_root_dir") or os.getcwd())
        # Checkpoints saved atomically in their own folder, unless the config picks a CheckpointIO.
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super()._instantiate_trainer(config, callbacks)

    def _checkpoints_under_root(self) -> None:
        # Every subcommand, not only fit: otherwise test/predict resolve the folder elsewhere and
        # Lightning warns that "the dirpath has changed" when they load a checkpoint.
        root = Path(self.trainer.default_root_dir)
        for cb in self.trainer.callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
                cb.dirpath = os.path.realpath(root / "checkpoints")

    def _run_dirs(self) -> tuple[list[Path], list[Path]]:
        """The folders of this run's ``.ckpt`` files and of its exported weights."""
        ckpt = [Path(cb.dirpath) for cb in self.trainer.checkpoint_callbacks
                if isinstance(cb, ModelCheckpoint) and cb.dirpath]  # fmt: skip
        export = [cb._dir(self.trainer) for cb in self.trainer.callbacks
                  if isinstance(cb, ExportWeights)]  # fmt: skip
        return ckpt, export

    def _checked_ckpt(self, ckpt_path, model):
        """``--ckpt_path``: ``last`` resolved to the run's one last checkpoint (none: fit starts
        a new run and says so, as a job resubmitted with the same command expects; the other
        subcommands refuse), a local file checked to be complete and of this network; anything
        else as given."""
        if ckpt_path == "last":
            found = resolve_last(self._run_dirs()[0])
            if found is None:
                where = ", ".join(str(d) for d in self._run_dirs()[0]) or "the run folder"
                if self.subcommand != "fit":
                    raise RunRefused(
                        f"--ckpt_path last: no checkpoint in {where}; pass the weights to run "
                        "with --ckpt_path PATH"
                    )
                _say(f"megaseg fit: --ckpt_path last: no checkpoint in {where} yet; starting a "
                     "new run from step 0")  # fmt: skip
            ckpt_path = found
        if ckpt_path is not None and "://" not in str(ckpt_path) and Path(ckpt_path).is_file():
            check_resumable(ckpt_path, model)
        return ckpt_path

    def fit(self, model, datamodule=None, ckpt_path=None, **kwargs) -> None:
        """``trainer.fit`` holding the run folder, from the run's own checkpoint."""
        with contextlib.ExitStack() as held:
            if _is_rank_zero():  # DDP ranks > 0 run inside rank 0's fit
                held.enter_context(run_lock(self.trainer.default_root_dir))
            ckpt_path = self._checked_ckpt(ckpt_path, model)
            if ckpt_path is None and _is_rank_zero():  # a new run (also "last" with none found)
                root = Path(self.trainer.default_root_dir)
                refuse_new_run_over(root, earlier_outputs(*self._run_dirs()))
            self.trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, **kwargs)

    def validate(self, model, datamodule=None, ckpt_path=None, **kwargs) -> None:
        ckpt_path = self._checked_ckpt(ckpt_path, model)
        self.trainer.validate(model, datamodule=datamodule, ckpt_path=ckpt_path, **kwargs)

    def test(self, model, datamodule=None, ckpt_path=None, **kwargs) -> None:
        ckpt_path = self._checked_ckpt(ckpt_path, model)
        self.trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, **kwargs)

    def predict(self, model, datamodule=None, ckpt_path=None, **kwargs) -> None:
        ckpt_path = self._checked_ckpt(ckpt_path, model)
        self.trainer.predict(model, datamodule=datamodule, ckpt_path=ckpt_path, **kwargs)

    def before_fit(self) -> None:
        self._checkpoints_under_root()

    def before_validate(self) -> None:
        self._checkpoints_under_root()

    def before_test(self) -> None:
        self._checkpoints_under_root()

    def before_predict(self) -> None:
        self._checkpoints_under_root()
        # Without a writer of the user's, each batch's predictions are written as they come.
        if not any(isinstance(cb, PredictionWriter) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(PredictionWriter())

    def after_fit(self) -> None:
        self._report("fit")

    def after_validate(self) -> None:
        self._report("validate")

    def after_test(self) -> None:
        self._report("test")

    def after_predict(self) -> None:
        self._report("predict")

    def _report(self, subcommand: str) -> None:
        """The closing lines: every file or folder this run wrote to, that exists."""
        if not self.trainer.is_global_zero:
            return
        for line in written_paths(self.trainer, subcommand):
            print(line, flush=True)


def written_paths(trainer, subcommand: str) -> list[str]:
    """``["megaseg fit wrote:", "  checkpoints: ...", ...]`` for the paths that exist."""
    rows: list[tuple[str, Path]] = []
    if subcommand == "fit":
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and ckpt.dirpath:
            last = ckpt.last_model_path or ckpt.best_model_path
            rows.append(("checkpoints", Path(last) if last else Path(ckpt.dirpath)))
        for cb in trainer.callbacks:
            if isinstance(cb, ExportWeights) and cb.exported is not None:
                export = cb.exported.parent
                final = export / "final.safetensors"
                rows.append(("weights", final if final.is_file() else export))
    if subcommand == "predict":
        for cb in trainer.callbacks:
            if isinstance(cb, PredictionWriter):
                rows.append(("predictions", cb._dir(trainer)))
    for logger in trainer.loggers:
        if isinstance(logger, CSVLogger):
            rows.append(("metrics", Path(logger.log_dir) / "metrics.csv"))
    # Not trainer.log_dir: under DDP it is a collective call, and only rank 0 gets here.
    log_dir = Path(
        (trainer.loggers[0].log_dir if trainer.loggers else None) or trainer.default_root_dir
    )
    if any(isinstance(cb, SaveConfigCallback) for cb in trainer.callbacks):
        rows.append(("config", log_dir / "config.yaml"))
    rows.append(("val images", log_dir / "val_examples"))
    existing = [(name, path.resolve()) for name, path in rows if path.exists()]
    if not existing:
        return []
    width = max(len(name) for name, _ in existing) + 1
    lines = [f"megaseg {subcommand} wrote:"]
    lines += [f"  {name + ':':<{width}} {path}{os.sep if path.is_dir() else ''}"
              for name, path in existing]  # fmt: skip
    return lines


def lightning_main(argv: list[str] | None = None) -> int:
    """Run the Lightning CLI on ``argv`` (``[subcommand, --config, ...]``); returns 0.

    The thread count a CPU run sets is put back afterwards, so a caller in the same process
    (a test, a notebook) keeps its own.
    """
    if argv is not None and list(argv) == sys.argv[1:]:
        argv = None  # the command line itself: let LightningCLI read sys.argv
    quiet_third_party_notices()
    threads = torch.get_num_threads()
    command = next(iter(sys.argv[1:] if argv is None else argv), "fit")  # for error lines
    try:
        MegasegCLI(
            InContextSegModule,
            EpisodeDataModule,
            args=argv,
            trainer_defaults={
                "callbacks": [ExportWeights(), EpisodeThroughput(), sigterm := SaveOnSigterm()]
            },
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
        )
    except (RunRefused, IncompleteCheckpoint) as err:  # the message names the path
        print(f"megaseg {command}: {err}", file=sys.stderr)
        return 2
    except SIGTERMException:
        if _is_rank_zero():
            saved = (
                f"saved {sigterm.saved}; resume with the same command and --ckpt_path last"
                if sigterm.saved is not None
                else "no checkpoint saved"
            )
            print(f"megaseg {command}: stopped by SIGTERM; {saved}", file=sys.stderr, flush=True)
        return EXIT_SIGTERM
    finally:
        torch.set_num_threads(threads)
    return 0
