"""The scene side of a segmentation job, on Slicer's MRML classes and without Qt.

:class:`SlicerScene` is the scene adapter of :class:`~MoMESegmentationLib.slicer_workflow.SegmentationWorkflow`
inside 3D Slicer: it checks the input volume, writes it for the worker with its exact geometry,
turns an ROI into a box on the volume's grid, and copies the worker's result into a segmentation
node (names, colours, terminology, probability maps). It uses only MRML and VTK, so the same code
runs inside Slicer and, in the tests, on Slicer's core from PyPI (``slicer-core``, see
:mod:`MoMESlicer.slicer_core`).

The scene changes only when an import succeeds: on any error every node and segment it added is
removed again, so node IDs and segment IDs are as before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import vtk

import slicer

from MoMESegmentationLib.errors import InputError, MoMEError
from MoMESegmentationLib.outputs import probabilities_dir
from MoMESegmentationLib.slicer_workflow import plan_segment_names, roi_box_lps

logger = logging.getLogger(__name__)

#: Colour table of the probability-map volumes (a procedural table every Slicer has).
PROBABILITY_COLOR_NODE_ID = "vtkMRMLPETProceduralColorNodePET-Heat"
#: Attribute that marks a probability volume and names its structure.
PROBABILITY_ATTRIBUTE = "MoME.ProbabilityOf"


@dataclass(frozen=True)
class SceneState:
    """Node IDs and, per segmentation node, segment IDs: what a failed or cancelled job must not change."""

    node_ids: tuple[str, ...]
    segment_ids: dict[str, tuple[str, ...]]


class SlicerScene:
    """Scene adapter for one MRML scene (``slicer.mrmlScene`` by default).

    ``collapse_layers=False`` keeps one full-size labelmap layer per imported segment, as
    ``CopySegmentFromSegmentation`` leaves them (only for measuring what collapsing saves).
    """

    def __init__(self, scene: Any | None = None, collapse_layers: bool = True) -> None:
        self._scene = scene
        self.collapse_layers = collapse_layers
        self._experts = None

    @property
    def scene(self) -> Any:
        return self._scene if self._scene is not None else slicer.mrmlScene

    @property
    def experts(self):
        """The router's maps of imported results (:class:`~MoMESlicer.experts.ExpertMaps`)."""
        if self._experts is None:
            from .experts import ExpertMaps

            self._experts = ExpertMaps(self.scene)
        return self._experts

    # ------------------------------------------------------------------ input

    def check_input_volume(self, volume_node: Any) -> None:
        """Refuse what the network cannot segment, with one line naming the volume and the problem."""
        if volume_node is None:
            raise InputError("no input volume selected")
        name = volume_node.GetName()
        if volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
            raise InputError(f"{name} is a labelmap volume: select the CT itself")
        if not volume_node.IsA("vtkMRMLScalarVolumeNode") or volume_node.IsA("vtkMRMLVectorVolumeNode"):
            raise InputError(f"{name} is a {volume_node.GetClassName()}, not a scalar CT volume")
        image = volume_node.GetImageData()
        if image is None or min(image.GetDimensions()) < 1:
            raise InputError(f"{name} has no image data")
        if image.GetNumberOfScalarComponents() != 1:
            raise InputError(f"{name} has {image.GetNumberOfScalarComponents()} components per voxel "
                             "(a colour or vector image), not one CT value")
        browsers = self.scene.GetNodesByClass("vtkMRMLSequenceBrowserNode")
        for index in range(browsers.GetNumberOfItems()):
            browser = browsers.GetItemAsObject(index)
            if browser.IsProxyNodeID(volume_node.GetID()):
                raise InputError(f"{name} is one frame of the 4D sequence {browser.GetName()}: "
                                 "clone the frame (Sequences module) and segment the copy")
        self.world_to_volume_matrix(volume_node)  # refuses a non-linear transform

    def world_to_volume_matrix(self, volume_node: Any) -> vtk.vtkMatrix4x4 | None:
        """World-to-volume matrix of the volume's parent transform (``None`` without one)."""
        parent = volume_node.GetParentTransformNode()
        if parent is None:
            return None
        if not parent.IsTransformToWorldLinear():
            raise InputError(f"{volume_node.GetName()} is under the non-linear transform {parent.GetName()}: "
                             "harden the transform first")
        matrix = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformFromWorld(matrix)
        return matrix

    def roi_box(self, roi_node: Any, volume_node: Any) -> list[list[float]]:
        """The ROI as an LPS box in the exported volume's coordinates.

        The ROI's eight corners go through the ROI's own orientation and parent transform into
        world coordinates, then through the inverse of the volume's transform; the box is their
        bounding box on the volume's axes.
        """
        size = list(roi_node.GetSize())
        if min(size) <= 0:
            raise InputError(f"region of interest {roi_node.GetName()} is empty: place it first")
        roi_parent = roi_node.GetParentTransformNode()
        if roi_parent is not None and not roi_parent.IsTransformToWorldLinear():
            raise InputError(f"region of interest {roi_node.GetName()} is under the non-linear transform "
                             f"{roi_parent.GetName()}: harden the transform first")
        object_to_world = roi_node.GetObjectToWorldMatrix()
        corners = []
        for x in (-0.5, 0.5):
            for y in (-0.5, 0.5):
                for z in (-0.5, 0.5):
                    point = object_to_world.MultiplyPoint([x * size[0], y * size[1], z * size[2], 1.0])
                    corners.append(list(point[:3]))
        return roi_box_lps(corners, self.world_to_volume_matrix(volume_node))

    def export_volume(self, volume_node: Any, path: Path) -> None:
        """Write the volume with its IJK-to-RAS geometry, without touching its own storage node."""
        self.check_input_volume(volume_node)
        storage = self.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        try:
            storage.SetFileName(str(path))
            storage.SetUseCompression(False)
            if not storage.WriteData(volume_node):
                raise MoMEError(f"could not write {volume_node.GetName()} to {path}")
        finally:
            self.scene.RemoveNode(storage)

    # ------------------------------------------------------------------ output

    def existing_segment_names(self, segmentation_node: Any | None) -> list[str]:
        if segmentation_node is None:
            return []
        segmentation = segmentation_node.GetSegmentation()
        return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]

    def import_result(self, seg_path: Path, summary: dict, segmentation_node: Any | None, replace: bool,
                      volume_node: Any) -> Any:
        """Copy the result's segments into ``segmentation_node`` (a new node when None); return it.

        Names never overwrite existing segments unless ``replace``; colours come from the summary,
        terminology from the file. Segments share labelmap layers afterwards (as Slicer's own
        imports leave them), not one full-size layer each. Probability maps written beside the
        result are loaded as volumes. On any error the scene is left as it was.
        """
        scene = self.scene
        before = self.state()
        result_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        result_node.AddDefaultStorageNode()
        storage = result_node.GetStorageNode()
        created = segmentation_node is None
        added_ids: list[str] = []
        added_nodes: list[Any] = []
        try:
            storage.SetFileName(str(seg_path))
            if not storage.ReadData(result_node):
                raise MoMEError(f"could not read the segmentation result {seg_path}")
            if created:
                name = scene.GenerateUniqueName(volume_node.GetName() + " MoME")
                segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
                added_nodes.append(segmentation_node)
            target = segmentation_node.GetSegmentation()
            if segmentation_node.GetTransformNodeID() != volume_node.GetTransformNodeID():
                if target.GetNumberOfSegments() == 0:
                    segmentation_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
                else:
                    raise InputError(f"{segmentation_node.GetName()} and {volume_node.GetName()} are under "
                                     "different transforms")
            if target.GetNumberOfSegments() == 0:
                segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
            source = result_node.GetSegmentation()
            source_ids = [source.GetNthSegmentID(i) for i in range(source.GetNumberOfSegments())]
            plan = plan_segment_names([source.GetSegment(i).GetName() for i in source_ids],
                                      self.existing_segment_names(segmentation_node), replace)
            colors = {entry.get("id"): entry.get("color") for entry in (summary or {}).get("structures") or []
                      if isinstance(entry, dict)}
            replaced_ids = [target.GetSegmentIdBySegmentName(p.name) for p in plan if p.replaces_existing]
            for source_id, placement in zip(source_ids, plan):
                if not target.CopySegmentFromSegmentation(source, source_id, False):
                    raise MoMEError(f"could not add segment {placement.name}")
                new_id = target.GetNthSegmentID(target.GetNumberOfSegments() - 1)
                added_ids.append(new_id)
                segment = target.GetSegment(new_id)
                segment.SetName(placement.name)
                color = colors.get(source_id)
                if color and len(color) == 3:
                    segment.SetColor(color[0] / 255.0, color[1] / 255.0, color[2] / 255.0)
            added_nodes += self._load_probability_maps(seg_path, summary, plan, source_ids, volume_node)
            for segment_id in replaced_ids:
                if segment_id:
                    target.RemoveSegment(segment_id)
            # CopySegmentFromSegmentation gives each segment its own full-size layer.
            if self.collapse_layers:
                target.CollapseBinaryLabelmaps(False)
            # Nodes made by a node selector have no display node; a no-op when one exists.
            segmentation_node.CreateDefaultDisplayNodes()
            # Last, as nothing after it can fail: the router's maps (explain) leave the job's folder.
            names = {source_id: placement.name for source_id, placement in zip(source_ids, plan)}
            labels = {int(entry["label"]): names[entry.get("id")]
                      for entry in (summary or {}).get("structures") or []
                      if isinstance(entry, dict) and "label" in entry and entry.get("id") in names}
            self.experts.keep(seg_path, summary, segmentation_node, labels)
        except BaseException:
            self._roll_back(before, segmentation_node, added_ids, added_nodes)
            raise
        finally:
            for node in (result_node.GetDisplayNode(), storage, result_node):
                if node is not None and scene.IsNodePresent(node):
                    scene.RemoveNode(node)

        if created:
            self._place_beside(segmentation_node, volume_node)
        return segmentation_node

    def _load_probability_maps(self, seg_path: Path, summary: dict, plan: list, source_ids: list[str],
                               volume_node: Any) -> list[Any]:
        """One float volume per structure from ``<result>_probabilities/``, named after its segment."""
        folder = probabilities_dir(Path(seg_path))
        if not folder.is_dir():
            return []
        names = {source_id: placement.name for source_id, placement in zip(source_ids, plan)}
        structures = [s for s in (summary or {}).get("structures") or [] if isinstance(s, dict)]
        nodes = []
        for path in sorted(folder.glob("*.nii*")):
            prefix, _, structure_id = path.name.split(".")[0].partition("_")  # "<label:02d>_<id>"
            entry = next((s for s in structures if prefix.isdigit() and s.get("label") == int(prefix)), {})
            segment_name = names.get(entry.get("id")) or entry.get("name") or structure_id
            node = read_volume_node(self.scene, path, self.scene.GenerateUniqueName(f"{segment_name} probability"),
                                    what="probability map")
            nodes.append(node)
            style_probability_volume(node, volume_node, segment_name)
        return nodes

    def _place_beside(self, node: Any, volume_node: Any) -> None:
        """Put a new node in the volume's study in the subject hierarchy."""
        hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
        if hierarchy is None:
            return
        volume_item = hierarchy.GetItemByDataNode(volume_node)
        node_item = hierarchy.GetItemByDataNode(node)
        if volume_item and node_item:
            hierarchy.SetItemParent(node_item, hierarchy.GetItemParent(volume_item))

    # ------------------------------------------------------------------ state

    def state(self) -> SceneState:
        """The node IDs of the scene and the segment IDs of every segmentation node."""
        scene = self.scene
        node_ids = tuple(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))
        segmentations = scene.GetNodesByClass("vtkMRMLSegmentationNode")
        segment_ids = {}
        for index in range(segmentations.GetNumberOfItems()):
            node = segmentations.GetItemAsObject(index)
            segmentation = node.GetSegmentation()
            segment_ids[node.GetID()] = tuple(segmentation.GetNthSegmentID(i)
                                              for i in range(segmentation.GetNumberOfSegments()))
        return SceneState(node_ids, segment_ids)

    def _roll_back(self, before: SceneState, segmentation_node: Any | None, added_ids: list[str],
                   added_nodes: list[Any]) -> None:
        for node in reversed(added_nodes):
            if self.scene.IsNodePresent(node):
                self.scene.RemoveNode(node)
        if segmentation_node is not None and self.scene.IsNodePresent(segmentation_node):
            segmentation = segmentation_node.GetSegmentation()
            for segment_id in added_ids:
                if segmentation.GetSegment(segment_id) is not None:
                    segmentation.RemoveSegment(segment_id)
        logger.debug("import rolled back to %d nodes", len(before.node_ids))


