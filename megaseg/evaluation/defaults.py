"""Defaults of the evaluation, in a module without torch: ``megaseg evaluate --help`` shows
them without importing the evaluation stack."""

DEFAULT_SUPPORT_SIZES = (1, 2, 4, 8, 16, 32, 64)
DEFAULT_DRAWS_PER_N = 5
DEFAULT_METHODS = ("megaseg", "mean_label", "supervised", "random_init")
# The supervised baseline trains a U-Net from scratch for every support set: tens of seconds
# each on a CPU, hours for the default sweep, so `megaseg evaluate` runs it on a CPU only when
# asked for by name.
CPU_COSTLY_METHODS = ("supervised",)
DEFAULT_SUPERVISED_STEPS = 300
DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95


def default_methods(device_type: str) -> tuple[str, ...]:
    """The methods `megaseg evaluate` runs when --methods is not given, on a device of this
    type ("cpu", "cuda", ...): all of them, less :data:`CPU_COSTLY_METHODS` on a CPU."""
    if device_type == "cpu":
        return tuple(m for m in DEFAULT_METHODS if m not in CPU_COSTLY_METHODS)
    return DEFAULT_METHODS
