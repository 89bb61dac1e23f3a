"""Label correction in the Segment Editor, without Qt: the "MoME" effect's computation and review.

Three parts, each written through the editor (:func:`~MoMESlicer.segment_editor.apply_structure`),
so the editable area, the intensity range, the overwrite mode and Undo / Redo work as for Slicer's
own effects:

- :class:`StructureProbability`: one structure's per-voxel probability on the source volume's
  grid, read from the worker's result (:func:`read_structure_result`). Every mask written from it
  is ``p >= threshold``; changing the threshold re-cuts the same probabilities (no new inference).
- :class:`LiveThreshold`: applies the structure once (one Undo step) and then re-applies it at a
  new threshold by undoing its own last step first, so a threshold slider updates the segment live
  and a single Undo still returns to the state before the effect.
- :class:`SegmentReview`: the regions where the selected segment and the model disagree
  (:func:`MoMESegmentationLib.review.disagreement_regions`), each accepted (the model's version of
  that region is written: added or erased) or rejected, and the views centred on a region.

Plus :func:`show_probability` (the probability as a heat-coloured overlay on the slice views) and
:func:`export_for_training` (the source volume and the corrected segmentation as a training case).

Arrays are (k, j, i) like ``slicer.util``'s; the review's own arrays are (i, j, k), so the
review transposes at its border.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from MoMESegmentationLib.errors import InputError, MoMEError, PromptError
from MoMESegmentationLib.outputs import probabilities_dir
from MoMESegmentationLib.slicer_workflow import Job, SegmentationOptions, SegmentationWorkflow

from .scene import SlicerScene, read_volume_node, style_probability_volume
from .segment_editor import SegmentEditorParts, apply_structure

logger = logging.getLogger(__name__)

#: Columns of the review table (:meth:`SegmentReview.rows`).
REVIEW_HEADERS = ("#", "Kind", "Volume (mL)", "Mean p", "Location", "Decision")


@dataclass
class StructureProbability:
    """One structure's probability on a volume's voxels, and what the model said of it."""

    prompt: str
    name: str  # the display name of the structure the prompt matched
    structure_id: str | None
    probability: np.ndarray  # float32 (k, j, i) on the volume's grid, in [0, 1]
    volume_key: tuple  # volume_key() of the volume it was computed on
    summary: dict = field(default_factory=dict)  # the structure's entry of the result summary

    @property
    def found(self) -> bool:
        return bool(self.summary.get("found", True))

    def mask(self, threshold: float = 0.5) -> np.ndarray:
        if not 0.0 < float(threshold) <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        return self.probability >= float(threshold)


def volume_key(volume_node: Any) -> tuple:
    """Identifies a volume's voxels: changes when the node is another or its image was modified."""
    image = volume_node.GetImageData()
    return (volume_node.GetID(), image.GetAddressAsString("vtkImageData") if image is not None else "",
            int(image.GetMTime()) if image is not None else 0)


def _same_grid(a: Any, b: Any, tolerance_mm: float = 1e-3) -> bool:
    import vtk

    if a.GetImageData() is None or b.GetImageData() is None:
        return False
    if tuple(a.GetImageData().GetDimensions()) != tuple(b.GetImageData().GetDimensions()):
        return False
    ma, mb = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    a.GetIJKToRASMatrix(ma)
    b.GetIJKToRASMatrix(mb)
    # Compare the positions of the grid's corner voxels (direction and spacing together).
    dims = a.GetImageData().GetDimensions()
    for corner in ((0, 0, 0), (dims[0] - 1, 0, 0), (0, dims[1] - 1, 0), (0, 0, dims[2] - 1)):
        pa = np.array(ma.MultiplyPoint([*corner, 1.0])[:3])
        pb = np.array(mb.MultiplyPoint([*corner, 1.0])[:3])
        if np.abs(pa - pb).max() > tolerance_mm:
            return False
    return True


