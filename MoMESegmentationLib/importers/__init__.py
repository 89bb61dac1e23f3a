"""Importers for public third-party weights.

* :mod:`.universal_model` -- the CLIP-Driven Universal Model release -> a MoME checkpoint
  (``mome import universal-model FILE.pth``);
* :mod:`.monai_swin` -- MONAI's self-supervised Swin UNETR weights -> a MoME backbone
  (``mome train --init-backbone FILE``);
* :mod:`.legacy_swin` -- the pre-MONAI-1.5 Swin patch merging those weights were trained with (part
  of the network: :mod:`MoMESegmentationLib.model.legacy_merging`, re-exported);
* :mod:`.safe_load` -- ``.pth`` files are read with ``torch.load(weights_only=True)`` only.

Submodules are imported on use, so ``import MoMESegmentationLib.importers`` stays light.
"""

from __future__ import annotations

__all__ = ["IMPORTERS"]

#: ``mome import NAME FILE``: registry name -> ``module:function`` that converts the file.
IMPORTERS: dict[str, str] = {
    "universal-model": "MoMESegmentationLib.importers.universal_model:import_universal_model",
}
