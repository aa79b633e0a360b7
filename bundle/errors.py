"""Errors users can act on.

Every failure caused by input (a checkpoint, a bundle, a prompt, an option) is raised as a
``DymoeError`` carrying what went wrong and what to do next; the CLI prints it in two lines and
exits with status 1, never with a traceback.
"""

from __future__ import annotations


class DymoeError(Exception):
    """An error with a message and a hint for the next step."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class CheckpointError(DymoeError):
    """The source checkpoint is missing, corrupt or of an unsupported architecture."""


class BundleError(DymoeError):
    """A bundle is missing, incomplete, corrupt or was written by an incompatible version."""


class ChecksumError(BundleError):
    """A bundle file's bytes do not match the sha256 recorded in the manifest."""


class InputError(DymoeError):
    """A prompt or option is out of range (for example longer than the model's context)."""