def read_structure_result(scene: Any, seg_path: Path, summary: dict, volume_node: Any) -> StructureProbability:
    """The first structure of a worker result (run with ``probabilities``) as a probability array.

    The map is read with Slicer's own volume reader into a temporary node that is removed again,
    and must lie on ``volume_node``'s grid. The scene is as before when this returns or raises.
    """
    structures = [s for s in (summary or {}).get("structures") or [] if isinstance(s, dict)]
    if not structures:
        raise MoMEError(f"{seg_path.name}: the result names no structure")
    entry = structures[0]
    folder = probabilities_dir(Path(seg_path))
    candidates = sorted(folder.glob(f"{int(entry.get('label', 1)):02d}_*.nii*")) if folder.is_dir() else []
    if not candidates:
        raise MoMEError(f"{seg_path.name}: the worker wrote no probability map for {entry.get('name')!r}")
    node = read_volume_node(scene, candidates[0], what="probability map")
    try:
        if not _same_grid(node, volume_node):
            raise MoMEError(f"{candidates[0].name} does not lie on the grid of {volume_node.GetName()}")
        import slicer

        probability = np.clip(slicer.util.arrayFromVolume(node).astype(np.float32), 0.0, 1.0)
    finally:
        for item in (node.GetDisplayNode(), node):
            if item is not None and scene.IsNodePresent(item):
                scene.RemoveNode(item)
    return StructureProbability(prompt=str(entry.get("prompt") or entry.get("name") or ""),
                                name=str(entry.get("name") or entry.get("prompt") or ""),
                                structure_id=entry.get("id"), probability=probability,
                                volume_key=volume_key(volume_node), summary=dict(entry))


def start_structure_job(workflow: SegmentationWorkflow, volume_node: Any, prompt: str,
                        options: SegmentationOptions | None = None) -> Job:
    """Start computing one structure's probability on ``volume_node``; the scene does not change.

    The job runs in the workflow's worker like the panel's jobs, so the worker's cache of the
    volume's image features serves both: a second prompt on the same volume (or the same ROI) runs
    only the router and the heads. When the job is done, ``job.result_ref`` is a
    :class:`StructureProbability` (probability maps are always requested).
    """
    names = [p for p in re.split(r"[,;\n]", prompt or "") if p.strip()]
    if len(names) != 1:
        raise PromptError(f"{prompt!r}: the effect segments one structure at a time; type one name")
    options = dataclasses.replace(options or SegmentationOptions(), probabilities=True, replace=False)
    scene = volume_node.GetScene()

    def importer(seg_path: Path, summary: dict, job: Job) -> StructureProbability:
        return read_structure_result(scene, seg_path, summary, volume_node)

    return workflow.start(volume_node, names[0].strip(), None, options, importer=importer)


# ------------------------------------------------------------------------------------------
# Apply, and re-apply at a new threshold
# ------------------------------------------------------------------------------------------


@dataclass
class ApplySettings:
    """Where and how a structure is written: mode, threshold and the region it may change."""

    mode: str = "replace"  # "replace", "add" or "remove"
    threshold: float = 0.5
    roi_box_ijk: Sequence[int] | None = None  # (i0, i1, j0, j1, k0, k1), inclusive
    slab: Sequence[int] | None = None  # (k0, k1), inclusive


def slab_around(volume_node: Any, slice_k: float, half_thickness: int) -> tuple[int, int]:
    """``(k0, k1)``: the slices within ``half_thickness`` of slice ``slice_k``, clipped to the volume."""
    dims = volume_node.GetImageData().GetDimensions()
    k = int(round(slice_k))
    if not 0 <= k < dims[2]:
        raise InputError(f"slice {k} is outside {volume_node.GetName()} (0 to {dims[2] - 1})")
    return max(0, k - int(half_thickness)), min(dims[2] - 1, k + int(half_thickness))


def volume_index_of(volume_node: Any, ras_world: Sequence[float]) -> np.ndarray:
    """The (i, j, k) voxel coordinates of a world RAS point in a volume (its parent transform undone)."""
    import vtk

    point = [float(v) for v in ras_world]
    parent = volume_node.GetParentTransformNode()
    if parent is not None:
        transform = vtk.vtkGeneralTransform()
        parent.GetTransformFromWorld(transform)
        point = list(transform.TransformPoint(point))
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetRASToIJKMatrix(matrix)
    return np.array(matrix.MultiplyPoint([*point, 1.0])[:3])


