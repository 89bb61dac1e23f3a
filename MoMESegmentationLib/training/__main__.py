"""``python -m MoMESegmentationLib.training CONFIG [...]``: the ``mome train`` command.

Multi-GPU: ``torchrun --nproc_per_node 8 -m MoMESegmentationLib.training CONFIG``.
"""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
