"""The Segment Editor effect's core on Slicer's real segment editor logic (slicer-core from PyPI).

A small synthetic volume with a known intensity pattern and segments at known voxels; a seeded
random structure mask is written into a segment through ``vtkSlicerSegmentEditorLogic``. Every
expected result is computed with numpy from the masks built here, following Slicer's documented
masking rules; the segments are read back with ``slicer.util``.
"""

from __future__ import annotations

import numpy as np
import pytest

from MoMESlicer import slicer_core

REASON = slicer_core.available()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

SHAPE = (16, 18, 20)  # (k, j, i): 20 x 18 x 16 voxels


@pytest.fixture
def scene(core):
    core.clear()
    yield core.scene
    core.clear()


def matrix(array):
    import slicer.util

    return slicer.util.vtkMatrixFromArray(array)


def to_numpy(vtk_matrix) -> np.ndarray:
    import slicer.util

    return slicer.util.arrayFromVTKMatrix(vtk_matrix)


def oblique_ijk_to_ras() -> np.ndarray:
    from scipy.spatial.transform import Rotation

    out = np.eye(4)
    out[:3, :3] = Rotation.from_euler("xyz", [20, -35, 50], degrees=True).as_matrix() @ np.diag([0.8, 1.1, 2.5])
    out[:3, 3] = [-12.0, 7.5, 30.0]
    return out


def box(k0, k1, j0, j1, i0, i1) -> np.ndarray:
    out = np.zeros(SHAPE, dtype=bool)
    out[k0:k1, j0:j1, i0:i1] = True
    return out


class Setup:
    """Volume, segmentation (target T; others A, B, hidden C), editor parts and the structure mask."""

    def __init__(self, scene, core, ijk_to_ras=None, transform=None):
        import slicer

        from MoMESlicer.segment_editor import LogicEditorParts

        k, j, i = np.indices(SHAPE)
        self.intensity = ((i + 2 * j + 3 * k) % 50).astype(np.int16)
        self.volume = slicer.util.addVolumeFromArray(self.intensity, name="CT")
        if ijk_to_ras is not None:
            self.volume.SetIJKToRASMatrix(matrix(ijk_to_ras))
        self.segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Seg")
        self.segmentation.CreateDefaultDisplayNodes()
        if transform is not None:
            node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "T")
            node.SetMatrixTransformToParent(matrix(transform))
            self.volume.SetAndObserveTransformNodeID(node.GetID())
            self.segmentation.SetAndObserveTransformNodeID(node.GetID())
        self.segmentation.SetReferenceImageGeometryParameterFromVolumeNode(self.volume)
        self.initial = {
            "T": box(1, 6, 1, 7, 1, 8),
            "A": box(4, 12, 8, 15, 3, 12),
            "B": box(9, 15, 2, 9, 10, 19),
            "C": box(2, 10, 12, 17, 13, 19),
        }
        self.ids = {}
        for name, array in self.initial.items():
            segment_id = self.segmentation.GetSegmentation().AddEmptySegment(name, name)
            self.ids[name] = segment_id
            slicer.util.updateSegmentBinaryLabelmapFromArray(array.astype(np.uint8), self.segmentation, segment_id, self.volume)
        self.segmentation.GetDisplayNode().SetSegmentVisibility(self.ids["C"], False)
        self.parts = LogicEditorParts.create(scene, self.segmentation, self.volume, app_logic=core.app_logic)
        self.editor = self.parts.editor_node
        self.editor.SetSelectedSegmentID(self.ids["T"])
        self.mask = np.random.default_rng(7).random(SHAPE) < 0.45
        self.assert_segments(self.initial)

    def arrays_np(self) -> dict[str, np.ndarray]:
        import slicer

        return {name: slicer.util.arrayFromSegmentBinaryLabelmap(self.segmentation, sid, self.volume) != 0
                for name, sid in self.ids.items()}

    def apply(self, mode="replace", mask=None, **kwargs):
        from MoMESlicer.segment_editor import apply_structure

        apply_structure(self.parts, self.ids["T"], self.mask if mask is None else mask, mode, **kwargs)

    def assert_segments(self, expected: dict[str, np.ndarray]):
        actual = self.arrays_np()
        for name in self.ids:
            np.testing.assert_array_equal(actual[name], expected[name], err_msg=f"segment {name}")