def roi_box_ijk(roi_node: Any, volume_node: Any) -> tuple[int, int, int, int, int, int]:
    """``(i0, i1, j0, j1, k0, k1)``: the volume's voxels whose centres an ROI's bounding box holds.

    The ROI's eight corners (its own orientation and parent transform applied) go into the volume's
    voxel coordinates; the box is their bounding box, inward to whole voxels, clipped to the volume.
    """
    size = [float(v) for v in roi_node.GetSize()]
    if min(size) <= 0:
        raise InputError(f"region of interest {roi_node.GetName()} is empty: place it first")
    object_to_world = roi_node.GetObjectToWorldMatrix()
    corners = np.array([volume_index_of(volume_node, object_to_world.MultiplyPoint(
        [x * size[0], y * size[1], z * size[2], 1.0])[:3])
        for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)])
    low = np.ceil(corners.min(axis=0) - 1e-6).astype(int)
    high = np.floor(corners.max(axis=0) + 1e-6).astype(int)
    dims = volume_node.GetImageData().GetDimensions()
    low = np.maximum(low, 0)
    high = np.minimum(high, np.array(dims) - 1)
    if np.any(high < low):
        raise InputError(f"region of interest {roi_node.GetName()} does not overlap {volume_node.GetName()}")
    return (int(low[0]), int(high[0]), int(low[1]), int(high[1]), int(low[2]), int(high[2]))


def slab_at_slice(volume_node: Any, slice_node: Any, half_thickness: int) -> tuple[int, int]:
    """The slab of the volume's k slices around the centre of a slice view (e.g. the Red view)."""
    slice_to_ras = slice_node.GetSliceToRAS()
    centre = [slice_to_ras.GetElement(r, 3) for r in range(3)]
    return slab_around(volume_node, volume_index_of(volume_node, centre)[2], half_thickness)


class LiveThreshold:
    """Write a structure into a segment, then follow a threshold slider with one Undo step in all.

    :meth:`apply` saves the state for Undo and writes the structure. :meth:`set_threshold` writes it
    again at another threshold: when the segmentation has not changed since this object's last
    write, that write is undone first, so the segment is as if it had been written once at the new
    threshold (also in "add" mode, and for the voxels an overwrite took from other segments).
    Otherwise (the user edited in between, or the editor cannot undo from here) it is a new edit
    with its own Undo step.
    """

    def __init__(self, parts: SegmentEditorParts, segment_id: str, result: StructureProbability,
                 volume_node: Any, settings: ApplySettings | None = None) -> None:
        self.parts = parts
        self.segment_id = segment_id
        self.result = result
        self.volume_node = volume_node
        self.settings = settings or ApplySettings()
        self._written_stamp: tuple | None = None

    def _segmentation_stamp(self) -> tuple:
        """Changes whenever a segment is added, removed or edited (its labelmap's modified time)."""
        segmentation = self.parts.segmentation_node.GetSegmentation()
        stamp = [int(segmentation.GetMTime())]
        for index in range(segmentation.GetNumberOfSegments()):
            segment = segmentation.GetNthSegment(index)
            representation = segment.GetRepresentation(segmentation.GetSourceRepresentationName())
            stamp += [segmentation.GetNthSegmentID(index),
                      int(representation.GetMTime()) if representation is not None else 0]
        return tuple(stamp)

    def apply(self) -> None:
        if volume_key(self.volume_node) != self.result.volume_key:
            raise InputError(f"the probabilities of {self.result.name!r} were computed for another volume")
        s = self.settings
        apply_structure(self.parts, self.segment_id, self.result.mask(s.threshold), s.mode, self.volume_node,
                        roi_box_ijk=s.roi_box_ijk, slab=s.slab)
        self._written_stamp = self._segmentation_stamp()

    @property
    def can_replace_last(self) -> bool:
        return self._written_stamp is not None and self._segmentation_stamp() == self._written_stamp

    def set_threshold(self, threshold: float) -> bool:
        """Re-apply at ``threshold``; ``True`` when the previous write was replaced (same Undo step)."""
        self.result.mask(threshold)  # validates
        replaced = self.can_replace_last and self.parts.undo()
        self.settings.threshold = float(threshold)
        self.apply()
        return replaced


