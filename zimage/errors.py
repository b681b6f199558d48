"""The errors zimage raises on purpose. Each carries a message meant for the user, as is."""


class ZImageError(Exception):
    """Base class. The CLI prints the message (no traceback) and exits with `exit_code`."""

    exit_code = 1


class UsageError(ZImageError, ValueError):
    """Bad user input: a value out of range, an unknown choice. `param` names the offending field."""

    exit_code = 2

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ModelNotFoundError(ZImageError):
    """No model folder at any of the places looked."""


class ModelFolderError(ZImageError):
    """A model folder that exists but is incomplete or damaged (missing part, truncated file, bad shape)."""


class WriteError(ZImageError):
    """An output file could not be written (disk full, quota, read-only file system, no permission). The message
    names the file and the reason; nothing half-written is left behind."""


class DeviceError(ZImageError):
    """A device that is not there, or a dtype it cannot run."""


class GenerationCancelled(ZImageError):
    """The caller cancelled a generation; raised at the next step boundary."""


class NonFiniteOutputError(ZImageError):
    """The model produced NaN/inf (for example fp16 overflow); no image is written."""
