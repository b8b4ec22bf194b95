"""Held-out evaluation: support-size sweeps, baselines on the same draws, bootstrap intervals.

``evaluate(checkpoint_or_model, sources, ...) -> EvaluationResult`` (see :mod:`.runner`);
sources in :mod:`.sources`, the protocol in :mod:`.protocol`, baselines in :mod:`.baselines`,
intervals in :mod:`.stats`, outputs in :mod:`.report`. The command line is ``megaseg evaluate``.

The names below are imported on first use, so that ``megaseg.evaluation.defaults`` (what
``megaseg evaluate --help`` reads) does not pay for torch and MONAI.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "MeanLabel": "baselines",
    "Method": "baselines",
    "ModelMethod": "baselines",
    "SupervisedUNet": "baselines",
    "random_init": "baselines",
    "OverlapError": "overlap",
    "card_training_datasets": "overlap",
    "Draw": "protocol",
    "DrawSet": "protocol",
    "ProtocolError": "protocol",
    "check_draw": "protocol",
    "make_draws": "protocol",
    "DEFAULT_METHODS": "defaults",
    "EvaluationResult": "runner",
    "evaluate": "runner",
    "ArraySource": "sources",
    "CorpusSource": "sources",
    "EvalTask": "sources",
    "Source": "sources",
    "SyntheticSource": "sources",
    "corpus_sources": "sources",
    "folder_source": "sources",
    "bootstrap_ci": "stats",
    "stratified_bootstrap_ci": "stats",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
