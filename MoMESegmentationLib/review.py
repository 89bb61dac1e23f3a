"""Label review: where the model and an existing segmentation of one structure disagree, worst first.

Given a CT, an existing segmentation of a structure (drawn by hand, from another tool, from an earlier
run) and the model's probability for the same structure on the same grid, the voxels where they
disagree are split into connected regions of two kinds:

* ``"adds"``: the model says yes (``p >= threshold``), the label says no: the label may miss tissue;
* ``"removes"``: the label says yes, the model says no (``p < threshold``): the label may hold a
  spurious part.

Each region gets its volume, bounding box, centroid (voxel indices and LPS millimetres), mean
probability and a **score = volume (mL) x confidence**, where the confidence is the region's mean
``p`` for ``"adds"`` and mean ``1 - p`` for ``"removes"``; regions are ranked by score, largest
first, so a reviewer sees the large, confident disagreements before the small, doubtful ones.

Choices, stated once:

* Regions are **26-connected** (voxels touching by a face, an edge or a corner belong together), so
  a thin, staircase-shaped disagreement along an oblique surface stays one region instead of
  breaking into many small pieces that would each fall under the size limit.
* Regions smaller than :data:`DEFAULT_MIN_ML` (0.5 mL, about a sphere of 1 cm) are dropped: at CT
  resolution smaller ones are mostly one-voxel boundary noise.
* Optionally (``tolerance_mm``), disagreement within that distance of the label's boundary is
  ignored, so that regions are not dominated by a rim where the two outlines differ by a voxel.

:func:`disagreement_regions` and :func:`apply_region` need only numpy and scipy. :func:`review_case`
reads the files and runs the model (torch, imported when called); :func:`write_case_report` and
:func:`render_region` write the JSON, CSV and PNG outputs; :func:`register` adds ``mome review``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError, MoMEError, PromptError

__all__ = [
    "ADDS",
    "REMOVES",
    "CONNECTIVITY",
    "DEFAULT_MIN_ML",
    "DEFAULT_TOP",
    "CaseReview",
    "Region",
    "apply_region",
    "case_name",
    "cmd_review",
    "dice",
    "disagreement_masks",
    "disagreement_regions",
    "pair_cases",
    "pick_segment",
    "register",
    "render_region",
    "review_case",
    "run_review",
    "write_case_report",
]

logger = logging.getLogger(__name__)

#: The model finds the structure where the label does not.
ADDS = "adds"
#: The label holds the structure where the model does not.
REMOVES = "removes"
KINDS = (ADDS, REMOVES)
#: Neighbourhood of the connected regions (see the module docstring).
CONNECTIVITY = 26
#: Regions smaller than this (mL) are dropped.
DEFAULT_MIN_ML = 0.5
#: PNGs written per case by ``mome review``.
DEFAULT_TOP = 10

#: Colours of the PNGs (RGB in 0..1): the label's outline and the two kinds of region.
LABEL_COLOUR = (1.0, 1.0, 0.0)  # yellow
KIND_COLOUR = {ADDS: (1.0, 0.0, 1.0), REMOVES: (0.0, 1.0, 1.0)}  # magenta, cyan
KIND_TEXT = {ADDS: "model adds", REMOVES: "model removes"}

#: Suffixes stripped from file names to get a case name (longest first).
IMAGE_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Columns of ``regions.csv`` and ``cases.csv``.
REGION_COLUMNS = ("rank", "kind", "voxels", "volume_ml", "mean_probability", "confidence", "score",
                  "centroid_x_lps", "centroid_y_lps", "centroid_z_lps",
                  "centroid_i", "centroid_j", "centroid_k",
                  "bbox_i0", "bbox_j0", "bbox_k0", "bbox_i1", "bbox_j1", "bbox_k1", "png")
CASE_COLUMNS = ("rank", "case", "status", "disagreement_ml", "adds_ml", "removes_ml", "regions", "score_sum",
                "dice", "label_ml", "model_ml", "ct", "seg", "segment", "report", "message")


# --------------------------------------------------------------------------------------------
# Regions (numpy and scipy only)
# --------------------------------------------------------------------------------------------


@dataclass
class Region:
    """One connected region where the model and the label disagree.

    Attributes:
        kind: :data:`ADDS` (model yes, label no) or :data:`REMOVES` (label yes, model no).
        voxels: number of voxels.
        volume_ml: volume in millilitres (voxels times the voxel volume from the spacing).
        bbox: inclusive voxel bounding box ``((i0, j0, k0), (i1, j1, k1))``.
        centroid_index: mean voxel index ``(i, j, k)``.
        centroid_lps: the centroid in LPS millimetres, or None when no grid geometry was given.
        mean_probability: the model's mean probability over the region.
        confidence: mean ``p`` for "adds", mean ``1 - p`` for "removes".
        score: ``volume_ml * confidence``; regions are ranked by it.
        rank: 1 for the highest score.
        mask: the region's voxels inside ``bbox`` (boolean, the bounding box's shape).
    """

    kind: str
    voxels: int
    volume_ml: float
    bbox: tuple[tuple[int, int, int], tuple[int, int, int]]
    centroid_index: tuple[float, float, float]
    centroid_lps: tuple[float, float, float] | None
    mean_probability: float
    confidence: float
    score: float
    rank: int = 0
    mask: np.ndarray = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        """The bounding box as array slices."""
        low, high = self.bbox
        return tuple(slice(a, b + 1) for a, b in zip(low, high))  # type: ignore[return-value]

    def full_mask(self, shape: Sequence[int]) -> np.ndarray:
        """The region as a boolean array of the whole grid ``shape``."""
        out = np.zeros(tuple(shape), dtype=bool)
        out[self.slices] = self.mask
        return out

    def to_json(self) -> dict:
        return {
            "rank": self.rank, "kind": self.kind, "voxels": int(self.voxels),
            "volume_ml": round(float(self.volume_ml), 4),
            "mean_probability": round(float(self.mean_probability), 4),
            "confidence": round(float(self.confidence), 4), "score": round(float(self.score), 4),
            "centroid_index": [round(float(c), 2) for c in self.centroid_index],
            "centroid_lps": (None if self.centroid_lps is None
                             else [round(float(c), 2) for c in self.centroid_lps]),
            "bbox": [list(self.bbox[0]), list(self.bbox[1])],
        }


def _geometry(spacing) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray] | None]:
    """``(spacing, index_to_physical or None)`` from three numbers or a :class:`Volume`-like grid."""
    if hasattr(spacing, "spacing") and hasattr(spacing, "index_to_physical"):
        return np.asarray(spacing.spacing, dtype=np.float64).reshape(3), spacing.index_to_physical
    values = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if values.shape != (3,) or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"spacing must be three positive numbers (mm) or a Volume, got {spacing!r}")
    return values, None


def _check_inputs(label_mask, probability, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    label = np.asarray(label_mask).astype(bool, copy=False)
    prob = np.asarray(probability)
    if label.ndim != 3 or prob.shape != label.shape:
        raise ValueError(f"label {label.shape} and probability {prob.shape} must be 3D arrays of one shape")
    if not np.issubdtype(prob.dtype, np.floating):
        prob = prob.astype(np.float32)
    if not np.isfinite(prob).all() or prob.min(initial=0.0) < -1e-6 or prob.max(initial=0.0) > 1 + 1e-6:
        raise ValueError("probability must be finite and within [0, 1]")
    if not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    return label, prob


def _near_boundary(label: np.ndarray, candidates: np.ndarray, spacing: np.ndarray, tolerance_mm: float,
                   inside: bool) -> np.ndarray:
    """Candidate voxels within ``tolerance_mm`` (between voxel centres) of the label's other side.

    ``inside=False``: candidates outside the label, distance to the nearest label voxel; ``inside=True``:
    candidates inside it, distance to the nearest voxel outside.
    """
    from scipy import ndimage

    if not candidates.any():
        return candidates
    target = label if not inside else ~label  # the voxels to measure the distance to
    if not target.any():
        return np.zeros_like(candidates)
    # Every voxel within the tolerance of a candidate lies in the candidates' box grown by `reach`.
    reach = np.ceil(tolerance_mm / spacing).astype(int) + 1
    low, high = [], []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(candidates.any(axis=others))
        low.append(max(0, int(present[0]) - int(reach[axis])))
        high.append(min(label.shape[axis], int(present[-1]) + 1 + int(reach[axis])))
    box = tuple(slice(a, b) for a, b in zip(low, high))
    sub_target = target[box]
    if not sub_target.any():  # the nearest target voxel is farther than the tolerance
        return np.zeros_like(candidates)
    distance = ndimage.distance_transform_edt(~sub_target, sampling=spacing)
    out = np.zeros_like(candidates)
    out[box] = candidates[box] & (distance <= tolerance_mm)
    return out


def disagreement_masks(label_mask: np.ndarray, probability: np.ndarray, spacing, threshold: float = 0.5,
                       *, tolerance_mm: float = 0.0) -> dict[str, np.ndarray]:
    """``{"adds": mask, "removes": mask}``: the voxels where model and label disagree (see the module)."""
    label, prob = _check_inputs(label_mask, probability, threshold)
    spacing_mm, _ = _geometry(spacing)
    model = prob >= threshold
    masks = {ADDS: model & ~label, REMOVES: label & ~model}
    if tolerance_mm > 0:
        masks[ADDS] &= ~_near_boundary(label, masks[ADDS], spacing_mm, tolerance_mm, inside=False)
        masks[REMOVES] &= ~_near_boundary(label, masks[REMOVES], spacing_mm, tolerance_mm, inside=True)
    return masks


def _regions_of(kind: str, mask: np.ndarray, prob: np.ndarray, spacing: np.ndarray, to_physical,
                min_ml: float) -> list[Region]:
    from scipy import ndimage

    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count == 0:
        return []
    where = np.nonzero(components)
    ids = components[where]
    voxels = np.bincount(ids, minlength=count + 1)
    p_sum = np.bincount(ids, weights=prob[where].astype(np.float64), minlength=count + 1)
    centre_sum = np.stack([np.bincount(ids, weights=w, minlength=count + 1) for w in where], axis=1)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    boxes = ndimage.find_objects(components)
    regions = []
    for n in range(1, count + 1):
        volume_ml = float(voxels[n]) * voxel_ml
        if volume_ml < min_ml:
            continue
        mean_p = float(p_sum[n] / voxels[n])
        confidence = mean_p if kind == ADDS else 1.0 - mean_p
        centre = centre_sum[n] / voxels[n]
        box = boxes[n - 1]
        bbox = (tuple(int(s.start) for s in box), tuple(int(s.stop) - 1 for s in box))
        regions.append(Region(
            kind=kind, voxels=int(voxels[n]), volume_ml=volume_ml, bbox=bbox,  # type: ignore[arg-type]
            centroid_index=tuple(float(c) for c in centre),  # type: ignore[arg-type]
            centroid_lps=None if to_physical is None else tuple(float(c) for c in to_physical(centre)),
            mean_probability=mean_p, confidence=confidence, score=volume_ml * confidence,
            mask=components[box] == n))
    return regions


def disagreement_regions(label_mask: np.ndarray, probability: np.ndarray, spacing, threshold: float = 0.5,
                         min_ml: float = DEFAULT_MIN_ML, *, tolerance_mm: float = 0.0) -> list[Region]:
    """Connected regions where the model and the label disagree, highest score first.

    Args:
        label_mask: the existing segmentation of one structure, boolean ``(I, J, K)``.
        probability: the model's probability of the same structure on the same grid, in [0, 1].
        spacing: voxel size ``(si, sj, sk)`` in mm, or a :class:`~MoMESegmentationLib.io.volume.Volume`
            (anything with ``spacing`` and ``index_to_physical``) whose grid also gives the centroids
            in LPS millimetres; with plain numbers ``centroid_lps`` is None.
        threshold: the model says yes where ``p >= threshold``.
        min_ml: regions smaller than this (mL) are dropped (default :data:`DEFAULT_MIN_ML`).
        tolerance_mm: ignore disagreement within this distance (mm, between voxel centres) of the
            label's boundary; 0 counts every voxel.

    Returns:
        :class:`Region` records, 26-connected, sorted by score (then volume) descending, ranked from 1.
    """
    masks = disagreement_masks(label_mask, probability, spacing, threshold, tolerance_mm=tolerance_mm)
    return _ranked(masks, probability, spacing, min_ml)


def _ranked(masks: dict[str, np.ndarray], probability: np.ndarray, spacing, min_ml: float) -> list[Region]:
    spacing_mm, to_physical = _geometry(spacing)
    prob = np.asarray(probability)
    regions = [region for kind in KINDS
               for region in _regions_of(kind, masks[kind], prob, spacing_mm, to_physical, min_ml)]
    regions.sort(key=lambda r: (-r.score, -r.voxels, r.kind, r.bbox))
    for rank, region in enumerate(regions, start=1):
        region.rank = rank
    return regions


def apply_region(label_mask: np.ndarray, region_mask, kind: str | None = None) -> np.ndarray:
    """Accept the model's version of one region: a new label with its voxels added or removed.

    Args:
        label_mask: boolean ``(I, J, K)``; not modified.
        region_mask: boolean array of the same shape, or a :class:`Region`.
        kind: :data:`ADDS` or :data:`REMOVES`; defaults to the region's kind for a :class:`Region`.
    """
    label = np.asarray(label_mask).astype(bool)  # a copy
    if isinstance(region_mask, Region):
        kind = kind or region_mask.kind
        region_mask = region_mask.full_mask(label.shape)
    region = np.asarray(region_mask).astype(bool, copy=False)
    if region.shape != label.shape:
        raise ValueError(f"region mask {region.shape} and label {label.shape} must have one shape")
    if kind == ADDS:
        label |= region
    elif kind == REMOVES:
        label &= ~region
    else:
        raise ValueError(f"kind must be {ADDS!r} or {REMOVES!r}, got {kind!r}")
    return label


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(a & b)) / total


# --------------------------------------------------------------------------------------------
# One case: read, run the model, compare
# --------------------------------------------------------------------------------------------


@dataclass
class CaseReview:
    """The review of one case: its regions, totals and the arrays the pictures need."""

    name: str
    ct: str
    seg: str
    prompt: str
    structure_id: str | None
    structure_name: str
    segment: str  # the segment of the label file that was compared
    threshold: float
    min_ml: float
    tolerance_mm: float
    regions: list[Region]
    totals: dict
    warnings: list[str] = field(default_factory=list)
    model: dict = field(default_factory=dict)
    fast: bool = False
    volume: Any = field(default=None, repr=False)  # the CT (Volume)
    label: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    probability: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]

    def to_json(self) -> dict:
        return {
            "case": self.name, "ct": self.ct, "seg": self.seg, "prompt": self.prompt,
            "structure": {"id": self.structure_id, "name": self.structure_name}, "segment": self.segment,
            "threshold": self.threshold, "min_ml": self.min_ml, "tolerance_mm": self.tolerance_mm,
            "connectivity": CONNECTIVITY, "fast": self.fast, "totals": self.totals, "warnings": list(self.warnings),
            "model": self.model, "regions": [r.to_json() for r in self.regions],
        }


def case_name(path: str | os.PathLike, strip_channel: bool = False) -> str:
    """A file's case name: its name without the image suffix (``case1.seg.nrrd`` -> ``case1``).

    With ``strip_channel`` a trailing nnU-Net channel suffix ``_0000`` goes too (``case1_0000.nii.gz``).
    """
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    if strip_channel and re.search(r"_0000$", name) and len(name) > 5:
        name = name[:-5]
    return name


def _plan_single(segmenter, prompt: str):
    """The one structure a review prompt names; :class:`PromptError` for none or several."""
    plans = segmenter.plan_prompts(prompt)
    if len(plans) != 1:
        names = ", ".join(p.name for p in plans)
        raise PromptError(f"prompt '{prompt}' names {len(plans)} structures ({names}); "
                          "review one structure at a time")
    return plans[0]


def _summary_table(path: Path) -> dict | None:
    """The label table of a label map written by ``mome segment`` (its JSON summary beside it)."""
    beside = path.with_name(case_name(path) + ".json")
    if not beside.is_file():
        return None
    try:
        data = json.loads(beside.read_text(encoding="utf-8"))
        table = {int(s["label"]): {"name": str(s["name"]), "id": s.get("id")} for s in data["structures"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return table or None


def _key(text: str) -> str:
    from .vocabulary import normalize

    return normalize(text or "") or (text or "").strip().lower()


def _code(entry: dict | None) -> tuple[str, str] | None:
    return None if not entry else (str(entry.get("scheme", "")).upper(), str(entry.get("code", "")))


def _names_structure(segment, structure, prompt: str, vocabulary) -> bool:
    """Whether a segment is the prompt's structure: by name or id (via the vocabulary) or terminology."""
    for text in (segment.name, segment.id):
        if not text:
            continue
        if structure is not None and [s.id for s in vocabulary.lookup(text)] == [structure.id]:
            return True
        if _key(text) == _key(prompt):
            return True
    terms = segment.terminology
    if structure is not None and terms and structure.terminology:
        return (_code(terms.get("type")) == _code(structure.terminology.get("type"))
                and _code(terms.get("modifier")) == _code(structure.terminology.get("modifier")))
    return False


