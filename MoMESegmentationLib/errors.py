"""The one exception type that user-facing code raises for user mistakes.

A :class:`MoMEError` carries a single-line message that names the file, prompt
or setting at fault and the problem, e.g. ``"scan.nii.gz: 4D image (shape 64x64x32x3);
expected a 3D volume"``. The CLI prints it without a traceback and exits with
status 2; the Slicer module shows it in a message box.
"""

from __future__ import annotations

__all__ = ["MoMEError", "InputError", "PromptError", "CheckpointError", "Cancelled"]


class MoMEError(Exception):
    """A problem the user can fix; the message is one line and self-contained."""


class InputError(MoMEError):
    """An input image, folder or label file cannot be used."""


class PromptError(MoMEError):
    """A text prompt is empty or cannot be mapped to a structure."""


class CheckpointError(MoMEError):
    """A model checkpoint is missing, unknown, unsafe or tampered with."""


class Cancelled(MoMEError):
    """The caller cancelled a running job."""
