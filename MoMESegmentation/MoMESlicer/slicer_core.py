"""Slicer's MRML core without Slicer's application: for tests, scripts and headless rendering.

3D Slicer's scene, logic and module logics are published on PyPI as ``slicer-core`` (Kitware),
without Qt. They work once the set-up that Slicer's core application does at start-up is in
place: a scene with the default crosshair, a ``vtkSlicerApplicationLogic`` with the default colour
nodes, the displayable-manager factories pointed at the application logic, the default slice
orientation presets, and the module logics registered with the application logic. This module
does that set-up once (``start()``) and publishes it where ``slicer.util`` looks for it
(``slicer.mrmlScene`` and ``slicer.modules.<name>.logic()``).

Inside Slicer none of this is needed (the application has done it); nothing in the module's GUI
code imports this file.

Needs ``slicer-core`` (``pip install slicer-core==5.12.4.0``; a cp311 wheel that pins ``vtk``).
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The slicer-core release the module's scene code is tested against (Slicer 5.12).
SLICER_CORE_REQUIREMENT = "slicer-core==5.12.4.0"


@dataclass
class SlicerCore:
    """The scene, the application logic and the module logics of one headless Slicer core."""

    scene: Any
    app_logic: Any
    logics: dict[str, Any] = field(default_factory=dict)

    def logic(self, name: str) -> Any:
        """Module logic by Slicer's module name (``"Segmentations"``, ``"Volumes"``, ...)."""
        return self.logics[name]

    def clear(self) -> None:
        """Remove every node a test or script added (like File > Close Scene)."""
        self.scene.Clear(False)


_CORE: SlicerCore | None = None


def available() -> str | None:
    """``None`` when slicer-core can be imported, else the reason it cannot (one line)."""
    try:
        import slicer  # noqa: F401
        from slicer import vtkMRMLScene, vtkSlicerApplicationLogic  # noqa: F401
    except ImportError as error:
        return f"Slicer's core is not installed ({SLICER_CORE_REQUIREMENT}): {error}"
    return None


def start(terminology_directory: str | Path | None = None) -> SlicerCore:
    """Bring up one Slicer core for this process (again returns the same one).

    :param terminology_directory: folder with Slicer's ``*.term.json`` terminology files, which
        the Terminologies logic loads as Slicer does from its share directory; ``None`` takes the
        copy that ``trame-slicer`` ships (see :func:`default_terminology_directory`).
    """
    global _CORE
    if _CORE is not None:
        return _CORE

    import slicer
    from slicer import (
        vtkMRMLCrosshairNode,
        vtkMRMLScene,
        vtkMRMLSliceNode,
        vtkMRMLSliceViewDisplayableManagerFactory,
        vtkMRMLThreeDViewDisplayableManagerFactory,
        vtkSlicerApplicationLogic,
        vtkSlicerMarkupsLogic,
        vtkSlicerSegmentationsModuleLogic,
        vtkSlicerSequencesLogic,
        vtkSlicerSubjectHierarchyModuleLogic,
        vtkSlicerTerminologiesModuleLogic,
        vtkSlicerTransformLogic,
        vtkSlicerVolumesLogic,
    )
    from vtkmodules.vtkCommonCore import vtkCollection, vtkOutputWindow

    output = vtkOutputWindow()
    output.SetDisplayModeToAlwaysStdErr()
    vtkOutputWindow.SetInstance(output)

    scene = vtkMRMLScene()
    crosshair = vtkMRMLCrosshairNode()
    crosshair.SetCrosshairName("default")
    scene.AddNode(crosshair)

    app_logic = vtkSlicerApplicationLogic()
    # The Colors module's logic, as Slicer's Colors module installs it: it also registers the colour
    # legend node class.
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLApplicationLogic(app_logic)
    app_logic.SetColorLogic(colors)
    app_logic.SetMRMLScene(scene)
    app_logic.GetColorLogic().SetMRMLScene(scene)
    app_logic.GetColorLogic().AddDefaultColorNodes()
    app_logic.SetSliceLogics(vtkCollection())
    app_logic.SetViewLogics(vtkCollection())
    vtkMRMLThreeDViewDisplayableManagerFactory.GetInstance().SetMRMLApplicationLogic(app_logic)
    vtkMRMLSliceViewDisplayableManagerFactory.GetInstance().SetMRMLApplicationLogic(app_logic)

    core = SlicerCore(scene=scene, app_logic=app_logic)

    def register(name: str, logic: Any, share: Path | None = None) -> None:
        if share is not None and hasattr(logic, "SetModuleShareDirectory"):
            logic.SetModuleShareDirectory(share.as_posix())
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app_logic)
        app_logic.SetModuleLogic(name, logic)
        core.logics[name] = logic

    core.logics["Colors"] = app_logic.GetColorLogic()
    app_logic.SetModuleLogic("Colors", app_logic.GetColorLogic())
    # Subject hierarchy first: the other logics add their nodes to its tree.
    register("SubjectHierarchy", vtkSlicerSubjectHierarchyModuleLogic())
    register("Volumes", vtkSlicerVolumesLogic())
    register("Transforms", vtkSlicerTransformLogic())
    register("Markups", vtkSlicerMarkupsLogic())
    register("Sequences", vtkSlicerSequencesLogic())
    # Set before the scene: the logic then loads Slicer's default terminologies from there.
    terminologies = terminology_directory or default_terminology_directory()
    register("Terminologies", vtkSlicerTerminologiesModuleLogic(), Path(terminologies) if terminologies else None)
    register("Segmentations", vtkSlicerSegmentationsModuleLogic())

    vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene, True)

    # Where slicer.util looks: slicer.mrmlScene and slicer.modules.<lower-case name>.logic().
    slicer.mrmlScene = scene
    modules = getattr(slicer, "modules", None) or types.SimpleNamespace()
    for name, logic in core.logics.items():
        setattr(modules, name.lower(), types.SimpleNamespace(logic=(lambda logic=logic: logic)))
    slicer.modules = modules
    _CORE = core
    return core


def default_terminology_directory() -> Path | None:
    """Slicer's terminology files as Kitware's ``trame-slicer`` ships them (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec("trame_slicer")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "terminologies"
    return path if path.is_dir() else None