def _names_other_structure(segment, structure, vocabulary) -> bool:
    found = [s.id for s in vocabulary.lookup(segment.name)] if segment.name else []
    return len(found) == 1 and (structure is None or found[0] != structure.id)


def pick_segment(seg, path: Path, prompt: str, structure, vocabulary, choice: str | None = None):
    """The segment of ``seg`` to compare with the prompt's structure.

    ``choice`` (``--segment``) names it by name, id or label value. Otherwise: the segment whose name,
    id (through the vocabulary's names and synonyms) or terminology is the structure's; else the file's
    only non-empty segment when its name is no other known structure.
    """
    segments = seg.segments
    listing = ", ".join(s.name for s in segments[:12]) + (", ..." if len(segments) > 12 else "")
    if choice:
        wanted = choice.strip()
        hits = [s for s in segments if wanted.lower() in (s.name.lower(), (s.id or "").lower())]
        if not hits and wanted.isdigit():
            hits = [s for s in segments if s.label_value == int(wanted)]
        if len(hits) != 1:
            raise InputError(f"{path}: {'no' if not hits else 'more than one'} segment '{wanted}' "
                             f"(segments: {listing or 'none'})")
        return hits[0]
    hits = [s for s in segments if _names_structure(s, structure, prompt, vocabulary)]
    if len(hits) > 1:
        hits = [s for s in hits if s.mask.any()] or hits[:1]
    if len(hits) > 1:
        raise InputError(f"{path}: several segments are '{prompt}' ({', '.join(s.name for s in hits)}); "
                         "choose one with --segment")
    if hits:
        return hits[0]
    filled = [s for s in segments if s.mask.any()]
    if len(filled) == 1 and not _names_other_structure(filled[0], structure, vocabulary):
        return filled[0]
    raise InputError(f"{path}: no segment is '{prompt}' (segments: {listing or 'none'}); "
                     "name it with --segment NAME or --segment LABEL_VALUE")


