"""Typed exceptions shared by every stage. The CLI turns each into one line and exit code 2."""


class Terminated(BaseException):
    """SIGTERM, raised where the program is (the CLI's handler) so that cleanup runs as for Ctrl-C."""


class SdtrtError(Exception):
    """Base class: a problem the user can fix (bad input, missing file, unsupported model)."""

    exit_code = 2


class UsageError(SdtrtError):
    """An argument is malformed or out of range."""


class ModelSourceError(SdtrtError):
    """The model to export cannot be found or is not a supported checkpoint."""


class UnsafeCheckpointError(ModelSourceError):
    """A pickled checkpoint was given and loading it was not explicitly allowed."""


class ManifestError(SdtrtError):
    """An engine folder's manifest.json is missing, corrupt or of an unknown schema."""


class ValidationError(SdtrtError):
    """An exported graph does not match the PyTorch module within tolerance."""


class OutputExistsError(SdtrtError):
    """The output folder exists and overwriting was not asked for."""


class NumericalError(SdtrtError):
    """A generation produced NaN/Inf (fp16 overflow, extreme guidance): refused instead of writing a black image."""


class MemoryLimitError(SdtrtError):
    """What was asked needs more memory than this machine has available: refused before it starts."""


class UnknownModel(UsageError):
    """A request names a model the server does not have (the message names the ones it has)."""

    param = "model"  # the request field, in OpenAI's error shape