def expected_after(setup: Setup, mode: str, editable: np.ndarray, overwrite: tuple[str, ...],
                   mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Slicer's rules: only editable voxels change; painted voxels leave the overwritten segments."""
    mask = setup.mask if mask is None else mask
    old = setup.initial
    painted = mask & editable
    if mode == "replace":
        target = painted | (old["T"] & ~editable)
        taken = target
    elif mode == "add":
        target = old["T"] | painted
        taken = painted
    else:
        target = old["T"] & ~painted
        taken = np.zeros(SHAPE, bool)
    out = {"T": target}
    for name in ("A", "B", "C"):
        out[name] = old[name] & ~taken if name in overwrite else old[name]
    return out


OTHERS = ("A", "B", "C")
VISIBLE = ("A", "B")


# ------------------------------------------------------------------------------- editable area


@pytest.mark.parametrize("mode", ["replace", "add", "remove"])
@pytest.mark.parametrize("area", ["everywhere", "inside_all", "inside_visible", "outside_all",
                                  "outside_visible", "inside_single"])
def test_editable_area(scene, core, area, mode, request):
    from slicer import vtkMRMLSegmentationNode as S
    from slicer import vtkMRMLSegmentEditorNode

    if area == "inside_single" and mode in ("replace", "remove"):
        # Slicer 5.12 (slicer-core): erasing from the selected segment with the editable area
        # "inside one segment" hands the erased voxels to that mask segment (shared labelmap layer).
        request.applymarker(pytest.mark.xfail(strict=True, reason="Slicer's Remove inside a single segment"))
    setup = Setup(scene, core)
    old = setup.initial
    union_all = old["A"] | old["B"] | old["C"]
    union_visible = old["A"] | old["B"]
    areas = {
        "everywhere": (S.EditAllowedEverywhere, np.ones(SHAPE, bool)),
        "inside_all": (S.EditAllowedInsideAllSegments, union_all),
        "inside_visible": (S.EditAllowedInsideVisibleSegments, union_visible),
        "outside_all": (S.EditAllowedOutsideAllSegments, ~union_all),
        "outside_visible": (S.EditAllowedOutsideVisibleSegments, ~union_visible),
        "inside_single": (S.EditAllowedInsideSingleSegment, old["A"]),
    }
    mask_mode, editable = areas[area]
    # Slicer's edit mask leaves the selected segment out of the "segments": its own voxels stay
    # editable in every area mode.
    editable = editable | old["T"]
    setup.editor.SetMaskMode(mask_mode)
    if area == "inside_single":
        setup.editor.SetMaskSegmentID(setup.ids["A"])
    setup.editor.SetOverwriteMode(vtkMRMLSegmentEditorNode.OverwriteNone)
    setup.apply(mode)
    setup.assert_segments(expected_after(setup, mode, editable, ()))


def test_editable_intensity_range(scene, core):
    from slicer import vtkMRMLSegmentationNode as S
    from slicer import vtkMRMLSegmentEditorNode

    setup = Setup(scene, core)
    setup.editor.SetMaskMode(S.EditAllowedOutsideVisibleSegments)
    setup.editor.SetSourceVolumeIntensityMask(True)
    setup.editor.SetSourceVolumeIntensityMaskRange(10, 30)
    setup.editor.SetOverwriteMode(vtkMRMLSegmentEditorNode.OverwriteNone)
    setup.apply("replace")
    in_range = (setup.intensity >= 10) & (setup.intensity <= 30)
    editable = in_range & ~(setup.initial["A"] | setup.initial["B"])
    setup.assert_segments(expected_after(setup, "replace", editable, ()))
    assert 0 < (setup.mask & ~in_range).sum()  # the range really excluded painted voxels


# ------------------------------------------------------------------------------- overwrite


@pytest.mark.parametrize("mode", ["replace", "add", "remove"])
@pytest.mark.parametrize("overwrite", ["all", "visible", "none"])
def test_overwrite_mode(scene, core, overwrite, mode):
    from slicer import vtkMRMLSegmentationNode as S
    from slicer import vtkMRMLSegmentEditorNode as E

    setup = Setup(scene, core)
    setup.editor.SetMaskMode(S.EditAllowedEverywhere)
    setup.editor.SetOverwriteMode({"all": E.OverwriteAllSegments, "visible": E.OverwriteVisibleSegments,
                                   "none": E.OverwriteNone}[overwrite])
    setup.apply(mode)
    overwritten = {"all": OTHERS, "visible": VISIBLE, "none": ()}[overwrite]
    expected = expected_after(setup, mode, np.ones(SHAPE, bool), overwritten)
    setup.assert_segments(expected)
    if mode != "remove":
        for name in OTHERS:  # the mask really overlaps every other segment
            assert (setup.mask & setup.initial[name]).any()


# ------------------------------------------------------------------------------- ROI / slab


@pytest.mark.parametrize("mode", ["replace", "add", "remove"])
@pytest.mark.parametrize("region", ["roi", "slab", "both"])
def test_region_restriction(scene, core, region, mode):
    from slicer import vtkMRMLSegmentationNode as S
    from slicer import vtkMRMLSegmentEditorNode as E

    setup = Setup(scene, core)
    setup.editor.SetMaskMode(S.EditAllowedEverywhere)
    setup.editor.SetOverwriteMode(E.OverwriteAllSegments)
    roi = (2, 11, 3, 9, 0, 15)  # i0, i1, j0, j1, k0, k1 (inclusive)
    slab = (3, 7)
    inside = np.zeros(SHAPE, bool)
    kwargs = {}
    if region in ("roi", "both"):
        kwargs["roi_box_ijk"] = roi
    if region in ("slab", "both"):
        kwargs["slab"] = slab
    k0, k1 = slab if region != "roi" else (0, SHAPE[0] - 1)
    if region == "slab":
        inside[k0:k1 + 1] = True
    else:
        inside[k0:k1 + 1, roi[2]:roi[3] + 1, roi[0]:roi[1] + 1] = True
    setup.apply(mode, **kwargs)
    # Within the region: the rules with everything editable; outside it nothing changes.
    expected = expected_after(setup, mode, inside, OTHERS)
    setup.assert_segments(expected)
    assert (setup.initial["T"] & ~inside).any()  # the segment has voxels outside that must survive


# ------------------------------------------------------------------------------- undo / redo


def test_undo_restores_and_redo_reapplies(scene, core):
    from slicer import vtkMRMLSegmentationNode as S
    from slicer import vtkMRMLSegmentEditorNode as E

    setup = Setup(scene, core)
    setup.editor.SetMaskMode(S.EditAllowedOutsideVisibleSegments)
    setup.editor.SetOverwriteMode(E.OverwriteAllSegments)
    before = setup.arrays_np()
    setup.apply("replace")
    first = setup.arrays_np()
    assert not np.array_equal(first["T"], before["T"])
    second_mask = box(0, 16, 0, 18, 0, 10)
    setup.editor.SetMaskMode(S.EditAllowedEverywhere)
    setup.apply("add", mask=second_mask)
    second = setup.arrays_np()
    np.testing.assert_array_equal(second["T"], first["T"] | second_mask)

    logic = setup.parts.logic
    assert logic.CanUndo()
    logic.Undo()
    for name, array in setup.arrays_np().items():
        np.testing.assert_array_equal(array, first[name], err_msg=name)
    logic.Undo()
    for name, array in setup.arrays_np().items():
        np.testing.assert_array_equal(array, before[name], err_msg=name)
    assert logic.CanRedo()
    logic.Redo()
    for name, array in setup.arrays_np().items():
        np.testing.assert_array_equal(array, first[name], err_msg=name)
    logic.Redo()
    for name, array in setup.arrays_np().items():
        np.testing.assert_array_equal(array, second[name], err_msg=name)


# ------------------------------------------------------------------------------- geometry


def test_oblique_volume_under_transform_lands_on_its_grid(scene, core):
    from scipy.spatial.transform import Rotation
    from slicer import vtkMRMLSegmentationNode as S
    from slicer import vtkMRMLSegmentEditorNode as E

    transform = np.eye(4)
    transform[:3, :3] = Rotation.from_euler("zyx", [15, 5, -25], degrees=True).as_matrix()
    transform[:3, 3] = [3.0, -4.0, 11.0]
    setup = Setup(scene, core, ijk_to_ras=oblique_ijk_to_ras(), transform=transform)
    setup.editor.SetMaskMode(S.EditAllowedEverywhere)
    setup.editor.SetSourceVolumeIntensityMask(True)  # requires the modifier on the source's grid
    setup.editor.SetSourceVolumeIntensityMaskRange(5, 45)
    setup.editor.SetOverwriteMode(E.OverwriteAllSegments)
    setup.apply("replace")
    in_range = (setup.intensity >= 5) & (setup.intensity <= 45)
    setup.assert_segments(expected_after(setup, "replace", in_range, OTHERS))


def test_modifier_geometry(scene, core):
    import slicer

    from MoMESlicer.segment_editor import mask_to_modifier

    ijk_to_ras = oblique_ijk_to_ras()
    volume = slicer.util.addVolumeFromArray(np.zeros(SHAPE, np.int16), name="V")
    volume.SetIJKToRASMatrix(matrix(ijk_to_ras))
    transform = np.eye(4)
    transform[:3, 3] = [1.0, 2.0, 3.0]
    transform[:3, :3] = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]])
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetMatrixTransformToParent(matrix(transform))
    volume.SetAndObserveTransformNodeID(node.GetID())
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    mask = np.random.default_rng(3).random(SHAPE) < 0.3

    modifier = mask_to_modifier(mask, volume, segmentation)
    m = matrix(np.eye(4))
    modifier.GetImageToWorldMatrix(m)
    np.testing.assert_allclose(to_numpy(m), transform @ ijk_to_ras, atol=1e-9)
    assert modifier.GetExtent() == volume.GetImageData().GetExtent()
    from vtkmodules.util import numpy_support

    values = numpy_support.vtk_to_numpy(modifier.GetPointData().GetScalars()).reshape(SHAPE)
    np.testing.assert_array_equal(values, mask.astype(np.uint8))
    with pytest.raises(ValueError):
        mask_to_modifier(mask[:, :, :-1], volume, segmentation)


