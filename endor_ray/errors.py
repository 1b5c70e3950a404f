"""Exceptions a user can cause. Each message says what happened and what to check.

The CLI prints an `EndorError` as one line and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class EndorError(Exception):
    """Base class for errors caused by input, configuration or a damaged store."""


class FormatError(EndorError):
    """An encoded tensor is inconsistent (wrong sizes, bad offsets, unknown layout)."""


class StoreError(EndorError):
    """A store cannot be created, found or read."""


class ChecksumError(StoreError):
    """A tensor's bytes do not match the checksum recorded in the manifest."""


class UnsupportedModelError(EndorError):
    """The checkpoint's architecture or layout is not one endor-ray handles."""


class ConfigError(EndorError):
    """An option or argument is out of range."""
