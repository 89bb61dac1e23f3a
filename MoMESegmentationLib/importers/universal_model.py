"""Convert the public CLIP-Driven Universal Model weights into a MoME checkpoint.

The Universal Model (Liu et al., ICCV 2023; github.com/ljwztc/CLIP-Driven-Universal-Model)
publishes ``clip_driven_universal_swin_unetr.pth`` (CC BY-NC-ND 4.0): a Swin UNETR backbone
(feature size 48, 62.19 M parameters) with CLIP-text-driven dynamic heads for 32 classes,
trained on 3,410 CT scans. Its training script saves ``{"net": state_dict, "optimizer": ...,
"scheduler": ..., "epoch": ...}`` from a DistributedDataParallel model, so names carry a
``module.`` prefix. The tensor names and shapes are listed in
``Resources/universal_model_tensors.json``.

The ``universal-model`` MoME variant has the same layout (see :mod:`MoMESegmentationLib.model.mome`)::

    Universal Model (after "module.")        MoME
    backbone.*                               backbone.*   (same MONAI SwinUNETR blocks, no `out`)
    precls_conv.{0,2}.*                      experts.0.{0,2}.*
    GAP.{0,3}.*                              global_pool.{0,3}.*
    text_to_vision.*                         text_to_vision.*
    controller.*                             head.controller.*
    organ_embedding          [32, 512]       structure embedding table (checkpoint "vocab.embeddings")

The backbone was trained with MONAI's pre-1.5 patch merging, which the converted network
reproduces (:mod:`~MoMESegmentationLib.model.legacy_merging`). Preprocessing and inference follow
the original test script:
RAS, 1.5 mm, HU window [-175, 250] -> [0, 1], 96^3 sliding windows with overlap 0.5 and Gaussian
blending, sigmoid, threshold 0.5.

The file is read with ``torch.load(weights_only=True)`` only (:mod:`.safe_load`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import DEFAULT_PREPROCESSING
from ..errors import CheckpointError
from ..resources import resource_path
from ..model.legacy_merging import LEGACY_MERGING, legacy_config_supported, use_legacy_patch_merging
from .safe_load import find_state_dict, load_weights_only, sha256_file, strip_prefix

__all__ = [
    "MODEL_NAME",
    "UNIVERSAL_MODEL_PREPROCESSING",
    "UNIVERSAL_MODEL_PROVENANCE",
    "ImportReport",
    "load_tensor_table",
    "universal_model_structures",
    "convert_state_dict",
    "build_universal_model",
    "import_universal_model",
]

logger = logging.getLogger(__name__)

#: Registry name and MoME variant of the converted model.
MODEL_NAME = "universal-model"
NUM_CLASSES = 32
EMBEDDING_KEY = "organ_embedding"

#: Preprocessing and inference settings of the original test script (test.py, dataset/dataloader.py).
#: They coincide with the project's defaults (RAS, 1.5 mm, HU window [-175, 250] -> [0, 1]).
UNIVERSAL_MODEL_PREPROCESSING: dict[str, Any] = {
    **DEFAULT_PREPROCESSING,
    "patch_size": [96, 96, 96],
    "overlap": 0.5,
    "blend": "gaussian",
    "activation": "sigmoid",
    "threshold": 0.5,
}

UNIVERSAL_MODEL_PROVENANCE: dict[str, Any] = {
    "model": "CLIP-Driven Universal Model (Swin UNETR backbone, word-embedding heads)",
    "paper": "Liu et al., CLIP-Driven Universal Model for Organ Segmentation and Tumor Detection, ICCV 2023",
    "code": "https://github.com/ljwztc/CLIP-Driven-Universal-Model",
    "source_url": "https://huggingface.co/ljwztc/CLIP-Driven-Universal-Model/resolve/main/"
    "clip_driven_universal_swin_unetr.pth",
    "license": "CC BY-NC-ND 4.0",
    "license_note": "non-commercial use only; keep the converted file for yourself, do not redistribute it",
    "training_data": "3,410 CT scans from 14 public datasets",
    "parameters": "62.19 M (Swin UNETR backbone)",
    "classes": NUM_CLASSES,
}

#: Universal Model name prefix -> MoME name prefix (first match wins; "backbone." is kept).
_PREFIX_MAP = (
    ("precls_conv.", "experts.0."),
    ("GAP.", "global_pool."),
    ("controller.", "head.controller."),
    ("text_to_vision.", "text_to_vision."),
    ("backbone.", "backbone."),
)
_DERIVED_SUFFIX = "relative_position_index"


@dataclass
class ImportReport:
    """What :func:`import_universal_model` did.

    Attributes:
        output: the written ``.safetensors`` file (its ``.json`` sits beside it).
        source: the imported ``.pth`` file.
        source_sha256: SHA-256 of the ``.pth`` file (also recorded in the checkpoint JSON).
        tensors: number of tensors converted into network weights.
        structures: the 32 structure ids, in the model's output order.
        skipped: names of the file that were checked but not stored (derived index buffers).
    """

    output: Path
    source: Path
    source_sha256: str
    tensors: int
    structures: list[str]
    skipped: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"{self.source.name} (sha256 {self.source_sha256[:12]}...) -> {self.output}: "
            f"{self.tensors} tensors, {len(self.structures)} structures"
        )


def load_tensor_table(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The public checkpoint's tensor table (``Resources/universal_model_tensors.json``).

    Returns:
        The parsed JSON: ``container`` (the state dict's key in the file), ``prefix``
        (``"module."``), ``tensors`` ``{name: shape}`` (names without the prefix) and
        ``integer_tensors`` (names stored as int64).
    """
    p = Path(path) if path is not None else resource_path("universal_model_tensors.json")
    table = json.loads(p.read_text(encoding="utf-8"))
    table["tensors"] = {k: tuple(int(s) for s in v) for k, v in table["tensors"].items()}
    return table


