"""The Qt-free core of the "MoME" Segment Editor effect: write one computed structure into a segment.

A structure computed by the model is written into the selected segment through Slicer's own
``vtkSlicerSegmentEditorLogic.ModifySegmentByLabelmap`` (never bypassing masking), after
``SaveStateForUndo()``. So the editor's masking settings apply exactly as for Slicer's own effects:
the editable area (``SetMaskMode``), the editable intensity range (``SetSourceVolumeIntensityMask``)
and the overwrite mode (``SetOverwriteMode``); and Undo / Redo restore the segmentation.

Imports ``slicer`` and ``vtk``: it runs inside 3D Slicer, or on the headless ``slicer-core`` from
PyPI (see :mod:`MoMESlicer.slicer_core`). Nothing here needs Qt.

How Slicer 5.12's logic treats the modifier labelmap (read from ``vtkSlicerSegmentEditorLogic.cxx``
and checked by the tests):

- The modifier is a ``vtkOrientedImageData`` whose image-to-world matrix is in the *segmentation
  node's* coordinate frame (before the segmentation's parent transform), like the segmentation's
  own labelmaps. The volume's grid therefore goes through the volume-to-segmentation transform
  (``vtkMRMLTransformNode.GetMatrixTransformBetweenNodes``), as ``UpdateAlignedSourceVolume`` does
  for the source volume. Only linear transforms can keep a grid: a non-linear one is refused.
- With an editable intensity range the logic requires the modifier to have *the same geometry* as
  the aligned source volume, which lies on the segmentation's reference geometry
  (``vtkOrientedImageDataResample::DoGeometriesMatch``; otherwise it logs an error and changes
  nothing). :func:`apply_structure` therefore sets the reference geometry from the source volume
  when the segmentation has none, and resamples the modifier (nearest neighbour) onto the
  reference geometry when it differs from the volume's grid.
- ``ModificationModeSet`` with a modification extent first clears the *whole* segment and then
  writes the modifier only inside the extent, so it cannot restrict a replacement to a box.
- ``ModificationModeSet`` under an editable area does not keep the segment's voxels outside that
  area where the modifier is empty (Slicer 5.12: they survive only where the modifier is set),
  although the editable area should leave them untouched.
- So "replace" is written as two masked steps after one ``SaveStateForUndo``: ``Remove`` of the
  region's voxels that are not in the structure, then ``Add`` of the structure. Inside the editable
  area (and the ROI box / slab) the segment becomes the structure; outside it, it stays as it was;
  the overwrite mode removes the structure's painted voxels from the other segments, as an
  ``Add`` does. One Undo restores the state before both steps.
- Exception, Slicer's own rule for erasing: with the editable area "inside one segment", a
  ``Remove`` may also erase the selected segment outside that segment (the logic adds the selected
  segment to the editable area when removing). "remove", and the erasing step of "replace", follow it.
- Voxels outside the editable area or the intensity range are never painted; "remove" never
  changes the other segments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

#: Our modes and Slicer's modification modes (names of ``vtkSlicerSegmentEditorLogic`` constants).
MODES = {
    "replace": "ModificationModeSet",
    "add": "ModificationModeAdd",
    "remove": "ModificationModeRemove",
}


class SegmentEditorParts:
    """What an edit needs from the Segment Editor: its parameter node, undo and the masked modifier.

    Two implementations: :class:`LogicEditorParts` drives a ``vtkSlicerSegmentEditorLogic``
    (headless code and the tests build one with :meth:`LogicEditorParts.create`); inside Slicer the
    effect wraps its ``qSlicerSegmentEditorScriptedEffect``, whose ``modifySegmentByLabelmap`` and
    ``saveStateForUndo`` end in the same logic owned by the Segment Editor widget.
    """

    editor_node: Any

    @property
    def segmentation_node(self) -> Any:
        return self.editor_node.GetSegmentationNode()

    @property
    def source_volume_node(self) -> Any:
        return self.editor_node.GetSourceVolumeNode()

    def save_state_for_undo(self) -> None:
        raise NotImplementedError

    def undo(self) -> bool:
        """Restore the state saved last; ``False`` when that is not possible here."""
        return False

    def modify(self, segmentation_node: Any, segment_id: str, modifier: Any, mode: str) -> None:
        """``ModifySegmentByLabelmap`` with masking; ``mode`` names a ``ModificationMode`` constant."""
        raise NotImplementedError

    def reference_geometry(self) -> Any:
        """An image with the segmentation's reference geometry (``None`` when it has none)."""
        raise NotImplementedError


