"""Inference: from a volume and typed prompts to masks on exactly the input's grid.

Data flow (one path for every run)::

    Volume (LPS, any grid)
      -> ROI crop (optional) -> canonicalize (axis permutation/flips only)
      -> resample to the model spacing -> HU window to [0, 1] -> body crop      (Preprocessed)
      -> MONAI sliding windows: model.encode(window)  (prompt-free, cached per window)
                                model.decode(features, prompt embeddings [K, T])
      -> Gaussian blending of logits -> back through body crop, spacing, orientation, ROI
      -> per-prompt sigmoid, uncertain volume (0.3 < p < 0.7), threshold, size/confidence check,
         optional largest component
      -> SegmentationResult (masks, label map, per-structure summary)

The image features of the last volume are cached per window, so a new prompt on the same volume
reruns only the router and the heads. A full run takes exactly the same code path (the cache is
simply empty), so both give the same masks.

This module imports only numpy, torch and MONAI at load time, so the engine runs on a bare GPU
machine; file formats are handled by :mod:`MoMESegmentationLib.io` at the edges.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import Cancelled, CheckpointError, InputError, MoMEError, PromptError
from .io.volume import Volume
from .windows import PAD_MODES, pad_to_window, truncated_sides, valid_window_mask

__all__ = [
    "CancelToken",
    "ProgressCallback",
    "PromptPlan",
    "StructureResult",
    "SegmentationResult",
    "Segmenter",
    "UNCERTAIN_LOW",
    "UNCERTAIN_HIGH",
    "resolve_device",
    "resolve_precision",
    "PRECISIONS",
    "check_ct_like",
    "FeatureCache",
]

logger = logging.getLogger(__name__)

#: ``progress(fraction in [0, 1], stage, message)``
ProgressCallback = Callable[[float, str, str], None]

#: Logit given to voxels outside the processed region (sigmoid ~ 2e-9).
_OUTSIDE_LOGIT = -20.0

#: Voxels above this (HU) count as body when cropping to the body.
BODY_HU = -500.0

#: A voxel is uncertain for a structure when its probability lies strictly between these two:
#: ``StructureResult.uncertain_ml`` is the volume of such voxels, where a reviewer should look first.
UNCERTAIN_LOW = 0.3
UNCERTAIN_HIGH = 0.7

#: Fast mode's spacing, relative to the model's. It must stay inside the zoom range the recipes train
#: with (+-20 %): on the bundled CT the demo weights take 13 s instead of 48 s on 2 CPU cores at 1.2x
#: with the same mean Dice (0.83), while 1.5x (6 s) loses the left kidney (Dice 0.01).
FAST_SPACING_FACTOR = 1.2

#: Arithmetic of the network (``Segmenter(precision=...)``, or ``$MOME_PRECISION``):
#:
#: * ``"auto"``: bfloat16 autocast on a CUDA GPU that has it (else float16), and on a CPU with native
#:   bfloat16 instructions (AVX512-BF16 or AMX); float32 on other CPUs;
#: * ``"fp32"``: float32 throughout;
#: * ``"bf16"``: bfloat16 autocast (CPU or GPU), image features cached in bfloat16;
#: * ``"fp16"``: float16 autocast (GPU only).
#:
#: On the bundled CT with the demo weights, bf16 masks agree with float32 ones to a Dice of at least
#: 0.99 per structure (``Testing/Python/test_fast_paths.py``). On the 2-core AMD EPYC (AVX512-BF16)
#: build machine bf16 runs the demo 1.17x faster than float32 (a window's encode 1.34x) and halves
#: the feature cache; int8 dynamic quantisation of the Swin linear layers was no faster and is not
#: offered (``benchmarks/RESULTS.md``, CPU inference paths).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class CancelToken:
    """Set from any thread; the engine checks it between sliding windows."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled by the user")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` picks the first CUDA GPU when there is one, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise MoMEError(f"device '{device}' not understood: use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise MoMEError(f"device '{device}' requested but no CUDA GPU is available (use --device cpu)")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise MoMEError(f"device '{device}' does not exist: {torch.cuda.device_count()} CUDA GPU(s) found")
    return resolved


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), where bf16 autocast pays."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return any(check() for check in checks if check is not None)
    except RuntimeError:
        return False


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """The arithmetic a run on ``device`` uses: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (see :data:`PRECISIONS`)."""
    import os

    wanted = str(precision or os.environ.get("MOME_PRECISION") or "auto").strip().lower()
    if wanted not in PRECISIONS:
        raise MoMEError(f"precision '{precision}' not understood: use one of {', '.join(PRECISIONS)}")
    if wanted == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
    if wanted == "fp16" and device.type != "cuda":
        raise MoMEError("precision fp16 needs a CUDA GPU; on the CPU use bf16 or fp32")
    return wanted


def _intensity_problem(volume: Volume) -> tuple[bool, str] | None:
    """``(not_ct, message)`` when the intensities are not those of CT in Hounsfield units.

    ``not_ct`` is True when the scan has no air or fat at all (an MR, a rescaled image), False for
    an advisory (an unusual range); None when the intensities look like CT.
    """
    values = volume.array
    if values.size > 2_000_000:  # a regular subsample is plenty for percentiles
        step = int(math.ceil((values.size / 2_000_000) ** (1 / 3)))
        values = values[::step, ::step, ::step]
    values = np.asarray(values, dtype=np.float32)
    p1, p50, p99 = np.percentile(values, [1, 50, 99])
    name = volume.name or "input"
    if p1 > -200:
        return True, (f"{name}: intensities do not look like CT in Hounsfield units (1st percentile {p1:.0f}, "
                      "no air or fat); is this an MR or a rescaled image?")
    if p1 < -3000 or p99 > 10000:
        return False, f"{name}: intensity range {p1:.0f}..{p99:.0f} is unusual for CT in Hounsfield units."
    return None


def check_ct_like(volume: Volume) -> str | None:
    """Return a warning when the intensities do not look like CT in Hounsfield units (e.g. MR)."""
    return _intensity_warning(_intensity_problem(volume))


def _intensity_warning(problem: tuple[bool, str] | None) -> str | None:
    if problem is None:
        return None
    not_ct, message = problem
    return f"{message} Results will be unreliable." if not_ct else message


@dataclass
class PromptPlan:
    """What one typed prompt became: the structure it names and the embedding the heads get."""

    prompt: str  # as typed (after parsing)
    structure_id: str | None  # vocabulary id of the matched (or nearest) structure
    name: str  # segment name shown to the user
    similarity: float  # 1.0 for a vocabulary match; cosine similarity for free text
    exact: bool  # True when the prompt names a known structure
    embedding: torch.Tensor  # [T]
    color: tuple[int, int, int] = (128, 174, 128)
    terminology: dict | None = None


@dataclass
class StructureResult:
    """Per-structure outcome of a run (one per prompt, in prompt order).

    Every figure is on the input grid (voxel volume from the input's spacing), from the same
    probabilities the mask is thresholded from:

    * ``volume_ml``, ``voxels``: the final mask (after the largest component); 0 when not found.
    * ``mean_probability``: the mean probability over the voxels of the mask the rules judged (after
      the largest component). For a found structure that is its final mask. For one that is not
      found it is the mask a rule rejected (the final mask is empty), so that a confident mask the
      anatomy guard refused shows as confident; 0.0 when no voxel reached the threshold.
    * ``uncertain_ml``: the volume of the voxels whose probability lies strictly between
      :data:`UNCERTAIN_LOW` and :data:`UNCERTAIN_HIGH`, inside and outside the mask, for every
      structure, found or not (inside the ROI when there is one: outside it the probability is 0).
    """

    label: int  # value in the label map (1-based, prompt order)
    prompt: str
    id: str | None
    name: str
    match: str | None
    similarity: float
    found: bool
    color: tuple[int, int, int]
    terminology: dict | None
    volume_ml: float
    mean_probability: float
    voxels: int
    note: str = ""  # why a structure is not found, for users
    #: which rule made it not found: "empty", "size", "confidence", or the anatomy guard's
    #: "region", "position", "volume" (see :mod:`MoMESegmentationLib.anatomy`); "" when found
    rule: str = ""
    uncertain_ml: float = 0.0

    def to_json(self) -> dict:
        return {
            "label": self.label, "name": self.name, "id": self.id, "prompt": self.prompt, "match": self.match,
            "similarity": round(float(self.similarity), 4), "found": self.found,
            "terminology": self.terminology, "color": list(self.color),
            "volume_ml": round(float(self.volume_ml), 3), "mean_probability": round(float(self.mean_probability), 4),
            "uncertain_ml": round(float(self.uncertain_ml), 3),
            "voxels": int(self.voxels), "note": self.note, "rule": self.rule,
        }


@dataclass
class SegmentationResult:
    """Masks and summary on exactly the input's grid.

    ``masks[k]`` is a boolean ``(I, J, K)`` array for ``structures[k]``; structures keep their own
    masks, so nested structures survive. ``labelmap`` puts every found structure into one array
    (value ``structures[k].label``), overlaps going to the higher probability.
    """

    reference: Volume  # the input volume's grid (its array is the input itself)
    structures: list[StructureResult]
    masks: list[np.ndarray]
    probabilities: list[np.ndarray] | None = None  # float32 per structure, when requested
    labelmap: np.ndarray | None = None
    warnings: list[str] = field(default_factory=list)
    model: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    #: the anatomy guard's reading of the scan (None when the guard was off)
    coverage: dict | None = None
    #: sliding windows whose image features were computed ("encoded") or taken from the cache of
    #: the same volume's earlier run ("reused"): a new prompt on the same volume encodes none
    feature_windows: dict = field(default_factory=dict)
    #: the router's maps and per-structure expert usage, with ``explain`` (:mod:`.explain`)
    explanation: object | None = None

    def labelmap_volume(self) -> Volume:
        return self.reference.with_array(self.labelmap, name="labels")

    def summary(self, input_path: str | None = None) -> dict:
        structures = [s.to_json() for s in self.structures]
        extra = {}
        if self.explanation is not None:
            routing = self.explanation.routing_json()
            for entry in structures:
                entry["routing"] = routing.get(entry["label"])
            extra["explain"] = self.explanation.to_json()
        return {
            "model": self.model,
            "input": input_path or self.reference.name,
            "prompts": [s.prompt for s in self.structures],
            "structures": structures,
            "warnings": list(self.warnings),
            "anatomy_guard": self.coverage is not None,
            "coverage": self.coverage,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
            "feature_windows": dict(self.feature_windows),
            **extra,
        }

    def to_segmentation(self):
        """The result as a :class:`~MoMESegmentationLib.io.segmentation.Segmentation` (found structures)."""
        from .io.segmentation import Segment, Segmentation

        segments = [
            Segment(name=s.name, mask=m, color=tuple(c / 255.0 for c in s.color), label_value=s.label,
                    terminology=s.terminology, id=s.id or f"prompt_{s.label}")
            for s, m in zip(self.structures, self.masks) if s.found
        ]
        return Segmentation(reference=self.reference, segments=segments)


@dataclass
class Preprocessed:
    """The network input and everything needed to undo preprocessing exactly."""

    image: torch.Tensor  # [1, 1, D, H, W] windowed to [0, 1], cropped to the body box
    canonical_record: object
    resample_record: object
    resampled_shape: tuple[int, int, int]
    body_box: tuple[slice, slice, slice]  # in the resampled grid
    fingerprint: str
    #: ``(before, after)`` voxels added per axis so that the image spans at least one window
    #: (:func:`~MoMESegmentationLib.windows.pad_to_window`); ``image`` is padded, ``body_box`` is not.
    padding: tuple[tuple[int, int], ...] = ((0, 0), (0, 0), (0, 0))

    @property
    def unpadded(self) -> tuple[slice, slice, slice]:
        """The index box of the body-cropped image inside the padded ``image``."""
        return tuple(slice(before, n - after) for (before, after), n in
                     zip(self.padding, self.image.shape[2:]))  # type: ignore[return-value]


class FeatureCache:
    """Prompt-free image features of one volume, per sliding window (:meth:`Segmenter.using_features`)."""

    def __init__(self) -> None:
        self.fingerprint: str | None = None
        self.windows: dict[tuple[int, ...], object] = {}

    def reset(self, fingerprint: str) -> None:
        if fingerprint != self.fingerprint:
            self.windows.clear()
            self.fingerprint = fingerprint

    def clear(self) -> None:
        self.windows.clear()
        self.fingerprint = None

    @property
    def nbytes(self) -> int:
        return sum(getattr(f, "nbytes", 0) for f in self.windows.values())


class Segmenter:
    """Load a MoME checkpoint once, then segment many volumes and prompts.

    Args:
        model: registry name (``"demo"``) or path of a ``.safetensors`` checkpoint.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        threads: CPU threads for torch (``None`` leaves torch's default).
        sw_batch_size: windows per forward pass; ``None`` chooses from free GPU memory (1 on CPU).
        overlap: sliding-window overlap; ``None`` uses the checkpoint's setting.
        cache_features: keep the last volume's image features for fast new prompts.
        store: folder of downloaded/imported models (default ``~/.mome/models``).
        precision: ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"`` (:data:`PRECISIONS`); ``None``
            reads ``$MOME_PRECISION``, else ``"auto"``.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        device: str | torch.device | None = "auto",
        *,
        threads: int | None = None,
        sw_batch_size: int | None = None,
        overlap: float | None = None,
        cache_features: bool = True,
        store: Path | None = None,
        vocabulary=None,
        precision: str | None = None,
    ) -> None:
        from .checkpoint import load_checkpoint
        from .registry import resolve_model

        if threads is not None:
            torch.set_num_threads(max(1, int(threads)))
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.model_name = str(model or "demo")
        self.checkpoint_path = resolve_model(model, store)
        loaded = load_checkpoint(self.checkpoint_path, device=self.device)
        self.model = loaded.model.eval()
        self.meta: dict = loaded.meta
        self.structures: list[str] = list(self.meta.get("structures", []))
        table = loaded.structure_embeddings
        self.structure_embeddings = None if table is None else table.float().cpu()
        self.free_text = bool(self.meta.get("accepts_free_text", False))
        prep = self.meta.get("preprocessing", {})
        self.spacing = tuple(float(s) for s in prep.get("spacing", (1.5, 1.5, 1.5)))
        intensity = prep.get("intensity") or {}
        self.window = tuple(float(v) for v in intensity.get("window", (-175.0, 250.0)))
        self.architecture = dict(self.meta.get("architecture", {}).get("config", {}))
        self.patch_size = tuple(int(p) for p in prep.get("patch_size", self.architecture.get("patch_size", (96,) * 3)))
        self.overlap = float(overlap if overlap is not None else prep.get("overlap", 0.5))
        self.threshold = float(prep.get("threshold", 0.5))
        self.sw_batch_size = sw_batch_size
        self.cache_features = cache_features
        # Scans shorter than a window are padded as the model was trained (MoMESegmentationLib.windows):
        # checkpoints from before slab training (the bundled demo weights, imported models) saw air
        # padding with norms over the whole window, and are worse on slabs with mirror + masks.
        padding = prep.get("padding") or {}
        self.pad_mode = str(padding.get("mode", "constant"))
        if self.pad_mode not in PAD_MODES:
            raise CheckpointError(f"{self.checkpoint_path}: unknown padding mode {self.pad_mode!r}")
        self.mask_padding = bool(padding.get("mask_valid", False))  # norms/global pool skip the padding
        self._cache = FeatureCache()
        #: windows encoded / reused by the last :meth:`predict_logits` (see SegmentationResult)
        self.feature_windows = {"encoded": 0, "reused": 0}
        self._vocabulary = vocabulary
        self._text_encoder = None
        if self.structure_embeddings is None and not self.free_text:
            raise CheckpointError(f"{self.checkpoint_path}: checkpoint has neither structure embeddings "
                                  "nor a text encoder")

    # ------------------------------------------------------------------ prompts
    @property
    def vocabulary(self):
        if self._vocabulary is None:
            from .vocabulary import Vocabulary

            self._vocabulary = Vocabulary.load()
        return self._vocabulary

    @property
    def text_encoder(self):
        """The checkpoint's text encoder, loaded on first use (only free-text prompts need it)."""
        if self._text_encoder is None:
            from .text import TextEncoder

            info = dict(self.meta.get("text_encoder") or {})
            if not info:
                raise PromptError("this model only knows its own structures and has no text encoder")
            kwargs = {k: info[k] for k in ("pooling", "normalize", "template") if k in info}
            self._text_encoder = TextEncoder(info.get("name", info.get("model")), **kwargs)
        return self._text_encoder

    def model_info(self) -> dict:
        return {
            "name": self.model_name,
            "checkpoint": str(self.checkpoint_path),
            "sha256": self.meta.get("weights", {}).get("sha256"),
            "variant": self.meta.get("architecture", {}).get("variant"),
            "structures": len(self.structures),
            "free_text": self.free_text,
            "device": str(self.device),
            "precision": self.precision,
        }

    def _nearest_known(self, text: str) -> tuple[str, float]:
        """Nearest structure of the model to a free-text prompt, by cosine similarity of embeddings."""
        embedding = self.text_encoder.encode([text]).float().cpu()
        similarity = torch.nn.functional.cosine_similarity(embedding, self.structure_embeddings, dim=-1)
        index = int(similarity.argmax())
        return self.structures[index], float(similarity[index])

    def plan_prompts(self, prompts: str | Sequence[str]) -> list[PromptPlan]:
        """Parse and resolve prompts into embeddings; raises :class:`PromptError` with a clear message."""
        from .vocabulary import parse_prompts

        texts = parse_prompts(prompts) if isinstance(prompts, str) else [p for p in (
            t.strip() for t in prompts) if p]
        if not texts:
            raise PromptError("empty prompt: type one or more structures, e.g. 'liver, spleen, left kidney'")
        allowed = None if self.free_text else set(self.structures)
        similarity = self._nearest_known if (self.free_text and self.structure_embeddings is not None) else None
        try:
            matches = self.vocabulary.resolve(texts, allowed=allowed, similarity=similarity)
        except PromptError as error:
            raise PromptError(f"{error}{self._suggest_other_models(texts)}") from None
        plans: list[PromptPlan] = []
        seen: set[str] = set()
        for match in matches:
            key = match.structure_id if match.exact else f"text:{match.prompt.lower()}"
            if key in seen:
                continue
            seen.add(key)
            plans.append(self._plan_one(match))
        return plans

    def _suggest_other_models(self, texts: Sequence[str]) -> str:
        """``"; known to model(s) X"`` for a structure this model lacks but another registered model has."""
        from .registry import suggest_models

        for text in texts:
            for structure in self.vocabulary.lookup(text):
                if structure.id not in self.structures:
                    others = [m for m in suggest_models(structure.id) if m != self.model_name]
                    if others:
                        return f"; {structure.name} is known to model(s): {', '.join(others)}"
        return ""

    def _plan_one(self, match) -> PromptPlan:
        structure = match.structure
        if match.exact and structure is not None:
            if structure.id in self.structures and self.structure_embeddings is not None:
                embedding = self.structure_embeddings[self.structures.index(structure.id)]
            elif self.free_text:
                embedding = self.text_encoder.encode([structure.name]).float().cpu()[0]
            else:
                raise PromptError(f"prompt '{match.prompt}': model '{self.model_name}' does not know "
                                  f"{structure.name}")
            return PromptPlan(match.prompt, structure.id, structure.name, 1.0, True, embedding,
                              tuple(structure.color), structure.terminology)
        if not self.free_text:
            nearest = structure.name if structure is not None else match.structure_id
            raise PromptError(f"prompt '{match.prompt}' is not a structure of model '{self.model_name}'; "
                              f"nearest: {nearest}")
        embedding = self.text_encoder.encode([match.prompt]).float().cpu()[0]
        color = tuple(structure.color) if structure is not None else (128, 174, 128)
        return PromptPlan(match.prompt, match.structure_id, match.prompt, float(match.similarity), False,
                          embedding, color, None)

    # ------------------------------------------------------------- preprocessing
    def preprocess(self, volume: Volume, fast: bool = False) -> Preprocessed:
        """Canonical orientation, model spacing, HU window and body crop; exactly invertible."""
        from .io.geometry import canonicalize, resample_to_spacing

        canonical, canonical_record = canonicalize(volume, "RAS")
        spacing = self.grid_spacing(fast)
        resampled, resample_record = resample_to_spacing(
            canonical.with_array(canonical.array.astype(np.float32, copy=False)), spacing, mode="linear")
        hu = np.asarray(resampled.array, dtype=np.float32)
        body_box = _body_box(hu > BODY_HU, margin=4)
        low, high = self.window
        image = np.clip((hu[body_box] - low) / (high - low), 0.0, 1.0)
        # A scan shorter than a window is padded as training pads it (see MoMESegmentationLib.windows).
        image, padding = pad_to_window(image, self.patch_size, truncated_sides(image > 0), self.pad_mode)
        tensor = torch.from_numpy(np.ascontiguousarray(image))[None, None]
        digest = hashlib.blake2b(tensor.numpy().tobytes(), digest_size=16)
        # Features depend on the masking of padded voxels too (model.masked_norm).
        digest.update(repr((tensor.shape, spacing, str(self.checkpoint_path), self.mask_padding,
                            self.precision)).encode())
        return Preprocessed(tensor, canonical_record, resample_record, tuple(hu.shape), body_box,
                            digest.hexdigest(), padding)

    # --------------------------------------------------------------- inference
    def _choose_batch(self) -> int:
        if self.sw_batch_size:
            return int(self.sw_batch_size)
        if self.device.type != "cuda":
            return 1
        free, _total = torch.cuda.mem_get_info(self.device)
        feature_size = int(self.architecture.get("feature_size", 48))
        # About 1.6 GB of activations per 96^3 window at feature size 48 in half precision.
        per_window = 1.6e9 * (feature_size / 48) * (math.prod(self.patch_size) / 96 ** 3)
        return int(max(1, min(8, (0.5 * free) // per_window)))

    def _autocast(self):
        if self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(self.device.type, dtype=dtype)
        return torch.autocast(self.device.type, enabled=False)

    @torch.inference_mode()
    def predict_logits(
        self,
        prep: Preprocessed,
        embeddings: torch.Tensor,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
        *,
        with_gates: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Blended logits ``[K, D, H, W]`` (float32, on the stitching device) on the body-cropped model grid.

        Windows whose features are cached skip the backbone; the rest run ``encode`` and are cached.
        On CUDA out-of-memory the batch is halved and stitching moves to the CPU.

        With ``with_gates`` also the router's gates ``[K, E, D, H, W]``, blended like the logits (a
        weighted average of gates that sum to 1, so they still do): ``(logits, gates)``. The logits
        are the same either way.
        """
        from monai.inferers import sliding_window_inference

        if self.cache_features:
            self._cache.reset(prep.fingerprint)
        else:
            self._cache.clear()
        self.feature_windows = {"encoded": 0, "reused": 0}
        embeddings = embeddings.to(self.device, torch.float32)
        batch = self._choose_batch()
        stitch_device = self.device
        while True:
            try:
                return self._sliding_window(sliding_window_inference, prep, embeddings, batch, stitch_device,
                                            progress, cancel, with_gates)
            except torch.cuda.OutOfMemoryError:
                self._cache.clear()
                torch.cuda.empty_cache()
                if batch == 1 and stitch_device.type == "cpu":
                    raise MoMEError("out of GPU memory even with one window at a time; use --device cpu") from None
                batch = max(1, batch // 2)
                stitch_device = torch.device("cpu")
                logger.warning("CUDA out of memory; retrying with %d window(s) per batch and CPU stitching", batch)

    def _sliding_window(self, sliding_window_inference, prep, embeddings, batch, stitch_device, progress, cancel,
                        with_gates=False):
        total = _count_windows(prep.image.shape[2:], self.patch_size, self.overlap)
        done = [0]
        model = self.model

        def predictor(window: torch.Tensor, coords) -> torch.Tensor:
            if cancel is not None:
                cancel.raise_if_cancelled()
            keys = [tuple(int(s.start) for s in c[2:]) for c in coords]
            with self._autocast():
                missing = [i for i, k in enumerate(keys) if k not in self._cache.windows]
                self.feature_windows["encoded"] += len(missing)
                self.feature_windows["reused"] += len(keys) - len(missing)
                if missing:
                    valid = valid_window_mask([coords[i] for i in missing], prep.unpadded, window.device) \
                        if self.mask_padding and any(any(p) for p in prep.padding) else None
                    fresh = model.encode(window[missing], valid)
                    for j, i in enumerate(missing):
                        item = fresh[j:j + 1] if hasattr(fresh, "__getitem__") else fresh
                        self._cache.windows[keys[i]] = item
                features = _cat_features([self._cache.windows[k] for k in keys])
                if with_gates:
                    logits, gates = model.decode(features, embeddings, return_gates=True)
                else:
                    logits = model.decode(features, embeddings)
            if not self.cache_features:
                for k in keys:
                    self._cache.windows.pop(k, None)
            done[0] += len(keys)
            if progress is not None:
                progress(min(1.0, done[0] / max(total, 1)), "inference", f"window {done[0]}/{total}")
            if with_gates:  # [B, K, E, D, H, W] -> [B, K * E, D, H, W]: stitched like any other output
                return logits.float(), gates.float().flatten(1, 2)
            return logits.float()

        image = prep.image.to(self.device)
        out = sliding_window_inference(
            image, self.patch_size, batch, predictor, overlap=self.overlap, mode="gaussian",
            sw_device=self.device, device=stitch_device, with_coord=True,
        )
        if with_gates:
            logits, gates = out
            k = logits.shape[1]
            return logits[0].float(), gates[0].float().reshape(k, -1, *gates.shape[2:])
        return out[0].float()

    # ----------------------------------------------------------------- public
    def segment(
        self,
        volume: Volume,
        prompts: str | Sequence[str],
        roi: np.ndarray | Sequence | None = None,
        *,
        probabilities: bool = False,
        largest_component: bool = False,
        fast: bool = False,
        min_volume_ml: float = 0.1,
        min_confidence: float = 0.6,
        anatomy_guard: bool = True,
        explain: bool = False,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> SegmentationResult:
        """Segment ``volume`` for ``prompts``; the result lies on exactly the input's grid.

        Args:
            volume: CT in Hounsfield units (any orientation, spacing and direction).
            prompts: ``"liver, spleen, left kidney"`` or a list of prompts.
            roi: optional box ``[[x0, y0, z0], [x1, y1, z1]]`` in LPS millimetres; only voxels
                inside are segmented (the rest of the output is empty).
            probabilities: also return per-structure probability maps (float32).
            largest_component: keep only the largest connected component of each structure.
            fast: coarser spacing (:data:`FAST_SPACING_FACTOR` times the model's) for quicker CPU runs.
            min_volume_ml, min_confidence: a mask smaller than this, or whose mean probability is
                below this, is reported as not found.
            anatomy_guard: refuse input that is not CT, and report as not found (with the rule and
                the reason) a mask that the scan's field of view or the structure's priors make
                implausible, e.g. a liver in a head CT (:mod:`MoMESegmentationLib.anatomy`). Turn it
                off for unusual anatomy (children, situs anomalies, transplants).
            explain: also return the router's maps and per-structure expert usage
                (``SegmentationResult.explanation``, :mod:`MoMESegmentationLib.explain`). The masks
                are the same either way; without it none of this is computed.
            progress: ``progress(fraction, stage, message)`` callback.
            cancel: a :class:`CancelToken` checked between windows.
        """
        report = progress or (lambda fraction, stage, message: None)
        timings: dict[str, float] = {}
        start = time.perf_counter()
        _validate_volume(volume)
        plans = self.plan_prompts(prompts)
        warnings = []
        problem = _intensity_problem(volume)
        if problem is not None and problem[0] and anatomy_guard:
            raise InputError(f"{problem[1]} Refused; turn the anatomy guard off to segment it anyway.")
        warning = _intensity_warning(problem)
        if warning:
            logger.warning(warning)
            warnings.append(warning)
        coverage = None
        if anatomy_guard:
            from .anatomy import describe, estimate_coverage

            coverage = estimate_coverage(volume)
            logger.info("%s: %s", volume.name or "input", describe(coverage))
        report(0.0, "preprocessing", "preparing the volume")
        box = _roi_box(volume, roi) if roi is not None else tuple(slice(0, n) for n in volume.shape)
        # The network needs a whole window of real anatomy around a small ROI: the global feature that
        # conditions its heads is pooled over the window, and zero padding instead of context makes it
        # miss organs. Segment the ROI with its surroundings, keep only the voxels inside it.
        context = _context_box(volume, box, self.window_extent_mm(fast)) if roi is not None else box
        sub = _crop(volume, context)
        prep = self.preprocess(sub, fast=fast)
        timings["preprocess"] = time.perf_counter() - start

        t0 = time.perf_counter()
        embeddings = torch.stack([p.embedding for p in plans])
        explanation = None
        if explain:
            from .explain import SINGLE_EXPERT_NOTE, Explanation, expert_infos

            explanation = Explanation(expert_infos(self.model.config.expert_scales))
            if len(explanation.experts) == 1:
                explanation.note = SINGLE_EXPERT_NOTE
                logger.warning("explain: %s", SINGLE_EXPERT_NOTE)
        with_gates = explanation is not None and len(explanation.experts) > 1
        out = self.predict_logits(
            prep, embeddings, lambda f, s, m: report(0.05 + 0.85 * f, s, m), cancel, with_gates=with_gates)
        logits, gates = out if with_gates else (out, None)
        timings["inference"] = time.perf_counter() - t0
        if cancel is not None:
            cancel.raise_if_cancelled()

        t0 = time.perf_counter()
        report(0.9, "postprocessing", "resampling to the input grid")
        post = logits.device
        structures, masks, probs = [], [], []
        best = torch.zeros(volume.shape, dtype=torch.float32, device=post)
        labelmap = torch.zeros(volume.shape, dtype=torch.int32, device=post)
        inner = tuple(slice(b.start - c.start, b.stop - c.start) for b, c in zip(box, context))
        touching = None if roi is None else _roi_voxels(volume, roi, box)
        touching = None if touching is None else torch.from_numpy(touching).to(post)
        for index, plan in enumerate(plans):
            if cancel is not None:
                cancel.raise_if_cancelled()
            full = torch.zeros(volume.shape, dtype=torch.float32, device=post)
            full[box] = self._to_input_grid(logits[index], prep, sub.shape)[inner]
            if touching is not None:
                full[box] *= touching
            uncertain = int(((full > UNCERTAIN_LOW) & (full < UNCERTAIN_HIGH)).sum())
            mask = full >= self.threshold
            if largest_component and bool(mask.any()):
                mask = torch.from_numpy(_largest_component(mask.cpu().numpy())).to(post)
            voxels = int(mask.sum())
            volume_ml = voxels * volume.voxel_volume_ml
            mean_prob = float(full[mask].mean()) if voxels else 0.0
            rule, note = _size_rule(voxels, volume_ml, mean_prob, min_volume_ml, min_confidence)
            if not rule and coverage is not None:
                verdict = self._guard(plan, mask, volume, coverage)
                if verdict is not None:
                    rule, note = verdict.rule, verdict.reason
            found = not rule
            if gates is not None:
                self._explain_one(explanation, gates[index], prep, sub.shape, volume.shape, box, inner, touching,
                                  mask, index + 1, found)
            if not found:
                mask = torch.zeros_like(mask)
            label = index + 1
            take = mask & (full > best)
            labelmap[take] = label
            best[take] = full[take]
            structures.append(StructureResult(
                label=label, prompt=plan.prompt, id=plan.structure_id, name=plan.name,
                match=plan.structure_id, similarity=plan.similarity, found=found, color=plan.color,
                terminology=plan.terminology, volume_ml=volume_ml if found else 0.0,
                mean_probability=mean_prob, voxels=voxels if found else 0, note=note, rule=rule,
                uncertain_ml=uncertain * volume.voxel_volume_ml))
            masks.append(mask.cpu().numpy())
            if probabilities:
                probs.append(full.cpu().numpy())
            del full, take  # one structure's full-size probabilities at a time, not two
        labelmap = labelmap.cpu().numpy().astype(np.uint8 if len(plans) < 256 else np.uint16)
        timings["postprocess"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - start
        report(1.0, "done", f"{sum(s.found for s in structures)} of {len(structures)} structures found")
        return SegmentationResult(reference=volume, structures=structures, masks=masks,
                                  probabilities=probs if probabilities else None, labelmap=labelmap,
                                  warnings=warnings, model=self.model_info(), timings=timings,
                                  coverage=None if coverage is None else _coverage_json(coverage),
                                  feature_windows=dict(self.feature_windows), explanation=explanation)

    def _explain_one(self, explanation, gates: torch.Tensor, prep: Preprocessed, sub_shape, shape, box, inner,
                     touching, mask: torch.Tensor, label: int, found: bool) -> None:
        """One prompt's gates ``[E, ...]`` on the model grid -> its maps and routing on the input grid."""
        from .explain import gate_maps, structure_routing

        # Not computed (outside the body crop) is gate 0 for every expert: after linear interpolation
        # the gates' sum tells computed voxels (sum 1) from the rest (explain.gate_maps).
        restored = self._restore(gates, prep, sub_shape, outside=0.0)
        full = torch.zeros((gates.shape[0], *shape), dtype=torch.float32, device=gates.device)
        full[(slice(None), *box)] = restored[(slice(None), *inner)]
        del restored
        if touching is not None:
            full[(slice(None), *box)] *= touching
        full = full.cpu().numpy()
        dominant, entropy, computed = gate_maps(full)
        explanation.dominant.append(dominant)
        explanation.entropy.append(entropy)
        explanation.routing.append(structure_routing(full, mask.cpu().numpy(), label, found, computed=computed))

    def _guard(self, plan: PromptPlan, mask: torch.Tensor, volume: Volume, coverage):
        """The anatomy guard's verdict on one found mask (free-text prompts have no priors)."""
        from .anatomy import check_structure

        structure = self.vocabulary.get(plan.structure_id) if plan.exact and plan.structure_id else None
        return check_structure(structure, mask.cpu().numpy(), volume, coverage)

    def grid_spacing(self, fast: bool = False) -> tuple[float, ...]:
        """The spacing the network runs at: the model's, or :data:`FAST_SPACING_FACTOR` times it."""
        return tuple(s * FAST_SPACING_FACTOR for s in self.spacing) if fast else self.spacing

    def window_extent_mm(self, fast: bool = False) -> float:
        """The longest side of one sliding window in millimetres."""
        return float(max(p * s for p, s in zip(self.patch_size, self.grid_spacing(fast))))

    def _to_input_grid(self, logits: torch.Tensor, prep: Preprocessed, shape: tuple[int, ...]) -> torch.Tensor:
        """One structure's logits on the model grid -> probabilities on the (ROI-cropped) input grid.

        Runs on the device that holds ``logits`` (the GPU when stitching fitted there).
        """
        return torch.sigmoid(self._restore(logits[None], prep, shape, outside=_OUTSIDE_LOGIT)[0])

    @staticmethod
    def _restore(values: torch.Tensor, prep: Preprocessed, shape: tuple[int, ...], outside: float) -> torch.Tensor:
        """Channels ``[C, ...]`` on the body-cropped model grid -> ``[C, *shape]`` on the (ROI-cropped) input
        grid: back through the body crop (``outside`` beyond it), the spacing (linear) and the orientation."""
        from .io.geometry import resample_back, restore_from_canonical

        grid = torch.full((values.shape[0], *prep.resampled_shape), outside, dtype=torch.float32,
                          device=values.device)
        grid[(slice(None), *prep.body_box)] = values[(slice(None), *prep.unpadded)]
        restored = restore_from_canonical(resample_back(grid, prep.resample_record, mode="linear"),
                                          prep.canonical_record)
        if tuple(restored.shape[1:]) != tuple(shape):
            raise RuntimeError(f"internal error: restored shape {tuple(restored.shape[1:])} != input shape {shape}")
        return restored

    def clear_cache(self) -> None:
        self._cache.clear()

    @property
    def feature_cache(self) -> FeatureCache:
        """The image features the next run reuses (those of the last volume segmented)."""
        return self._cache

    @contextmanager
    def using_features(self, cache: FeatureCache):
        """Segment with ``cache`` as the feature cache, then put the previous one back.

        A server that keeps one cache per session swaps them in around each job, so a new prompt on a
        session's volume reuses that session's features whatever ran in between::

            with segmenter.using_features(session_cache):
                result = segmenter.segment(volume, prompts)
        """
        previous, self._cache = self._cache, cache
        try:
            yield cache
        finally:
            self._cache = previous


# ---------------------------------------------------------------------- helpers
def _validate_volume(volume: Volume) -> None:
    name = volume.name or "input volume"
    if volume.array.ndim != 3:
        raise InputError(f"{name}: expected a 3D volume, got shape {volume.array.shape}")
    if min(volume.shape) < 2:
        raise InputError(f"{name}: volume of shape {volume.shape} is too small to segment")
    if not np.issubdtype(volume.array.dtype, np.number):
        raise InputError(f"{name}: voxel type {volume.array.dtype} is not numeric")
    if np.issubdtype(volume.array.dtype, np.floating) and not np.isfinite(volume.array).all():
        raise InputError(f"{name}: volume contains NaN or infinite voxels")


def _size_rule(voxels: int, volume_ml: float, mean_prob: float, min_volume_ml: float,
               min_confidence: float) -> tuple[str, str]:
    """``(rule, note)`` when a mask is empty, too small or not confident enough; ``("", "")`` otherwise."""
    if voxels == 0:
        return "empty", "no voxels above threshold"
    if volume_ml < min_volume_ml:
        return "size", f"smaller than {min_volume_ml:g} mL ({volume_ml:.2f} mL)"
    if mean_prob < min_confidence:
        return "confidence", f"mean probability {mean_prob:.2f} below {min_confidence:g}"
    return "", ""


def _coverage_json(coverage) -> dict:
    from .anatomy import describe

    return {
        "description": describe(coverage),
        "regions": list(coverage.regions),
        "possible": list(coverage.possible),
        "extents_mm": {k: [round(float(a), 1), round(float(b), 1)] for k, (a, b) in coverage.extents.items()},
        "evidence": list(coverage.evidence),
    }


def _body_box(inside: np.ndarray, margin: int = 4) -> tuple[slice, slice, slice]:
    """Bounding box of the body mask ``inside`` plus a margin; the whole grid if empty."""
    if not inside.any():
        return tuple(slice(0, n) for n in inside.shape)  # type: ignore[return-value]
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(inside.any(axis=other))
        box.append(slice(max(0, int(present[0]) - margin), min(inside.shape[axis], int(present[-1]) + 1 + margin)))
    return tuple(box)  # type: ignore[return-value]


def _roi_box(volume: Volume, roi) -> tuple[slice, slice, slice]:
    """Index box of the voxels inside an LPS box ``[[x0, y0, z0], [x1, y1, z1]]``."""
    corners = np.asarray(roi, dtype=np.float64)
    if corners.shape != (2, 3) or not np.isfinite(corners).all():
        raise InputError(f"ROI must be two LPS corners [[x0, y0, z0], [x1, y1, z1]] in mm, got {roi!r}")
    low, high = np.minimum(corners[0], corners[1]), np.maximum(corners[0], corners[1])
    box_corners = np.array([[x, y, z] for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])])
    index = volume.physical_to_index(box_corners)
    start = np.maximum(np.floor(index.min(axis=0) + 0.5), 0).astype(int)
    stop = np.minimum(np.ceil(index.max(axis=0) + 0.5), volume.shape).astype(int)
    if np.any(stop - start < 2):
        raise InputError(f"ROI {corners.tolist()} does not overlap {volume.name or 'the volume'}")
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))  # type: ignore[return-value]


def _roi_voxels(volume: Volume, roi, box: tuple[slice, slice, slice]) -> np.ndarray | None:
    """Which voxels of the ROI's index ``box`` touch the LPS box ``roi``; None when all of them do.

    A voxel touches the ROI when its extent (the LPS-aligned box around it) overlaps the ROI. The
    index box holds exactly these voxels when the volume's axes follow LPS; an oblique volume's index
    box also holds voxels outside the ROI, up to centimetres away.
    """
    if np.allclose(np.abs(volume.direction).max(axis=0), 1.0, atol=1e-6):
        return None
    corners = np.asarray(roi, dtype=np.float64)
    low, high = np.minimum(corners[0], corners[1]), np.maximum(corners[0], corners[1])
    half = 0.5 * np.abs(volume.direction) @ volume.spacing
    j, k = np.meshgrid(np.arange(box[1].start, box[1].stop), np.arange(box[2].start, box[2].stop), indexing="ij")
    inside = np.empty([s.stop - s.start for s in box], dtype=bool)
    for n, i in enumerate(range(box[0].start, box[0].stop)):  # one slice at a time bounds the memory
        points = volume.index_to_physical(np.stack([np.full(j.shape, i), j, k], axis=-1))
        inside[n] = np.all((points + half > low) & (points - half < high), axis=-1)
    return inside


def _context_box(volume: Volume, box: tuple[slice, slice, slice], extent_mm: float) -> tuple[slice, slice, slice]:
    """``box`` grown (centred, clipped to the volume) to at least ``extent_mm`` along every axis."""
    out = []
    for s, n, spacing in zip(box, volume.shape, volume.spacing):
        size = max(s.stop - s.start, min(n, int(math.ceil(extent_mm / float(spacing)))))
        start = min(max(0, (s.start + s.stop - size) // 2), n - size)
        out.append(slice(start, start + size))
    return tuple(out)  # type: ignore[return-value]


def _crop(volume: Volume, box: tuple[slice, slice, slice]) -> Volume:
    if all(s.start == 0 and s.stop == n for s, n in zip(box, volume.shape)):
        return volume
    start = np.array([s.start for s in box], dtype=np.float64)
    origin = volume.index_to_physical(start)
    return Volume(volume.array[box], volume.spacing.copy(), origin, volume.direction.copy(), volume.name)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def _count_windows(shape: Sequence[int], patch: Sequence[int], overlap: float) -> int:
    count = 1
    for size, window in zip(shape, patch):
        size = max(size, window)
        interval = max(int(window * (1 - overlap)), 1)
        count *= int(math.ceil((size - window) / interval)) + 1 if size > window else 1
    return count


def _cat_features(items: list):
    if len(items) == 1:
        return items[0]
    return type(items[0]).cat(items)
