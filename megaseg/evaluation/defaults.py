"""Defaults of the evaluation, in a module without torch: ``megaseg evaluate --help`` shows
them without importing the evaluation stack."""

DEFAULT_SUPPORT_SIZES = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_DRAWS_PER_N = 5
DEFAULT_METHODS = ("megaseg", "mean_label", "supervised", "random_init")
DEFAULT_SUPERVISED_STEPS = 300
DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95
