"""Slicer's slice and 3D views rendered offscreen, without Qt, on Slicer's MRML core.

In Slicer a slice view is a ``qMRMLSliceWidget``: a VTK render window, a ``vtkMRMLSliceLogic``
that reslices and blends the layers into one RGBA image, and the displayable managers that draw
everything else (the segmentations' fill and outline, models, markups). A 3D view is a render
window with the 3D displayable managers and a ``vtkMRMLViewLogic``. What the Qt widgets add on
top and the pictures need (the actor that shows the slice logic's image, the window size, the 3D
background) is added by the classes below; everything else is Slicer's own rendering code.

Needs ``slicer-core`` (see :mod:`MoMESlicer.slicer_core`) and a VTK that can render
offscreen (EGL or OSMesa). Nothing here imports ``slicer`` until a function is called.

    core = slicer_core.start()
    view = SliceViewRenderer(core, "Red", "Axial", size=(512, 512))
    view.show(volume_node)
    view.jump_to(ras_point)
    rgb = view.capture()   # (height, width, 3) uint8, row 0 at the top
    view.close()
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: Slice-view displayable managers that draw what the pictures need (the rest of Slicer's list
#: draws interaction widgets, rulers and legends that are off by default).
SLICE_VIEW_MANAGERS = (
    "vtkMRMLCrosshairDisplayableManager",
    "vtkMRMLModelSliceDisplayableManager",
    "vtkMRMLSegmentationsDisplayableManager2D",
    "vtkMRMLVolumeGlyphSliceDisplayableManager",
    "vtkMRMLOrientationMarkerDisplayableManager",
    "vtkMRMLRulerDisplayableManager",
)
#: 3D-view displayable managers: camera, box and axis labels, models, segment surfaces.
THREED_VIEW_MANAGERS = (
    "vtkMRMLCameraDisplayableManager",
    "vtkMRMLViewDisplayableManager",
    "vtkMRMLModelDisplayableManager",
    "vtkMRMLSegmentationsDisplayableManager3D",
    "vtkMRMLOrientationMarkerDisplayableManager",
    "vtkMRMLRulerDisplayableManager",
)

#: The default orientation of Slicer's slice views, by layout name.
SLICE_VIEW_ORIENTATIONS = {"Red": "Axial", "Yellow": "Sagittal", "Green": "Coronal"}


def prefer_offscreen_egl() -> None:
    """Ask VTK for its EGL window where there is no X display (before the first render window)."""
    if not os.environ.get("DISPLAY"):
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")


def _new_render_window(size: Sequence[int], layers: int = 1) -> tuple[Any, list[Any], Any]:
    """An offscreen window, one renderer per layer (layer 0 first) and the window's interactor."""
    # The OpenGL back end registers the render-window factories.
    import vtkmodules.vtkRenderingOpenGL2  # noqa: F401
    from vtkmodules.vtkRenderingCore import vtkRenderer, vtkRenderWindow, vtkRenderWindowInteractor

    prefer_offscreen_egl()
    window = vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.ShowWindowOff()
    window.SetSize(int(size[0]), int(size[1]))
    window.SetNumberOfLayers(layers)
    renderers = []
    for layer in range(layers):
        renderer = vtkRenderer()
        renderer.SetLayer(layer)
        window.AddRenderer(renderer)
        renderers.append(renderer)
    # Displayable managers observe the window's interactor; without one they dereference null.
    interactor = vtkRenderWindowInteractor()
    interactor.SetRenderWindow(window)
    return window, renderers, interactor


def _displayable_managers(factory_class: Any, app_logic: Any, names: Sequence[str], renderer: Any) -> Any:
    import slicer

    factory = factory_class.GetInstance()
    factory.SetMRMLApplicationLogic(app_logic)
    for name in names:
        if hasattr(slicer, name) and not factory.IsDisplayableManagerRegistered(name):
            factory.RegisterDisplayableManager(name)
    group = slicer.vtkMRMLDisplayableManagerGroup()
    group.Initialize(factory, renderer)
    return group


