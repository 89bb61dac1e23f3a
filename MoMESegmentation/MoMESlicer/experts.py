"""The router's maps in the scene: which expert each voxel trusted, for one structure at a time.

A result segmented with ``explain`` (the panel's *Show experts* option) comes with, per structure, a
dominant-expert label map and the router's entropy (:mod:`MoMESegmentationLib.explain`). When the
result is imported, :meth:`ExpertMaps.keep` moves those files out of the job's temporary folder
(which is deleted afterwards) into a folder of its own; nothing is loaded yet, so a run of eight
structures does not fill the scene with sixteen volumes. :meth:`ExpertMaps.show` then loads one
structure's maps, the one selected in the results table:

* the dominant expert as a labelmap volume, with a colour table named after the experts
  ("full resolution" ... "1/16 scale (deepest)") and a colour legend;
* the entropy as a scalar volume (0: one expert decides, 1: all weigh the same).

Showing another structure replaces the two volumes, and :meth:`ExpertMaps.forget` removes the kept
files (when the scene closes). It uses only MRML, so the tests run it on Slicer's core from PyPI.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import slicer

from MoMESegmentationLib.errors import MoMEError
from MoMESegmentationLib.outputs import experts_dir

from .scene import read_volume_node

__all__ = ["ExpertMaps", "EXPERTS_ATTRIBUTE", "ENTROPY_COLOR_NODE_ID", "shown_expert_nodes"]

#: Attribute of the nodes :meth:`ExpertMaps.show` adds: "dominant", "entropy" or "colors".
EXPERTS_ATTRIBUTE = "MoME.Experts"
#: Colours of the entropy volume (a procedural table every Slicer has).
ENTROPY_COLOR_NODE_ID = "vtkMRMLPETProceduralColorNodePET-Rainbow2"


@dataclass
class _Kept:
    """One segment's kept maps."""

    dominant: Path
    entropy: Path
    experts: list[dict]  # the summary's explain.experts: label, name, scale, colour
    dominant_scale: str | None  # the expert that dominates inside the structure (the summary's routing)