@dataclass
class LogicEditorParts(SegmentEditorParts):
    """A segment editor logic set up on a segmentation, a source volume and an editor node."""

    logic: Any
    editor_node: Any

    @classmethod
    def create(cls, scene: Any, segmentation_node: Any, source_volume_node: Any,
               editor_node: Any = None, app_logic: Any = None) -> LogicEditorParts:
        """A new ``vtkSlicerSegmentEditorLogic`` (and editor node unless given) on ``scene``."""
        import slicer

        logic = slicer.vtkSlicerSegmentEditorLogic()
        logic.SetMRMLScene(scene)
        if app_logic is not None:
            logic.SetMRMLApplicationLogic(app_logic)
        if editor_node is None:
            editor_node = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        editor_node.SetAndObserveSegmentationNode(segmentation_node)
        logic.SetSegmentEditorNode(editor_node)
        logic.SetSourceVolumeNode(source_volume_node)
        if not segmentation_node.GetSegmentation().GetConversionParameter(
                slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()):
            segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(source_volume_node)
        return cls(logic=logic, editor_node=editor_node)

    def save_state_for_undo(self) -> None:
        self.logic.SaveStateForUndo()

    def undo(self) -> bool:
        if not self.logic.CanUndo():
            return False
        self.logic.Undo()
        return True

    def modify(self, segmentation_node: Any, segment_id: str, modifier: Any, mode: str) -> None:
        import slicer

        self.logic.ModifySegmentByLabelmap(segmentation_node, segment_id, modifier,
                                           getattr(slicer.vtkSlicerSegmentEditorLogic, mode), True, False)

    def reference_geometry(self) -> Any:
        if not self.logic.UpdateReferenceGeometryImage():
            return None
        return self.logic.GetReferenceGeometryImage()


def volume_to_segmentation_matrix(volume_node: Any, segmentation_node: Any = None) -> np.ndarray:
    """The linear transform from the volume's parent frame to the segmentation node's frame (4x4).

    ``segmentation_node=None`` means world coordinates. Raises ``ValueError`` for a non-linear one.
    """
    import slicer
    import vtk

    matrix = vtk.vtkMatrix4x4()
    target = segmentation_node.GetParentTransformNode() if segmentation_node is not None else None
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(volume_node.GetParentTransformNode(), target, matrix):
        raise ValueError("the transform between the volume and the segmentation is not linear")
    return slicer.util.arrayFromVTKMatrix(matrix)


def mask_to_modifier(mask_kji: np.ndarray, volume_node: Any, segmentation_node: Any = None) -> Any:
    """A binary modifier labelmap (``vtkOrientedImageData``, 0/1 unsigned char) on the volume's grid.

    :param mask_kji: the structure on the volume's voxels, shaped (k, j, i) like slicer.util arrays.
    :param volume_node: the volume whose grid the mask lies on: its extent, IJK-to-RAS (oblique
        directions included) and parent transform.
    :param segmentation_node: the segmentation the modifier is for; its geometry is then expressed
        in that segmentation's frame (volume-to-segmentation transform applied), which is where the
        editor logic expects it. ``None``: world coordinates (the volume's parent transform applied).
    """
    import vtk
    from vtkmodules.util import numpy_support

    import slicer

    image = volume_node.GetImageData()
    if image is None:
        raise ValueError(f"volume {volume_node.GetName()!r} has no image data")
    extent = image.GetExtent()
    dims = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    mask = np.asarray(mask_kji)
    if mask.shape != dims:
        raise ValueError(f"mask shape {mask.shape} is not the volume's (k, j, i) shape {dims}")

    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    to_segmentation = volume_to_segmentation_matrix(volume_node, segmentation_node)
    image_to_world = slicer.util.vtkMatrixFromArray(to_segmentation @ slicer.util.arrayFromVTKMatrix(ijk_to_ras))

    modifier = slicer.vtkOrientedImageData()
    modifier.SetExtent(extent)
    modifier.SetGeometryFromImageToWorldMatrix(image_to_world)
    flat = np.ascontiguousarray((mask != 0).astype(np.uint8)).ravel()
    scalars = numpy_support.numpy_to_vtk(flat, deep=True, array_type=vtk.VTK_UNSIGNED_CHAR)
    modifier.GetPointData().SetScalars(scalars)
    return modifier


def modifier_on_reference_geometry(modifier: Any, parts: SegmentEditorParts) -> Any:
    """The modifier as is when it lies on the segmentation's reference geometry, else resampled there."""
    import slicer

    reference = parts.reference_geometry()
    if reference is None or slicer.vtkOrientedImageDataResample.DoGeometriesMatch(modifier, reference):
        return modifier
    resampled = slicer.vtkOrientedImageData()
    if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            modifier, reference, resampled, False, False):
        raise RuntimeError("could not resample the structure onto the segmentation's geometry")
    return resampled


