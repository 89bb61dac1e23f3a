"""Data for tests, training and demos: procedural CT phantoms and the bundled real sample CT.

Import the submodules directly (``from MoMESegmentationLib.data.phantoms import make_phantom``);
this package imports nothing heavy on its own.
"""

from __future__ import annotations

__all__ = ["phantoms", "sample"]