@dataclass
class ExpertMaps:
    """The expert maps of the results imported into one scene, by segmentation node and segment name."""

    scene: Any
    root: Path | None = None
    _kept: dict[str, dict[str, _Kept]] = field(default_factory=dict)
    _latest: dict[str, dict[int, str]] = field(default_factory=dict)

    # ------------------------------------------------------------------ keep
    def keep(self, seg_path: Path, summary: dict, segmentation_node: Any, segment_names: dict[int, str]) -> bool:
        """Move a result's ``<stem>_experts`` folder aside for ``segmentation_node``; False when it has none.

        ``segment_names`` maps a structure's label value to the name its segment got in the scene.
        """
        explain = (summary or {}).get("explain") or {}
        source = experts_dir(Path(seg_path))
        maps = explain.get("maps") or {}
        if not source.is_dir() or not maps.get("structures"):
            return False
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="mome-experts-"))
        target = Path(tempfile.mkdtemp(prefix="result-", dir=self.root))
        shutil.rmtree(target)
        shutil.move(str(source), str(target))
        structures = {int(s["label"]): s for s in (summary.get("structures") or [])
                      if isinstance(s, dict) and "label" in s}
        experts = list(explain.get("experts") or [])
        kept = self._kept.setdefault(segmentation_node.GetID(), {})
        self._latest[segmentation_node.GetID()] = {
            int(label): segment_names[int(label)] for label in maps["structures"] if int(label) in segment_names}
        for label, entry in maps["structures"].items():
            name = segment_names.get(int(label))
            if name is None:
                continue
            routing = (structures.get(int(label)) or {}).get("routing") or {}
            kept[name] = _Kept(target / Path(entry["dominant"]).name, target / Path(entry["entropy"]).name,
                               experts, routing.get("dominant"))
        return True

    def latest(self, segmentation_node: Any) -> dict[int, str]:
        """Label value -> segment name of the last result kept for ``segmentation_node`` ({} if none)."""
        if segmentation_node is None:
            return {}
        return dict(self._latest.get(segmentation_node.GetID(), {}))

    def names(self, segmentation_node: Any) -> list[str]:
        """Segments of ``segmentation_node`` whose expert maps are kept."""
        return list(self._kept.get(segmentation_node.GetID(), {}))

    def dominant_scale(self, segmentation_node: Any, segment_name: str) -> str | None:
        kept = self._kept.get(segmentation_node.GetID(), {}).get(segment_name)
        return None if kept is None else kept.dominant_scale

    # ------------------------------------------------------------------ show
    def show(self, segmentation_node: Any, segment_name: str, volume_node: Any) -> tuple[Any, Any]:
        """Load one segment's maps (replacing those shown before); return ``(labelmap, entropy)`` nodes.

        On an error nothing is added and the maps shown before stay.
        """
        kept = self._kept.get(segmentation_node.GetID(), {}).get(segment_name)
        if kept is None:
            raise MoMEError(f"{segment_name!r} has no expert maps: segment it with 'Show experts' on")
        scene = self.scene
        added = []
        try:
            colors = self._color_table(kept.experts)
            if colors not in shown_expert_nodes(scene):
                added.append(colors)
            labels = read_volume_node(scene, kept.dominant, scene.GenerateUniqueName(f"{segment_name} experts"),
                                      "vtkMRMLLabelMapVolumeNode", what="expert map")
            added.append(labels)
            entropy = read_volume_node(scene, kept.entropy,
                                       scene.GenerateUniqueName(f"{segment_name} router entropy"), what="expert map")
            added.append(entropy)
            for node in (labels, entropy):
                node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
                node.CreateDefaultDisplayNodes()
            labels.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
            labels.SetAttribute(EXPERTS_ATTRIBUTE, "dominant")
            display = entropy.GetDisplayNode()
            display.SetAndObserveColorNodeID(ENTROPY_COLOR_NODE_ID)
            display.SetAutoWindowLevel(False)
            display.SetWindowLevelMinMax(0.0, 1.0)
            entropy.SetAttribute(EXPERTS_ATTRIBUTE, "entropy")
            legend = slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(labels.GetDisplayNode())
            if legend is not None:
                legend.SetTitleText(f"{segment_name}: dominant expert")
        except BaseException:
            for node in reversed(added):
                _remove(scene, node)
            raise
        for node in shown_expert_nodes(scene):
            if node not in (labels, entropy, colors):
                _remove(scene, node)
        return labels, entropy

    def _color_table(self, experts: list[dict]) -> Any:
        """One colour table per set of experts, named after them, reused while it is in the scene."""
        key = json.dumps([[e.get("label"), e.get("name"), e.get("color")] for e in experts])
        for node in shown_expert_nodes(self.scene):
            if node.IsA("vtkMRMLColorTableNode") and node.GetAttribute("MoME.ExpertsKey") == key:
                return node
        node = self.scene.AddNewNodeByClass("vtkMRMLColorTableNode", self.scene.GenerateUniqueName("MoME experts"))
        node.SetTypeToUser()
        node.SetNumberOfColors(1 + max([int(e["label"]) for e in experts] + [0]))
        node.SetColor(0, "none", 0.0, 0.0, 0.0, 0.0)
        for e in experts:
            r, g, b = (c / 255.0 for c in e.get("color", (200, 200, 200)))
            node.SetColor(int(e["label"]), str(e["name"]), r, g, b, 1.0)
        node.SetAttribute(EXPERTS_ATTRIBUTE, "colors")
        node.SetAttribute("MoME.ExpertsKey", key)
        return node

    # ------------------------------------------------------------------ forget
    def forget(self) -> None:
        """Remove the kept files (their nodes, if shown, stay in the scene)."""
        self._kept.clear()
        self._latest.clear()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


def shown_expert_nodes(scene: Any) -> list[Any]:
    """The nodes :meth:`ExpertMaps.show` added to ``scene``."""
    nodes = []
    for index in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(index)
        if node.GetAttribute(EXPERTS_ATTRIBUTE):
            nodes.append(node)
    return nodes


def _remove(scene: Any, node: Any) -> None:
    if not scene.IsNodePresent(node):
        return
    displayable = node.IsA("vtkMRMLDisplayableNode")
    if displayable:
        for i in range(node.GetNumberOfDisplayNodes()):
            display = node.GetNthDisplayNode(i)
            if display is not None and scene.IsNodePresent(display):
                scene.RemoveNode(display)
    scene.RemoveNode(node)