# ------------------------------------------------------------------------------------------
# Review of disagreements
# ------------------------------------------------------------------------------------------


@dataclass
class ReviewItem:
    """One region of the review and what the reviewer decided ("", "accepted" or "rejected")."""

    region: Any  # MoMESegmentationLib.review.Region, on (i, j, k) arrays
    decision: str = ""

    @property
    def kind(self) -> str:
        return self.region.kind


class SegmentReview:
    """Where a segment and the model's probability for the same structure disagree, worst first."""

    def __init__(self, parts: SegmentEditorParts, segment_id: str, result: StructureProbability,
                 volume_node: Any, threshold: float = 0.5, min_ml: float | None = None,
                 tolerance_mm: float = 0.0) -> None:
        from MoMESegmentationLib import review

        self.parts = parts
        self.segment_id = segment_id
        self.result = result
        self.volume_node = volume_node
        self.threshold = float(threshold)
        if volume_key(volume_node) != result.volume_key:
            raise InputError(f"the probabilities of {result.name!r} were computed for another volume")
        label_kji = self._segment_array()
        spacing = tuple(float(v) for v in volume_node.GetSpacing())  # (i, j, k)
        regions = review.disagreement_regions(
            label_kji.T, result.probability.T, spacing, self.threshold,
            review.DEFAULT_MIN_ML if min_ml is None else float(min_ml), tolerance_mm=tolerance_mm)
        self.items = [ReviewItem(region) for region in regions]

    def _segment_array(self) -> np.ndarray:
        import slicer

        segmentation_node = self.parts.segmentation_node
        if segmentation_node.GetSegmentation().GetSegment(self.segment_id) is None:
            raise InputError(f"{segmentation_node.GetName()} has no segment {self.segment_id!r}")
        return slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, self.segment_id, self.volume_node) != 0

    def rows(self) -> list[tuple[str, ...]]:
        """Table rows: rank, kind, volume (mL), mean probability, location (RAS mm), decision."""
        out = []
        for item in self.items:
            r = item.region
            ras = self.centre_ras(item)
            kind = "model adds" if r.kind == "adds" else "model removes"
            out.append((str(r.rank), kind, f"{r.volume_ml:.1f}", f"{r.mean_probability:.2f}",
                        "R {:.0f}, A {:.0f}, S {:.0f}".format(*ras), item.decision))
        return out

    def centre_ras(self, item: ReviewItem) -> tuple[float, float, float]:
        """The region's centroid in world RAS millimetres (the volume's parent transform applied)."""
        import vtk

        matrix = vtk.vtkMatrix4x4()
        self.volume_node.GetIJKToRASMatrix(matrix)
        ras = matrix.MultiplyPoint([*item.region.centroid_index, 1.0])[:3]
        parent = self.volume_node.GetParentTransformNode()
        if parent is not None:
            transform = vtk.vtkGeneralTransform()
            parent.GetTransformToWorld(transform)
            ras = transform.TransformPoint(ras)
        return tuple(float(v) for v in ras)  # type: ignore[return-value]

    def centre_views(self, item: ReviewItem) -> tuple[float, float, float]:
        """Centre every slice view on the region (Slicer's ``JumpAllSlices``); returns the point."""
        import slicer

        ras = self.centre_ras(item)
        scene = self.volume_node.GetScene()
        slicer.vtkMRMLSliceNode.JumpAllSlices(scene, *ras, slicer.vtkMRMLSliceNode.CenteredJumpSlice)
        return ras

    def accept(self, item: ReviewItem) -> None:
        """Take the model's version of the region: add its voxels or erase them (one Undo step)."""
        if item.decision == "accepted":
            return
        shape_ijk = self.result.probability.shape[::-1]
        region_kji = item.region.full_mask(shape_ijk).T
        mode = "add" if item.kind == "adds" else "remove"
        apply_structure(self.parts, self.segment_id, region_kji, mode, self.volume_node)
        item.decision = "accepted"

    def reject(self, item: ReviewItem) -> None:
        """Keep the segment as it is there; the scene does not change."""
        item.decision = "rejected"


# ------------------------------------------------------------------------------------------
# Confidence overlay
# ------------------------------------------------------------------------------------------


