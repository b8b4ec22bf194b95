"""Held-out evaluation: support-size sweeps, baselines on the same draws, bootstrap intervals.

``evaluate(checkpoint_or_model, sources, ...) -> EvaluationResult`` (see :mod:`.runner`);
sources in :mod:`.sources`, the protocol in :mod:`.protocol`, baselines in :mod:`.baselines`,
intervals in :mod:`.stats`, outputs in :mod:`.report`. The command line is ``megaseg evaluate``.
"""

from megaseg.evaluation.baselines import MeanLabel, Method, ModelMethod, SupervisedUNet, random_init
from megaseg.evaluation.overlap import OverlapError, card_training_datasets
from megaseg.evaluation.protocol import Draw, DrawSet, ProtocolError, check_draw, make_draws
from megaseg.evaluation.runner import DEFAULT_METHODS, EvaluationResult, evaluate
from megaseg.evaluation.sources import (
    ArraySource,
    CorpusSource,
    EvalTask,
    Source,
    SyntheticSource,
    corpus_sources,
    folder_source,
)
from megaseg.evaluation.stats import bootstrap_ci, stratified_bootstrap_ci

__all__ = [
    "DEFAULT_METHODS",
    "ArraySource",
    "CorpusSource",
    "Draw",
    "DrawSet",
    "EvalTask",
    "EvaluationResult",
    "MeanLabel",
    "Method",
    "ModelMethod",
    "OverlapError",
    "ProtocolError",
    "Source",
    "SupervisedUNet",
    "SyntheticSource",
    "bootstrap_ci",
    "card_training_datasets",
    "check_draw",
    "corpus_sources",
    "evaluate",
    "folder_source",
    "make_draws",
    "random_init",
    "stratified_bootstrap_ci",
]