def region_mask(shape_kji: Sequence[int], roi_box_ijk: Sequence[int] | None = None,
                slab: Sequence[int] | None = None) -> np.ndarray | None:
    """The (k, j, i) boolean mask of a ROI box and / or an axial slab; ``None`` when neither is given.

    :param roi_box_ijk: ``(i0, i1, j0, j1, k0, k1)``, inclusive voxel indices like a VTK extent.
    :param slab: ``(k0, k1)``, inclusive slice indices along the volume's k axis.
    """
    if roi_box_ijk is None and slab is None:
        return None
    region = np.ones(tuple(shape_kji), dtype=bool)
    if roi_box_ijk is not None:
        i0, i1, j0, j1, k0, k1 = (int(v) for v in roi_box_ijk)
        box = np.zeros_like(region)
        box[max(k0, 0):k1 + 1, max(j0, 0):j1 + 1, max(i0, 0):i1 + 1] = True
        region &= box
    if slab is not None:
        k0, k1 = (int(v) for v in slab)
        box = np.zeros_like(region)
        box[max(k0, 0):k1 + 1] = True
        region &= box
    return region


def apply_structure(parts: SegmentEditorParts, segment_id: str, mask_kji: np.ndarray, mode: str = "replace",
                    volume_node: Any = None, roi_box_ijk: Sequence[int] | None = None,
                    slab: Sequence[int] | None = None, save_undo: bool = True) -> None:
    """Write a computed structure into a segment through the editor logic, with masking and undo.

    :param parts: the editor logic and its editor node (segmentation, source volume, masking).
    :param segment_id: the segment to modify (the effect passes the selected segment); it becomes
        the editor's selected segment, which the editable area "inside / outside segments" omits.
    :param mask_kji: the structure on ``volume_node``'s voxels, (k, j, i).
    :param mode: ``"replace"`` (``ModificationModeSet``: inside the editable area the segment
        becomes the mask), ``"add"`` (union) or ``"remove"`` (subtract).
    :param volume_node: the volume the mask lies on; default the editor's source volume.
    :param roi_box_ijk: ``(i0, i1, j0, j1, k0, k1)`` inclusive: only voxels inside change; in
        ``"replace"`` the segment outside the box stays as it was.
    :param slab: ``(k0, k1)`` inclusive slice range, as ``roi_box_ijk`` (both may be given).
    :param save_undo: save the state for Undo first (one Undo step per call); ``False`` only when
        the caller saved it already.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, not {mode!r}")
    segmentation_node = parts.segmentation_node
    if segmentation_node is None:
        raise ValueError("the segment editor has no segmentation")
    if segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        raise ValueError(f"segmentation has no segment {segment_id!r}")
    volume_node = volume_node if volume_node is not None else parts.source_volume_node
    if volume_node is None:
        raise ValueError("no volume given and the segment editor has no source volume")

    mask = np.asarray(mask_kji) != 0
    region = region_mask(mask.shape, roi_box_ijk, slab)
    if region is None:
        region = np.ones(mask.shape, dtype=bool)
    mask = mask & region

    # The editable area "inside / outside segments" leaves out the editor's selected segment.
    if parts.editor_node.GetSelectedSegmentID() != segment_id:
        parts.editor_node.SetSelectedSegmentID(segment_id)
    if mode == "replace":
        # Erase the region's voxels that are not in the structure, then add the structure: both
        # masked by the editor, so the segment changes only inside the editable area (see above).
        steps = [(region & ~mask, "ModificationModeRemove"), (mask, "ModificationModeAdd")]
    else:
        steps = [(mask, MODES[mode])]
    modifiers = [(modifier_on_reference_geometry(mask_to_modifier(m, volume_node, segmentation_node), parts), name)
                 for m, name in steps]
    if save_undo:
        parts.save_state_for_undo()
    for modifier, name in modifiers:
        parts.modify(segmentation_node, segment_id, modifier, name)


def segment_prompt(segment: Any, vocabulary: Any = None) -> str:
    """The prompt to prefill from a segment: the structure its terminology names, else its name.

    The terminology's type (and type modifier: left / right) SNOMED codes are looked up in our
    vocabulary; when they name exactly one structure its display name is the prompt. Otherwise
    (no terminology, a type we do not know, or several structures share it) the segment's name.
    """
    name = segment.GetName() or ""
    terminology = segment.GetTerminology() if hasattr(segment, "GetTerminology") else ""
    if not terminology:
        return name
    import slicer

    entry = slicer.vtkSlicerTerminologyEntry()
    if not slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(terminology, entry):
        return name
    type_code = entry.GetTypeObject().GetCodeValue() if entry.GetTypeObject() else None
    if not type_code:
        return name
    modifier_code = entry.GetTypeModifierObject().GetCodeValue() if entry.GetTypeModifierObject() else None
    region_code = entry.GetRegionObject().GetCodeValue() if entry.GetRegionObject() else None

    if vocabulary is None:
        from MoMESegmentationLib.vocabulary import Vocabulary

        vocabulary = Vocabulary.load()

    def code(structure: Any, key: str) -> str | None:
        return ((structure.terminology or {}).get(key) or {}).get("code") or None

    candidates = [s for s in vocabulary
                  if code(s, "type") == type_code and code(s, "modifier") == (modifier_code or None)]
    if len(candidates) > 1:
        candidates = [s for s in candidates if code(s, "region") == (region_code or None)]
    if len(candidates) == 1:
        return candidates[0].name
    return name
