"""Volume and segmentation I/O with exact geometry (see :mod:`.volume` for the convention)."""

from __future__ import annotations

from .volume import LPS_TO_RAS, Volume

__all__ = ["Volume", "LPS_TO_RAS"]