def show_probability(result: StructureProbability, volume_node: Any, node: Any = None,
                     opacity: float = 0.4) -> Any:
    """The probability as a scalar volume (PET heat colours, 0 to 1) shown over the volume in the slice views.

    ``node``: an earlier overlay to update in place (its array is replaced); ``None`` adds a node.
    """
    import slicer

    scene = volume_node.GetScene()
    if node is None or not scene.IsNodePresent(node):
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode",
                                       scene.GenerateUniqueName(f"{result.name} probability"))
    slicer.util.updateVolumeFromArray(node, result.probability)
    node.CopyOrientation(volume_node)
    style_probability_volume(node, volume_node, result.name)
    display = node.GetDisplayNode()
    display.SetApplyThreshold(True)
    display.SetLowerThreshold(0.05)  # near-zero probability stays see-through
    display.SetUpperThreshold(1.0)
    slicer.util.setSliceViewerLayers(background=volume_node, foreground=node, foregroundOpacity=opacity)
    return node


# ------------------------------------------------------------------------------------------
# Export for training
# ------------------------------------------------------------------------------------------


def training_labels(segmentation_node: Any, vocabulary: Any = None) -> dict[str, str]:
    """Segment name -> structure id, for every segment that names exactly one known structure.

    A segment names a structure by its terminology or, without one, by its name (as the effect's
    prompt is prefilled, :func:`~MoMESlicer.segment_editor.segment_prompt`); other segments are
    left out (they stay in the exported file but are not trained on).
    """
    from MoMESegmentationLib.vocabulary import Vocabulary

    from .segment_editor import segment_prompt

    vocabulary = vocabulary if vocabulary is not None else Vocabulary.load()
    segmentation = segmentation_node.GetSegmentation()
    labels: dict[str, str] = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        matches = vocabulary.lookup(segment_prompt(segment, vocabulary))
        if len(matches) == 1:
            labels[segment.GetName()] = matches[0].id
    return labels


def export_for_training(volume_node: Any, segmentation_node: Any, dataset_dir: str | Path,
                        labels: dict[str, str], case_id: str | None = None, overwrite: bool = False,
                        model: str | None = None) -> Path:
    """Write the volume and the (corrected) segmentation as one case of a corrections dataset.

    :param labels: segment name -> structure id, for the segments to train on (others are kept in
        the file but not used).
    The files are written to a temporary folder first and handed to
    :func:`MoMESegmentationLib.corrections.add_correction_case`, which adds them to the dataset
    atomically; the scene is not changed.
    """
    from MoMESegmentationLib import corrections

    if not labels:
        raise InputError(f"{segmentation_node.GetName()}: choose at least one segment to export")
    segmentation = segmentation_node.GetSegmentation()
    for name in labels:
        if not segmentation.GetSegmentIdBySegmentName(name):
            raise InputError(f"{segmentation_node.GetName()} has no segment named {name!r}")
    scene = volume_node.GetScene()
    with tempfile.TemporaryDirectory(prefix="mome-export-") as folder:
        image_path = Path(folder) / "image.nrrd"
        label_path = Path(folder) / "label.seg.nrrd"
        SlicerScene(scene).export_volume(volume_node, image_path)
        _write_segmentation(scene, segmentation_node, label_path)
        case_id = case_id or re.sub(r"[^A-Za-z0-9._-]+", "_", volume_node.GetName()).strip("._-") or "case"
        return corrections.add_correction_case(dataset_dir, image_path, label_path, labels, case_id=case_id,
                                               overwrite=overwrite, model=model)


def _write_segmentation(scene: Any, segmentation_node: Any, path: Path) -> None:
    """The segmentation as a ``.seg.nrrd`` (segment names, colours, terminology), uncropped.

    Written by a storage node of its own, so the node keeps its file name and modified state; the
    trainer resamples it onto the image's grid (nearest neighbour) when it loads the case.
    """
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    try:
        storage.SetFileName(str(path))
        storage.SetCropToMinimumExtent(False)
        if not storage.WriteData(segmentation_node):
            raise MoMEError(f"could not write {segmentation_node.GetName()} to {path}")
    finally:
        scene.RemoveNode(storage)