def capture_window(window: Any) -> np.ndarray:
    """The render window's pixels as an ``(height, width, 3)`` uint8 array, top row first."""
    from vtkmodules.util.numpy_support import vtk_to_numpy
    from vtkmodules.vtkRenderingCore import vtkWindowToImageFilter

    window.Render()
    grab = vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.SetInputBufferTypeToRGB()
    grab.ReadFrontBufferOff()
    grab.Update()
    image = grab.GetOutput()
    width, height, _ = image.GetDimensions()
    pixels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)[:, :, :3]
    return np.ascontiguousarray(pixels[::-1])


class SliceViewRenderer:
    """One of Slicer's slice views (``"Red"``, ``"Green"``, ``"Yellow"``) in an offscreen window."""

    def __init__(self, core: Any, name: str = "Red", orientation: str | None = None,
                 size: Sequence[int] = (512, 512)) -> None:
        import slicer
        from vtkmodules.vtkRenderingCore import vtkActor2D, vtkImageMapper

        self.core = core
        self.size = (int(size[0]), int(size[1]))
        # As in Slicer's slice view: the resliced image in its own renderer on layer 0, the
        # displayable managers (segment fill and outline, ...) on layer 1, blended over it.
        self.window, renderers, self.interactor = _new_render_window(self.size, layers=2)
        self.image_renderer, self.renderer = renderers
        for renderer in (self.image_renderer, self.renderer):
            renderer.GetActiveCamera().ParallelProjectionOn()
        self.image_renderer.SetBackground(0, 0, 0)
        self.managers = _displayable_managers(slicer.vtkMRMLSliceViewDisplayableManagerFactory,
                                              core.app_logic, SLICE_VIEW_MANAGERS, self.renderer)

        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(core.app_logic)
        core.app_logic.GetSliceLogics().AddItem(self.logic)
        self.logic.SetMRMLScene(core.scene)
        self.slice_node = self.logic.AddSliceNode(name)
        self.slice_node.SetMappedInLayout(1)
        self.slice_node.SetOrientation(orientation or SLICE_VIEW_ORIENTATIONS.get(name, "Axial"))
        self.managers.SetMRMLDisplayableNode(self.slice_node)

        # What qMRMLSliceView's renderer manager does: the slice logic's blended RGBA image
        # (window/level already applied by the volume display nodes) as a background 2D actor.
        self.image_mapper = vtkImageMapper()
        self.image_mapper.SetColorWindow(255)
        self.image_mapper.SetColorLevel(127.5)
        self.image_actor = vtkActor2D()
        self.image_actor.SetMapper(self.image_mapper)
        self.image_actor.GetProperty().SetDisplayLocationToBackground()
        self.image_renderer.AddViewProp(self.image_actor)
        self.logic.ResizeSliceNode(*self.size)

    @property
    def composite_node(self) -> Any:
        return self.logic.GetSliceCompositeNode()

    def show(self, background: Any, foreground: Any = None, label: Any = None, fit: bool = True) -> None:
        """Volumes in the view's layers (node or ``None``); fits the field of view to the background."""
        composite = self.composite_node
        composite.SetBackgroundVolumeID(background.GetID() if background is not None else None)
        composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
        composite.SetLabelVolumeID(label.GetID() if label is not None else None)
        if fit:
            self.fit()

    def fit(self) -> None:
        """Fit the field of view to the background volume, as the view's "reset field of view" does."""
        self.logic.ResizeSliceNode(*self.size)
        self.logic.FitSliceToBackground()
        self.logic.SnapSliceOffsetToIJK()

    def jump_to(self, ras: Sequence[float], centred: bool = False) -> None:
        """Move the slice through a RAS point (and, with ``centred``, centre the view on it)."""
        x, y, z = (float(v) for v in ras)
        if centred:
            self.slice_node.JumpSliceByCentering(x, y, z)
        else:
            self.slice_node.JumpSliceByOffsetting(x, y, z)

    def set_slice_offset(self, offset: float) -> None:
        self.logic.SetSliceOffset(float(offset))

    def slice_normal(self) -> np.ndarray:
        """The slice plane's normal in RAS (third column of SliceToRAS)."""
        matrix = self.slice_node.GetSliceToRAS()
        return np.array([matrix.GetElement(row, 2) for row in range(3)])

    def render(self) -> None:
        self.logic.ResizeSliceNode(*self.size)
        self.image_mapper.SetInputConnection(self.logic.GetImageDataConnection())
        self.managers.RequestRender()
        self.window.Render()

    def capture(self) -> np.ndarray:
        """Render and return the view as an ``(height, width, 3)`` uint8 array."""
        self.render()
        return capture_window(self.window)

    def close(self) -> None:
        """Detach from the shared core (the slice logic leaves the application's list)."""
        self.managers.SetMRMLDisplayableNode(None)
        self.core.app_logic.GetSliceLogics().RemoveItem(self.logic)
        self.logic.SetMRMLScene(None)
        self.image_renderer.RemoveAllViewProps()
        self.renderer.RemoveAllViewProps()
        self.window.Finalize()