def universal_model_structures() -> list[str]:
    """Our structure ids of the Universal Model's 32 output channels, in channel order."""
    from ..vocabulary import Vocabulary

    classes = Vocabulary.load().universal_model_classes()
    ids = [s.id for s in classes]
    if [s.universal_model_index for s in classes] != list(range(NUM_CLASSES)):
        raise CheckpointError(f"the vocabulary does not list Universal Model classes 0..{NUM_CLASSES - 1}")
    return ids


def _to_mome_key(name: str) -> str | None:
    for old, new in _PREFIX_MAP:
        if name.startswith(old):
            return new + name[len(old) :]
    return None


def convert_state_dict(
    state: dict[str, torch.Tensor], table: dict[str, Any], source: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[str]]:
    """Check a Universal Model state dict against the tensor table and rename it for MoME.

    Args:
        state: the file's state dict (a ``module.`` prefix is removed).
        table: :func:`load_tensor_table`.
        source: file name for messages.

    Returns:
        ``(mome_state, organ_embedding [32, 512], skipped_names)``.

    Raises:
        CheckpointError: names missing, unexpected or of the wrong shape (the message names the
            first of each), or a checkpoint of another Universal Model variant.
    """
    state = strip_prefix(state, table.get("prefix", "module."))
    expected: dict[str, tuple[int, ...]] = table["tensors"]
    if "organ_embedding.weight" in state:
        raise CheckpointError(
            f"{source}: this is the Universal Model's 'rand_embedding' variant (learned class embeddings); "
            f"only the CLIP word-embedding release (clip_driven_universal_swin_unetr.pth) is supported"
        )
    if any(k.startswith("backbone.out_tr") or k.startswith("backbone.down_tr") for k in state):
        raise CheckpointError(
            f"{source}: this is the Universal Model with a U-Net backbone; only Swin UNETR is supported"
        )
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k])})"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if wrong:
        problems.append(f"{len(wrong)} of the wrong shape (e.g. {wrong[0]})")
    if problems:
        raise CheckpointError(
            f"{source}: not the CLIP-Driven Universal Model Swin UNETR checkpoint: {'; '.join(problems)}"
        )

    converted: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for name, tensor in state.items():
        if name == EMBEDDING_KEY:
            continue
        if name.endswith(_DERIVED_SUFFIX):
            skipped.append(name)
            continue
        key = _to_mome_key(name)
        if key is None:  # every table name maps; guarded above
            raise CheckpointError(f"{source}: no MoME name for {name}")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{source}: {name} is {tensor.dtype}, expected floating point")
        converted[key] = tensor.detach().to(torch.float32).contiguous()
    embedding = state[EMBEDDING_KEY].detach().to(torch.float32).contiguous()
    if not torch.isfinite(embedding).all():
        raise CheckpointError(f"{source}: organ_embedding holds non-finite values")
    return converted, embedding, skipped