def review_case(
    ct_path: str | os.PathLike,
    seg_path: str | os.PathLike,
    prompt: str,
    segmenter=None,
    *,
    model: str | os.PathLike | None = None,
    device: str = "auto",
    threshold: float | None = None,
    min_ml: float = DEFAULT_MIN_ML,
    tolerance_mm: float = 0.0,
    segment: str | None = None,
    fast: bool = False,
    anatomy_guard: bool = True,
    name: str | None = None,
    progress=None,
) -> CaseReview:
    """Read a CT and its existing segmentation, run the model, and list where they disagree.

    Args:
        ct_path: CT image file or DICOM folder.
        seg_path: ``.seg.nrrd`` or label map; its grid may differ from the CT's (it is put on the CT's).
        prompt: the one structure to review, e.g. ``"liver"``.
        segmenter: a loaded :class:`~MoMESegmentationLib.engine.Segmenter` (reused across cases), or
            None to load ``model`` on ``device``.
        threshold: the model says yes where ``p >= threshold`` (default: the checkpoint's).
        min_ml, tolerance_mm: see :func:`disagreement_regions`.
        segment: which segment of ``seg_path`` to compare (name, id or label value); by default the one
            named after the prompt's structure (see :func:`pick_segment`).
        fast, anatomy_guard, progress: passed to :meth:`Segmenter.segment`.

    Raises:
        MoMEError: a missing or unreadable file, a prompt the model does not know or that names several
            structures, or no segment for the structure (one line naming the file or prompt).
    """
    from .io.readers import read_volume
    from .io.segmentation import Segmentation, align_segmentation, read_segmentation

    if segmenter is None or isinstance(segmenter, (str, os.PathLike)):
        from .engine import Segmenter

        segmenter = Segmenter(segmenter or model, device)
    plan = _plan_single(segmenter, prompt)
    structure = segmenter.vocabulary.get(plan.structure_id) if plan.structure_id else None
    ct_path, seg_path = Path(ct_path), Path(seg_path)
    if not seg_path.exists():
        raise InputError(f"{seg_path}: label file not found")
    volume = read_volume(ct_path)
    table = None if seg_path.name.lower().endswith(".seg.nrrd") else _summary_table(seg_path)
    labels = read_segmentation(seg_path, table)
    chosen = pick_segment(labels, seg_path, prompt, structure if plan.exact else None, segmenter.vocabulary,
                          segment)
    warnings = []
    if not plan.exact:
        nearest = f"nearest known structure: {structure.name}, " if structure is not None else ""
        warnings.append(f"prompt '{prompt}' names no known structure; compared as free text "
                        f"({nearest}similarity {plan.similarity:.2f})")
    had_voxels = bool(chosen.mask.any())
    if labels.reference.same_grid(volume):
        label = chosen.mask.copy()
    else:
        label = align_segmentation(Segmentation(labels.reference, [chosen]), volume).segments[0].mask
        warnings.append(f"{seg_path.name}: label grid differs from the CT's; put on the CT's grid")
    if had_voxels and not label.any():
        warnings.append(f"{seg_path.name}: segment '{chosen.name}' lies outside the CT's field of view")
    result = segmenter.segment(volume, prompt, probabilities=True, fast=fast, anatomy_guard=anatomy_guard,
                               progress=progress)
    probability = np.asarray(result.probabilities[0], dtype=np.float32)
    threshold = float(segmenter.threshold if threshold is None else threshold)
    warnings += list(result.warnings)
    masks = disagreement_masks(label, probability, volume, threshold, tolerance_mm=tolerance_mm)
    regions = _ranked(masks, probability, volume, min_ml)
    model_mask = probability >= threshold
    voxel_ml = volume.voxel_volume_ml
    status = result.structures[0]
    totals = {
        "dice": round(dice(label, model_mask), 4),
        "label_ml": round(float(label.sum()) * voxel_ml, 3),
        "model_ml": round(float(model_mask.sum()) * voxel_ml, 3),
        "adds_ml": round(float(masks[ADDS].sum()) * voxel_ml, 3),
        "removes_ml": round(float(masks[REMOVES].sum()) * voxel_ml, 3),
        "disagreement_ml": round(float(masks[ADDS].sum() + masks[REMOVES].sum()) * voxel_ml, 3),
        "regions": len(regions),
        "regions_ml": round(sum(r.volume_ml for r in regions), 3),
        "score_sum": round(sum(r.score for r in regions), 4),
        "model_found": bool(status.found),
        "model_note": status.note,
    }
    return CaseReview(
        name=name or case_name(ct_path, strip_channel=True), ct=str(ct_path), seg=str(seg_path),
        prompt=prompt,
        structure_id=plan.structure_id, structure_name=plan.name, segment=chosen.name, threshold=threshold,
        min_ml=float(min_ml), tolerance_mm=float(tolerance_mm), regions=regions, totals=totals,
        warnings=warnings, model=result.model, fast=bool(fast), volume=volume, label=label, probability=probability)


