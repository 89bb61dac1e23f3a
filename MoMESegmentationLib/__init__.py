"""MoMESegmentationLib: text-prompted Mixture-of-Experts CT segmentation (MoME).

The library never imports Slicer, Qt or CTK, and importing it is cheap: heavy
modules (torch, MONAI, SimpleITK, transformers) load when first used.
"""

from __future__ import annotations

__version__ = "0.1.0"

#: Oldest Python the library runs on. 3D Slicer ships 3.12 from 5.10 on; 5.8 and older ship 3.9.
MINIMUM_PYTHON = (3, 10)


def unsupported_python_reason(version_info=None) -> str | None:
    """One line saying why this Python cannot run the library, or None when it can.

    This file and ``errors.py`` stay importable on Python 3.9, so that Slicer 5.8 shows this
    sentence instead of a syntax or type error from deep inside the network code.
    """
    version = tuple(version_info if version_info is not None else __import__("sys").version_info)[:3]
    if version[:2] >= MINIMUM_PYTHON:
        return None
    found = ".".join(str(part) for part in version)
    return (f"MoME Segmentation needs Python {MINIMUM_PYTHON[0]}.{MINIMUM_PYTHON[1]} or newer "
            f"(3D Slicer 5.10 or newer); this one runs Python {found}")

from .errors import CheckpointError, InputError, MoMEError, PromptError  # noqa: E402

__all__ = ["__version__", "MINIMUM_PYTHON", "unsupported_python_reason", "MoMEError", "InputError", "PromptError", "CheckpointError"]
