"""One error family for everything a user can act on.

The CLI prints ``str(error)`` as a single line and exits non-zero; anything that is not a
HomebakeError is a bug in homebake and keeps its traceback.
"""

from __future__ import annotations


class HomebakeError(Exception):
    """An error caused by the user's input or environment, with what to do about it.

    ``where`` names the file (and line/field) or setting at fault; ``fix`` says what to do.
    """

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None, fix: str | None = None):
        super().__init__(message)
        self.message = message
        self.where = where
        self.fix = fix

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.fix:
            text += f" — {self.fix}"
        return " ".join(text.split())  # always one line


class ConfigError(HomebakeError):
    """A setting (CLI flag or config file field) is invalid."""


class ModelLoadError(HomebakeError):
    """A model source is missing, corrupt or unsupported."""


class UnsupportedArchitectureError(ModelLoadError):
    """The checkpoint's architecture is not one homebake's decoder implements."""


class TokenizerError(HomebakeError):
    """The tokenizer files are missing or unusable."""


class TemplateError(HomebakeError):
    """A chat template failed to render (or raised on purpose via raise_exception)."""


class DataError(HomebakeError):
    """A dataset file or example is unusable."""


class ExportError(HomebakeError):
    """An export could not be produced safely."""


class WriteError(HomebakeError):
    """An output (checkpoint, metrics, config, adapter) could not be written: disk full, permissions, a
    read-only filesystem. What was written before stays intact."""