class ThreeDViewRenderer:
    """Slicer's 3D view (view node ``"1"``) in an offscreen window."""

    def __init__(self, core: Any, name: str = "1", size: Sequence[int] = (512, 512)) -> None:
        import slicer

        self.core = core
        self.size = (int(size[0]), int(size[1]))
        self.window, (self.renderer,), self.interactor = _new_render_window(self.size)
        self.renderer.SetUseDepthPeeling(True)
        self.managers = _displayable_managers(slicer.vtkMRMLThreeDViewDisplayableManagerFactory,
                                              core.app_logic, THREED_VIEW_MANAGERS, self.renderer)
        self.logic = slicer.vtkMRMLViewLogic()
        self.logic.SetMRMLApplicationLogic(core.app_logic)
        core.app_logic.GetViewLogics().AddItem(self.logic)
        self.logic.SetMRMLScene(core.scene)
        self.view_node = self.logic.AddViewNode(name)
        self.view_node.SetMappedInLayout(1)
        self.managers.SetMRMLDisplayableNode(self.view_node)
        self.apply_background()

    def apply_background(self) -> None:
        """The view node's background gradient, applied as qMRMLThreeDView does (colour 2 at the top)."""
        self.renderer.SetBackground(*self.view_node.GetBackgroundColor())
        self.renderer.SetBackground2(*self.view_node.GetBackgroundColor2())
        self.renderer.GradientBackgroundOn()

    @property
    def camera_node(self) -> Any:
        manager = self.managers.GetDisplayableManagerByClassName("vtkMRMLCameraDisplayableManager")
        return manager.GetCameraNode() if manager is not None else None

    def reset_camera(self, direction: str = "Anterior", zoom: float = 1.0) -> None:
        """Centre on what is shown and look from ``direction`` (``"Anterior"``, ``"Left"``, ...)."""
        import slicer

        box, labels = self.view_node.GetBoxVisible(), self.view_node.GetAxisLabelsVisible()
        self.view_node.SetBoxVisible(0)
        self.view_node.SetAxisLabelsVisible(0)
        self.managers.RequestRender()
        self.window.Render()
        bounds = [0.0] * 6
        self.renderer.ComputeVisiblePropBounds(bounds)
        self.view_node.SetBoxVisible(box)
        self.view_node.SetAxisLabelsVisible(labels)
        camera_node = self.camera_node
        centre = [(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2]
        camera_node.SetFocalPoint(*centre)
        camera_node.RotateTo(getattr(slicer.vtkMRMLCameraNode, direction))
        self.renderer.ResetCamera(bounds)
        if zoom != 1.0:
            self.renderer.GetActiveCamera().Zoom(zoom)
        self.renderer.ResetCameraClippingRange()
        self.view_node.InvokeEvent(slicer.vtkMRMLViewNode.ResetFocalPointRequestedEvent)

    def render(self) -> None:
        self.managers.RequestRender()
        self.renderer.ResetCameraClippingRange()
        self.window.Render()

    def capture(self) -> np.ndarray:
        self.render()
        return capture_window(self.window)

    def close(self) -> None:
        self.managers.SetMRMLDisplayableNode(None)
        self.core.app_logic.GetViewLogics().RemoveItem(self.logic)
        self.logic.SetMRMLScene(None)
        self.renderer.RemoveAllViewProps()
        self.window.Finalize()


# ------------------------------------------------------------------------------ scene helpers


def load_volume(core: Any, path: str | Path, name: str = "CT", window: float | None = 400.0,
                level: float | None = 40.0) -> Any:
    """A scalar volume read by Slicer's archetype storage node, with a fixed window/level."""
    scene = core.scene
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        raise RuntimeError(f"{path}: Slicer's volume reader could not read it")
    node.SetAndObserveStorageNodeID(storage.GetID())
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
    if window is not None and level is not None:
        display.AutoWindowLevelOff()
        display.SetWindowLevel(float(window), float(level))
    return node


def load_segmentation(core: Any, path: str | Path, name: str = "Segmentation",
                      reference: Any = None, closed_surfaces: bool = True) -> Any:
    """A ``.seg.nrrd`` read by Slicer's segmentation storage node (names and colours from the file)."""
    scene = core.scene
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        raise RuntimeError(f"{path}: Slicer's segmentation reader could not read it")
    node.SetAndObserveStorageNodeID(storage.GetID())
    node.CreateDefaultDisplayNodes()
    if reference is not None:
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    if closed_surfaces:
        node.CreateClosedSurfaceRepresentation()
    return node


def segment_voxels_ras(segmentation_node: Any, reference: Any) -> dict[str, np.ndarray]:
    """RAS positions (N x 3) of every segment's voxels on the reference volume's grid, by segment ID."""
    import slicer
    import vtk

    matrix = vtk.vtkMatrix4x4()
    reference.GetIJKToRASMatrix(matrix)
    ijk_to_ras = slicer.util.arrayFromVTKMatrix(matrix)
    segmentation = segmentation_node.GetSegmentation()
    out: dict[str, np.ndarray] = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, reference)
        k, j, i = np.nonzero(mask)
        ijk = np.stack([i, j, k, np.ones_like(i)]).astype(float)
        out[segment_id] = (ijk_to_ras @ ijk)[:3].T
    return out