def read_volume_node(scene: Any, path: Path, name: str = "", class_name: str = "vtkMRMLScalarVolumeNode",
                     what: str = "volume") -> Any:
    """A new ``class_name`` node read from ``path`` by Slicer's volume reader, without a storage node left
    behind (the node is not tied to the temporary file). On failure nothing is added."""
    node = scene.AddNewNodeByClass(class_name, name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    try:
        storage.SetFileName(str(path))
        if not storage.ReadData(node):
            scene.RemoveNode(node)
            raise MoMEError(f"could not read the {what} {path}")
    finally:
        scene.RemoveNode(storage)
    return node


def style_probability_volume(node: Any, volume_node: Any, structure_name: str) -> None:
    """Show a probability volume as Slicer shows PET: heat colours from 0 to 1, under the volume's transform."""
    node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(PROBABILITY_COLOR_NODE_ID)
    display.SetAutoWindowLevel(False)
    display.SetWindowLevelMinMax(0.0, 1.0)
    node.SetAttribute(PROBABILITY_ATTRIBUTE, structure_name)


def segmentation_layers(segmentation_node: Any) -> tuple[int, int]:
    """(number of labelmap layers, bytes they hold) of a segmentation node."""
    segmentation = segmentation_node.GetSegmentation()
    layers = segmentation.GetNumberOfLayers()
    size_kib = 0
    for index in range(layers):
        data = segmentation.GetLayerDataObject(index)
        if data is not None:
            size_kib += data.GetActualMemorySize()
    return layers, size_kib * 1024