# ------------------------------------------------------------------------------- prompt


def test_segment_prompt(core):
    import slicer

    from MoMESlicer.segment_editor import segment_prompt
    from MoMESegmentationLib.vocabulary import Vocabulary

    vocabulary = Vocabulary.load()
    left = slicer.vtkSegment()
    left.SetName("my segment 1")
    left.SetTerminology(vocabulary["kidney_left"].terminology_entry)
    assert segment_prompt(left, vocabulary) == vocabulary["kidney_left"].name
    right = slicer.vtkSegment()
    right.SetName("x")
    right.SetTerminology(vocabulary["kidney_right"].terminology_entry)
    assert segment_prompt(right, vocabulary) == vocabulary["kidney_right"].name
    liver = slicer.vtkSegment()
    liver.SetName("Segment_3")
    liver.SetTerminology(vocabulary["liver"].terminology_entry)
    assert segment_prompt(liver) == vocabulary["liver"].name

    plain = slicer.vtkSegment()
    plain.SetName("spleen tip")
    assert segment_prompt(plain, vocabulary) == "spleen tip"  # no terminology: the name
    unknown = slicer.vtkSegment()
    unknown.SetName("lesion 2")
    unknown.SetTerminology("Segmentation category and type - 3D Slicer General Anatomy list"
                           "~SCT^49755003^Morphologically Altered Structure~SCT^999999^Made up~^^"
                           "~Anatomic codes - DICOM master list~^^~^^")
    assert segment_prompt(unknown, vocabulary) == "lesion 2"