def best_slice_point(voxels: dict[str, np.ndarray], normal: Sequence[float], step: float = 1.0) -> np.ndarray:
    """A RAS point on the plane (with this normal) that cuts the most segments, then the most voxels.

    Candidate planes are ``step`` mm apart; the point is the mean of the voxels on the chosen plane
    (so the view can also be centred there).
    """
    normal = np.asarray(normal, float) / np.linalg.norm(normal)
    present = [v for v in voxels.values() if len(v)]
    if not present:
        raise ValueError("no segment has any voxel")
    depths = [np.round(v @ normal / step).astype(int) for v in present]
    low = min(int(d.min()) for d in depths)
    high = max(int(d.max()) for d in depths)
    counts = np.zeros((len(present), high - low + 1), int)
    for row, d in enumerate(depths):
        counts[row] = np.bincount(d - low, minlength=high - low + 1)
    cut = (counts > 0).sum(axis=0)
    score = cut * (counts.sum() + 1) + counts.sum(axis=0)
    best = int(np.argmax(score)) + low
    on_plane = np.concatenate([v[d == best] for v, d in zip(present, depths, strict=True)])
    return on_plane.mean(axis=0)


def save_png(pixels: np.ndarray, path: str | Path) -> Path:
    """Write an RGB array as a PNG with VTK's writer."""
    from vtkmodules.util.numpy_support import numpy_to_vtk
    from vtkmodules.vtkCommonDataModel import vtkImageData
    from vtkmodules.vtkIOImage import vtkPNGWriter

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = pixels.shape[:2]
    image = vtkImageData()
    image.SetDimensions(width, height, 1)
    scalars = numpy_to_vtk(np.ascontiguousarray(pixels[::-1]).reshape(-1, pixels.shape[2]), deep=True)
    image.GetPointData().SetScalars(scalars)
    writer = vtkPNGWriter()
    writer.SetCompressionLevel(9)
    writer.SetFileName(str(path))
    writer.SetInputData(image)
    writer.Write()
    return path