def build_universal_model():
    """A randomly initialised ``universal-model`` MoME with the pre-1.5 patch merging."""
    from ..model import create_model

    overrides = {"swin_downsample": LEGACY_MERGING} if legacy_config_supported() else {}
    model = create_model(MODEL_NAME, patch_size=(96, 96, 96), **overrides)
    use_legacy_patch_merging(model)
    return model


def _check_index_buffers(
    model: torch.nn.Module, state: dict[str, torch.Tensor], skipped: list[str], source: str
) -> None:
    """The file's Swin window index tables must equal the ones the network rebuilds."""
    own = model.state_dict()
    for name in skipped:
        key = _to_mome_key(name)
        if key in own and not torch.equal(own[key].cpu(), state[name].to(own[key].dtype)):
            raise CheckpointError(f"{source}: {name} differs from the Swin window index of a 7x7x7 window")


def import_universal_model(
    source: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    store: str | os.PathLike | None = None,
    half: bool = False,
) -> ImportReport:
    """Convert ``clip_driven_universal_swin_unetr.pth`` into a MoME checkpoint.

    Args:
        source: the downloaded ``.pth`` file (read with ``weights_only=True``).
        output: the ``.safetensors`` file to write, or a folder for ``universal-model.safetensors``;
            default: the registry's place in ``store``.
        store: the model store (default ``~/.mome/models``), used when ``output`` is not given.
        half: store weights as float16 (smaller; they are cast back to float32 on load).

    Returns:
        :class:`ImportReport`.

    Raises:
        CheckpointError: the file is unsafe, unreadable or not this model.
    """
    from ..checkpoint import save_checkpoint
    from ..registry import default_store

    source = Path(source).expanduser()
    target = _output_path(output, Path(store).expanduser() if store is not None else None, default_store)
    obj = load_weights_only(source)
    state = find_state_dict(obj, source)
    table = load_tensor_table()
    prefixed = strip_prefix(state, table.get("prefix", "module."))
    converted, embedding, skipped = convert_state_dict(prefixed, table, source=str(source))
    del obj, state

    model = build_universal_model()
    _check_index_buffers(model, prefixed, skipped, str(source))
    result = model.load_state_dict(converted, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(_DERIVED_SUFFIX)]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{source}: converted weights do not fit the universal-model network "
            f"(missing {missing[:2]}, unexpected {result.unexpected_keys[:2]})"
        )
    model.eval()

    structures = universal_model_structures()
    if embedding.shape != (len(structures), model.config.text_dim):
        raise CheckpointError(
            f"{source}: organ_embedding has shape {tuple(embedding.shape)}, expected [32, 512]"
        )
    digest = sha256_file(source)
    provenance = dict(UNIVERSAL_MODEL_PROVENANCE)
    provenance.update(
        {
            "source_file": source.name,
            "source_sha256": digest,
            "source_bytes": source.stat().st_size,
            "converted_with": "mome import universal-model",
            "class_embeddings": "the checkpoint's organ_embedding (CLIP text embeddings of the class names)",
        }
    )
    from .. import __version__

    provenance["converter_version"] = __version__
    json_path = save_checkpoint(
        target,
        model,
        text_encoder=None,
        structures=structures,
        structure_embeddings=embedding,
        preprocessing=dict(UNIVERSAL_MODEL_PREPROCESSING),
        provenance=provenance,
        metrics={},
        extra={"universal_model_class_order": structures, "patch_merging": LEGACY_MERGING},
        half=half,
    )
    _record_architecture(json_path)
    report = ImportReport(target, source, digest, len(converted), structures, skipped)
    logger.info("imported %s", report)
    return report


def _output_path(output, store: Path | None, default_store) -> Path:
    from ..registry import get_entry

    if output is None:
        entry = get_entry(MODEL_NAME)
        path = entry.checkpoint_path(store or default_store())
        assert path is not None
        return path
    out = Path(output).expanduser()
    if out.suffix == ".safetensors":
        return out
    if out.suffix:
        raise CheckpointError(f"{out}: output must be a .safetensors file or a folder")
    return out / f"{MODEL_NAME}.safetensors"


def _record_architecture(json_path: Path) -> None:
    """Add ``architecture.patch_merging`` to the description (the weights' SHA-256 is unaffected)."""
    meta = json.loads(json_path.read_text(encoding="utf-8"))
    meta["architecture"]["patch_merging"] = LEGACY_MERGING
    tmp = json_path.with_name(f".{json_path.name}.tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, json_path)