# --------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------


def _nearest_slice(present: np.ndarray, wanted: float) -> int:
    """The index with ``present`` True nearest to ``wanted`` (``wanted`` rounded when none is)."""
    hits = np.flatnonzero(present)
    if hits.size == 0:
        return int(np.clip(round(wanted), 0, present.size - 1))
    return int(hits[np.argmin(np.abs(hits - wanted))])


def render_region(review: CaseReview, region: Region, path: str | os.PathLike, canonical=None) -> Path:
    """PNG of one region: axial and coronal slices through it, whole and zoomed.

    The CT (window -175..250 HU), the label's outline in yellow and the region filled and outlined in
    magenta ("adds") or cyan ("removes"). Radiological convention: the patient's right on the screen's
    left, anterior up in axial slices, head up in coronal ones. ``canonical`` is the CT and label already
    reoriented by :func:`_canonical` (reused across a case's regions).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle

    from .io.geometry import canonicalize

    volume = review.volume
    ct_volume, label = canonical if canonical is not None else _canonical(review)
    ct = ct_volume.array
    region_mask = volume.with_array(region.full_mask(volume.shape).astype(np.uint8))
    region_c = canonicalize(region_mask, "RAS")[0].array > 0
    centre = ct_volume.physical_to_index(volume.index_to_physical(np.asarray(region.centroid_index)))
    (a0, b0, c0), (a1, b1, c1) = region.bbox
    corners = np.array([[a, b, c] for a in (a0, a1) for b in (b0, b1) for c in (c0, c1)])
    corners_c = ct_volume.physical_to_index(volume.index_to_physical(corners))
    low_c, high_c = corners_c.min(axis=0), corners_c.max(axis=0)
    z = _nearest_slice(region_c.any(axis=(0, 1)), centre[2])
    y = _nearest_slice(region_c.any(axis=(0, 2)), centre[1])
    colour = KIND_COLOUR[region.kind]
    fill = ListedColormap([colour])
    ni, nj, nk = ct.shape
    sp = ct_volume.spacing

    def zoom(a_low, a_high, a_n, a_sp, b_low, b_high, b_n, b_sp):
        """Index ranges (two canonical axes) of a window at least 80 mm and twice the region wide."""
        ranges = []
        for lo, hi, n, s in ((a_low, a_high, a_n, a_sp), (b_low, b_high, b_n, b_sp)):
            half = max(40.0, (hi - lo + 1) * s) / s
            mid = (lo + hi) / 2
            ranges.append((max(-0.5, mid - half), min(n - 0.5, mid + half)))
        return ranges

    panels = []
    # Axial: rows are j (anterior up after the flip), columns are i flipped (patient right on the left).
    axial = (ct[:, :, z].T[::-1, ::-1], label[:, :, z].T[::-1, ::-1], region_c[:, :, z].T[::-1, ::-1])
    (i0, i1), (j0, j1) = zoom(low_c[0], high_c[0], ni, sp[0], low_c[1], high_c[1], nj, sp[1])
    axial_box = (ni - 1 - i1, ni - 1 - i0, nj - 1 - j1, nj - 1 - j0)  # x0, x1, y0, y1 in display pixels
    panels.append(("axial", z, axial, sp[1] / sp[0], "upper", axial_box))
    # Coronal: rows are k (head up with origin lower), columns are i flipped.
    coronal = (ct[:, y, :].T[:, ::-1], label[:, y, :].T[:, ::-1], region_c[:, y, :].T[:, ::-1])
    (i0, i1), (k0, k1) = zoom(low_c[0], high_c[0], ni, sp[0], low_c[2], high_c[2], nk, sp[2])
    coronal_box = (ni - 1 - i1, ni - 1 - i0, k0, k1)
    panels.append(("coronal", y, coronal, sp[2] / sp[0], "lower", coronal_box))

    fig, axes = plt.subplots(2, 2, figsize=(10, 10.6), facecolor="black")
    for row, (view, index, (image, outline, highlight), aspect, origin, box) in enumerate(panels):
        for column, zoomed in enumerate((False, True)):
            ax = axes[row, column]
            ax.imshow(image, cmap="gray", vmin=-175, vmax=250, origin=origin, aspect=aspect,
                      interpolation="nearest")
            ax.imshow(np.ma.masked_equal(highlight.astype(np.uint8), 0), cmap=fill, vmin=0, vmax=1,
                      alpha=0.45, origin=origin, aspect=aspect, interpolation="nearest")
            if outline.any() and not outline.all():
                ax.contour(outline.astype(np.float32), levels=[0.5], colors=[LABEL_COLOUR], linewidths=1.2)
            if highlight.any() and not highlight.all():
                ax.contour(highlight.astype(np.float32), levels=[0.5], colors=[colour], linewidths=1.8)
            x0, x1, y0, y1 = box if zoomed else (-0.5, image.shape[1] - 0.5, -0.5, image.shape[0] - 0.5)
            ax.set_xlim(x0, x1)
            ax.set_ylim((y1, y0) if origin == "upper" else (y0, y1))
            if not zoomed:
                ax.add_patch(Rectangle((box[0], box[2]), box[1] - box[0], box[3] - box[2], fill=False,
                                       edgecolor="white", linestyle="--", linewidth=0.8))
            ax.set_title(f"{view} slice {index}{' (zoom)' if zoomed else ''}", color="white", fontsize=10)
            ax.axis("off")
    handles = [Line2D([0], [0], color=LABEL_COLOUR, lw=1.5, label=f"label ({review.segment})"),
               Patch(color=colour, label=KIND_TEXT[region.kind])]
    fig.legend(handles=handles, loc="lower center", ncol=2, frameon=False, labelcolor="white", fontsize=10)
    lps = "" if region.centroid_lps is None else "at LPS ({:.1f}, {:.1f}, {:.1f}) mm  ".format(
        *region.centroid_lps)
    fig.suptitle(f"{review.name}: {review.structure_name} #{region.rank} {KIND_TEXT[region.kind]} "
                 f"{region.volume_ml:.1f} mL, mean p {region.mean_probability:.2f}, "
                 f"score {region.score:.2f}\n{lps}(patient right on the left)", color="white", fontsize=11)
    fig.tight_layout(rect=(0, 0.04, 1, 0.94))
    path = Path(path)
    try:
        fig.savefig(path, dpi=80, facecolor="black")
    finally:
        plt.close(fig)
    return path


def _canonical(review: CaseReview):
    """The CT and the label reoriented to RAS array axes (no interpolation) for the pictures."""
    from .io.geometry import canonicalize

    volume = review.volume
    ct, _ = canonicalize(volume.with_array(np.asarray(volume.array, dtype=np.float32)), "RAS")
    label, _ = canonicalize(volume.with_array(review.label.astype(np.uint8)), "RAS")
    return ct, label.array > 0


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def _region_row(region: Region, png: str) -> dict:
    lps = region.centroid_lps or (None, None, None)
    row = {"rank": region.rank, "kind": region.kind, "voxels": region.voxels,
           "volume_ml": f"{region.volume_ml:.3f}", "mean_probability": f"{region.mean_probability:.4f}",
           "confidence": f"{region.confidence:.4f}", "score": f"{region.score:.4f}"}
    for axis, value in zip("xyz", lps):
        row[f"centroid_{axis}_lps"] = "" if value is None else f"{value:.2f}"
    for axis, value in zip("ijk", region.centroid_index):
        row[f"centroid_{axis}"] = f"{value:.2f}"
    for axis, value in zip("ijk", region.bbox[0]):
        row[f"bbox_{axis}0"] = value
    for axis, value in zip("ijk", region.bbox[1]):
        row[f"bbox_{axis}1"] = value
    row["png"] = png
    return row


def write_case_report(review: CaseReview, folder: str | os.PathLike, top: int = DEFAULT_TOP) -> list[Path]:
    """Write ``regions.json``, ``regions.csv`` and ``images/region_NN.png`` (the ``top`` regions) into
    ``folder`` (which must exist; callers stage it, see :func:`run_review`)."""
    folder = Path(folder)
    written = []
    pngs: dict[int, str] = {}
    shown = review.regions[: max(0, int(top))]
    if shown:
        images = folder / "images"
        images.mkdir(exist_ok=True)
        canonical = _canonical(review)
        for region in shown:
            name = f"images/region_{region.rank:02d}.png"
            written.append(render_region(review, region, folder / name, canonical))
            pngs[region.rank] = name
    document = review.to_json()
    for entry in document["regions"]:
        entry["png"] = pngs.get(entry["rank"])
    (folder / "regions.json").write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    with open(folder / "regions.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=REGION_COLUMNS)
        writer.writeheader()
        for region in review.regions:
            writer.writerow(_region_row(region, pngs.get(region.rank, "")))
    return [folder / "regions.json", folder / "regions.csv", *written]


def _ct_candidates(folder: Path, skip: Sequence[Path]) -> list[Path]:
    from .io.readers import SUPPORTED_SUFFIXES

    found = []
    skip_resolved = {p.resolve() for p in skip}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.resolve() in skip_resolved:
            continue
        if path.is_dir():
            found.append(path)  # a DICOM series
        elif path.name.lower().endswith(SUPPORTED_SUFFIXES + (".dcm",)) and not path.name.lower().endswith(
                ".seg.nrrd"):
            found.append(path)
    return found


def pair_cases(ct_dir: str | os.PathLike, seg_dir: str | os.PathLike, skip: Sequence[Path] = ()):
    """Pair the CTs of one folder with the labels of another by case name.

    The case name is the file name without its image suffix (:data:`IMAGE_SUFFIXES`); a CT's trailing
    nnU-Net channel suffix ``_0000`` is dropped too, and a sub-folder of the CT folder is a DICOM series
    named after the folder. ``case1.nii.gz`` (or ``case1_0000.nii.gz`` or ``case1/``) pairs with
    ``case1.seg.nrrd``, ``case1.nii.gz``, ``case1.nrrd``, ... in the label folder; files ending
    ``.seg.nrrd`` are never CTs, so both may share one folder. Hidden files are ignored.

    Returns:
        ``(pairs, ct_only, seg_only)``: ``[(case, ct, seg)]`` sorted by case, and the unpaired CTs and
        labels as ``[(case, path)]``.

    Raises:
        InputError: two CTs or two labels with one case name.
    """
    ct_dir, seg_dir = Path(ct_dir), Path(seg_dir)
    cts: dict[str, Path] = {}
    for path in _ct_candidates(ct_dir, skip=[seg_dir, *skip]):
        name = case_name(path, strip_channel=True)
        if name in cts:
            raise InputError(f"{ct_dir}: two CTs of case '{name}' ({cts[name].name}, {path.name}); keep one")
        cts[name] = path
    segs: dict[str, Path] = {}
    for path in sorted(seg_dir.iterdir()):
        if path.name.startswith(".") or path.is_dir() or not path.name.lower().endswith(IMAGE_SUFFIXES):
            continue
        if ct_dir.resolve() == seg_dir.resolve() and not path.name.lower().endswith(".seg.nrrd"):
            continue  # one folder for both: the labels are the .seg.nrrd files
        name = case_name(path)
        if name in segs:
            raise InputError(f"{seg_dir}: two labels of case '{name}' ({segs[name].name}, {path.name}); "
                             "keep one")
        segs[name] = path
    pairs = [(name, cts[name], segs[name]) for name in sorted(cts) if name in segs]
    ct_only = [(name, cts[name]) for name in sorted(cts) if name not in segs]
    seg_only = [(name, segs[name]) for name in sorted(segs) if name not in cts]
    return pairs, ct_only, seg_only


def _folder_name(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "case"
    candidate, n = base, 2
    while candidate.lower() in taken or candidate.lower() in ("cases.csv", "cases.json"):
        candidate, n = f"{base}_{n}", n + 1
    taken.add(candidate.lower())
    return candidate


def _print_regions(review: CaseReview, stream=sys.stdout, limit: int = DEFAULT_TOP) -> None:
    totals = review.totals
    print(f"{review.name}: {review.structure_name} vs '{review.segment}': Dice {totals['dice']:.3f}, "
          f"disagreement {totals['disagreement_ml']:.1f} mL (model adds {totals['adds_ml']:.1f}, "
          f"removes {totals['removes_ml']:.1f}), {totals['regions']} region(s) of at least "
          f"{review.min_ml:g} mL",
          file=stream)
    if not review.regions:
        return
    print(f"{'#':>3}  {'kind':<8} {'mL':>8} {'mean p':>7} {'score':>8}  centroid LPS mm", file=stream)
    for region in review.regions[:limit]:
        lps = "" if region.centroid_lps is None else "({:.1f}, {:.1f}, {:.1f})".format(*region.centroid_lps)
        print(f"{region.rank:>3}  {region.kind:<8} {region.volume_ml:>8.2f} {region.mean_probability:>7.2f} "
              f"{region.score:>8.2f}  {lps}", file=stream)
    if len(review.regions) > limit:
        print(f"... and {len(review.regions) - limit} more in regions.csv", file=stream)


def _check_targets(output: Path, names: Sequence[str], overwrite: bool) -> None:
    if overwrite or not output.is_dir():
        return
    for name in names:
        if (output / name).exists():
            raise InputError(f"{output / name}: already exists (use --overwrite to replace it)")


def _check_paths(ct: Path, seg: Path, output: Path) -> bool:
    """Fail early on missing inputs or an unusable output folder; True for a folder of cases."""
    for path in (ct, seg):
        if not path.exists():
            raise InputError(f"{path}: not found")
    batch = seg.is_dir()
    if batch and not ct.is_dir():
        raise InputError(f"{ct}: SEG is a folder of labels, so CT must be a folder of CTs")
    if not batch and ct.is_dir() and not any(ct.iterdir()):
        raise InputError(f"{ct}: empty folder")
    if output.exists() and not output.is_dir():
        raise InputError(f"{output}: exists and is not a folder")
    if not output.parent.is_dir():
        raise InputError(f"{output}: parent folder {output.parent} does not exist")
    return batch


def run_review(ct: str | os.PathLike, seg: str | os.PathLike, output: str | os.PathLike, prompt: str,
               segmenter, *, top: int = DEFAULT_TOP, overwrite: bool = False, quiet: bool = False,
               progress_factory=None, **options) -> int:
    """``mome review``: review one case (CT and SEG files) or a folder of cases (CT and SEG folders).

    One case writes ``OUTPUT/regions.json``, ``regions.csv`` and ``images/``; a folder writes
    ``OUTPUT/cases.csv`` and ``cases.json`` ranking the cases by disagreement, and each case's report in
    ``OUTPUT/<case>/``. Everything is staged and moved into ``OUTPUT`` only when complete. ``options``
    go to :func:`review_case`. Returns 0, or 1 when some cases of a folder failed (they are listed in
    ``cases.csv`` with the reason).
    """
    from .outputs import atomic_outputs

    ct, seg, output = Path(ct), Path(seg), Path(output)
    batch = _check_paths(ct, seg, output)
    _plan_single(segmenter, prompt)  # a bad prompt fails before any file is read
    if batch:
        pairs, ct_only, seg_only = pair_cases(ct, seg, skip=[output])
        if not pairs:
            raise InputError(f"{seg}: no label pairs with a CT in {ct} (pairing is by name: case1.nii.gz or "
                             "case1_0000.nii.gz with case1.seg.nrrd or case1.nii.gz)")
        taken: set[str] = set()
        folders = {name: _folder_name(name, taken) for name, _, _ in pairs}
        _check_targets(output, ["cases.csv", "cases.json", *folders.values()], overwrite)
    else:
        _check_targets(output, ["regions.json", "regions.csv", "images"], overwrite)
    created = not output.exists()
    output.mkdir(exist_ok=True)
    try:
        with atomic_outputs(output) as staging:
            if not batch:
                review = _review_one(ct, seg, prompt, segmenter, quiet, progress_factory, options)
                write_case_report(review, staging, top)
                if not quiet:
                    _print_regions(review)
                print(f"Wrote {output}/regions.json, regions.csv and {min(top, len(review.regions))} PNG(s)")
                return 0
            rows, failed = [], 0
            for name, ct_path, seg_path in pairs:
                folder = folders[name]
                try:
                    review = _review_one(ct_path, seg_path, prompt, segmenter, quiet, progress_factory,
                                         dict(options, name=name))
                except MoMEError as error:
                    failed += 1
                    print(f"warning: {name}: {error}", file=sys.stderr)
                    rows.append({"case": name, "status": "error", "ct": str(ct_path), "seg": str(seg_path),
                                 "message": str(error)})
                    continue
                (staging / folder).mkdir()
                write_case_report(review, staging / folder, top)
                totals = review.totals
                rows.append({"case": name, "status": "reviewed", "ct": str(ct_path), "seg": str(seg_path),
                             "segment": review.segment, "report": folder,
                             "message": "; ".join(review.warnings),
                             **{k: totals[k] for k in ("disagreement_ml", "adds_ml", "removes_ml", "regions",
                                                       "score_sum", "dice", "label_ml", "model_ml")}})
                if not quiet:
                    _print_regions(review, limit=3)
            if failed == len(pairs):
                raise MoMEError(f"{ct}: no case could be reviewed ({rows[0]['case']}: {rows[0]['message']})")
            rows.sort(key=lambda r: (r["status"] != "reviewed", -r.get("disagreement_ml", 0.0),
                                     -r.get("score_sum", 0.0), r["case"]))
            for rank, row in enumerate(rows, start=1):
                row["rank"] = rank if row["status"] == "reviewed" else ""
            for status, items in (("no label", ct_only), ("no CT", seg_only)):
                for name, path in items:
                    print(f"warning: {name}: {status} ({path})", file=sys.stderr)
                    rows.append({"case": name, "status": status, "rank": "",
                                 ("ct" if status == "no label" else "seg"): str(path)})
            with open(staging / "cases.csv", "w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=CASE_COLUMNS, restval="")
                writer.writeheader()
                writer.writerows(rows)
            (staging / "cases.json").write_text(json.dumps(
                {"prompt": prompt, "ranking": "disagreement_ml, then score_sum, descending", "cases": rows},
                indent=2) + "\n", encoding="utf-8")
            reviewed = len(pairs) - failed
            print(f"Wrote {output}/cases.csv: {reviewed} case(s) reviewed, ranked by disagreement"
                  + (f"; {failed} failed" if failed else ""))
            return 1 if failed else 0
    except BaseException:
        if created:
            shutil.rmtree(output, ignore_errors=True)
        raise


def _review_one(ct, seg, prompt, segmenter, quiet, progress_factory, options) -> CaseReview:
    bar = progress_factory(Path(ct).name) if (progress_factory is not None and not quiet) else None
    try:
        return review_case(ct, seg, prompt, segmenter, progress=bar, **options)
    finally:
        if bar is not None:
            bar.close()


def cmd_review(args: argparse.Namespace) -> int:
    from .engine import Segmenter

    if args.top < 0:
        raise InputError(f"--top {args.top}: must be 0 or more")
    if args.min_ml < 0 or args.tolerance < 0:
        raise InputError("--min-ml and --tolerance must be 0 or more")
    if args.threshold is not None and not 0.0 < args.threshold <= 1.0:
        raise InputError(f"--threshold {args.threshold}: must be in (0, 1]")
    _check_paths(Path(args.ct), Path(args.seg), Path(args.output))  # before loading the model
    segmenter = Segmenter(args.model, args.device, threads=args.threads)

    def progress_factory(description: str):
        from .cli import _ProgressBar

        return _ProgressBar(description, enabled=sys.stderr.isatty())

    return run_review(args.ct, args.seg, args.output, args.prompt, segmenter, top=args.top,
                      overwrite=args.overwrite, quiet=args.quiet, progress_factory=progress_factory,
                      threshold=args.threshold, min_ml=args.min_ml, tolerance_mm=args.tolerance,
                      segment=args.segment, fast=args.fast, anatomy_guard=args.anatomy_guard)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``review`` subcommand to the ``mome`` parser."""
    parser = subparsers.add_parser(
        "review",
        help="find where the model and an existing segmentation disagree, worst first (label correction)",
        description="Compare an existing segmentation of one structure with the model's probability and "
        "list the regions where they disagree (the model adds or removes), ranked by volume x confidence, "
        "with a PNG per region. With folders of CTs and labels (paired by file name) rank the cases too.",
    )
    parser.add_argument("ct", metavar="CT", help="CT file or DICOM folder, or a folder of CTs")
    parser.add_argument("seg", metavar="SEG", help=".seg.nrrd or label map, or a folder of them (one per CT)")
    parser.add_argument("--prompt", "-p", required=True, help="the one structure to review, e.g. liver")
    parser.add_argument("-o", "--output", required=True, help="report folder (created if missing)")
    parser.add_argument("--segment", default=None,
                        help="segment of SEG to compare (name or label value; default: the one named "
                        "after the prompt's structure)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="model probability counted as yes (default: the model's, usually 0.5)")
    parser.add_argument("--min-ml", type=float, default=DEFAULT_MIN_ML,
                        help=f"drop regions smaller than this (default {DEFAULT_MIN_ML:g} mL)")
    parser.add_argument("--tolerance", type=float, default=0.0,
                        help="ignore disagreement within this many mm of the label's boundary (default 0)")
    parser.add_argument("--top", type=int, default=DEFAULT_TOP,
                        help=f"PNGs per case for the highest-ranked regions (default {DEFAULT_TOP})")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier report in OUTPUT")
    parser.add_argument("--no-anatomy-guard", dest="anatomy_guard", action="store_false",
                        help="also review non-CT input (see mome segment --help)")
    parser.add_argument("--model", default=None, help="registry name or checkpoint path (default: demo)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--fast", action="store_true", help="coarser spacing (quicker on a CPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or table")
    parser.set_defaults(handler=cmd_review)
    return parser
