"""The one exception type qwen2q raises for problems a user can fix (bad paths, configs, inputs).

The CLI prints these as a single line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class Qwen2qError(Exception):
    """A user-facing error: the message names the offending value and what would be valid."""


class ConfigError(Qwen2qError):
    """config.json is not a usable Qwen2 configuration; the message names the field."""


class CheckpointError(Qwen2qError):
    """A checkpoint's files or tensors are not what its config.json describes; the message names the file or tensor."""


class OverBudget(Qwen2qError):
    """A quantized result measured over its quality budget (held-out KL above the limit); nothing was installed."""

    def __init__(self, measured: float, bound: float, limit: float):
        super().__init__(f"the result's held-out KL {measured:.5f} (95% upper bound {bound:.5f}) is over the limit "
                         f"{limit:.5f}; nothing was written")
        self.measured, self.bound, self.limit = measured, bound, limit
