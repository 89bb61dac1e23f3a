"""Where the library finds what lives in the repository's ``Resources/`` folder.

One rule, three layouts:

1. A wheel (``pip install .``) ships ``Resources/`` as package data inside the
   package, at ``MoMESegmentationLib/_resources/``.
2. A source checkout, an editable install (``pip install -e .``) and the built
   Slicer extension keep ``Resources/`` beside the ``MoMESegmentationLib/``
   folder (the extension installs both side by side).

:func:`resources_dir` returns the first of these that exists. Callers that want
another folder (a user's model store, say) pass paths explicitly; nothing is
read from environment variables.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from .errors import MoMEError

__all__ = ["resources_dir", "resource_path"]

_PACKAGE_DIR = Path(__file__).resolve().parent
_CANDIDATES = (_PACKAGE_DIR / "_resources", _PACKAGE_DIR.parent / "Resources")


@lru_cache(maxsize=1)
def resources_dir() -> Path:
    """Return the folder that holds the vocabulary, model registry, weights and sample data."""
    for candidate in _CANDIDATES:
        if (candidate / "vocabulary.json").is_file() or (candidate / "SampleData").is_dir():
            return candidate
    raise MoMEError(
        "Resources folder not found: looked in " + ", ".join(str(c) for c in _CANDIDATES)
    )


def resource_path(*parts: str) -> Path:
    """Return ``resources_dir() / parts``; raise :class:`MoMEError` if it does not exist."""
    path = resources_dir().joinpath(*parts)
    if not path.exists():
        raise MoMEError(f"{path}: bundled resource missing (reinstall MoMESegmentation)")
    return path
