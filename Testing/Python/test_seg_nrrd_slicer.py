"""``.seg.nrrd`` files against 3D Slicer's own reader and writer (``vtkMRMLSegmentationStorageNode``).

The library writes and reads ``.seg.nrrd`` through slicerio (:mod:`MoMESegmentationLib.io.segmentation`).
Here Slicer's storage node, from the ``slicer-core`` wheel, is the judge:

* files we write are read by Slicer: every segment voxel for voxel (taken from the labelmap Slicer
  holds, without resampling), its grid (oblique directions, spacing, origin), name, colour and
  terminology (type modifiers such as laterality, anatomic region and region modifier), with
  overlapping segments in separate layers and the others sharing one;
* files Slicer writes (full grid or cropped to the segments) are read by us with the same masks,
  names, colours and terminology, and written again for Slicer without a voxel changing;
* a file in RAS space reads the same in Slicer and here.

Geometries, masks and terminologies are drawn by hypothesis. Skipped where slicer-core is missing.
"""

from __future__ import annotations

import nrrd
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from MoMESegmentationLib.io.segmentation import (
    Segment,
    Segmentation,
    align_segmentation,
    read_segmentation,
    terminology_from_string,
    terminology_to_string,
    write_segmentation,
)
from MoMESegmentationLib.io.volume import Volume
from MoMESegmentationLib.vocabulary import Vocabulary

EXAMPLES = settings(max_examples=12, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

VOCABULARY = Vocabulary.load()
#: Terminologies with every optional part in use: laterality as a type modifier (kidney_left), an
#: anatomic region (liver_tumor) and a region with its laterality modifier (kidney_cyst_left).
TERMINOLOGIES = [VOCABULARY.get(name).terminology
                 for name in ("liver", "kidney_left", "kidney_right", "liver_tumor", "kidney_cyst_left")]


def test_the_terminologies_cover_every_part():
    parts = {key for terminology in TERMINOLOGIES for key, code in terminology.items() if code}
    assert parts == {"category", "type", "modifier", "region", "region_modifier"}


# ------------------------------------------------------------------------------ hypothesis data
@st.composite
def grids(draw) -> Volume:
    """A small grid with an oblique (possibly left-handed) direction matrix."""
    shape = tuple(draw(st.integers(2, 9)) for _ in range(3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    direction = q * np.sign(np.diag(r))[None, :]
    return Volume(np.zeros(shape, np.uint8), rng.uniform(0.3, 4.0, 3), rng.uniform(-300, 300, 3), direction)


@st.composite
def segmentations(draw) -> Segmentation:
    reference = draw(grids())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    segments = []
    for n in range(draw(st.integers(1, 5))):
        mask = rng.random(reference.shape) < draw(st.sampled_from([0.0, 0.1, 0.4]))
        if draw(st.booleans()) and segments:  # make it overlap an earlier segment
            mask |= segments[-1].mask & (rng.random(reference.shape) < 0.5)
        segments.append(Segment(
            name=f"structure {n}", mask=mask, color=tuple(float(c) for c in np.round(rng.random(3), 4)),
            label_value=n + 1, terminology=draw(st.sampled_from([None, *TERMINOLOGIES])),
            id=draw(st.sampled_from([None, f"s{n}"]))))
    return Segmentation(reference, segments)


# ------------------------------------------------------------------------------ Slicer helpers
def vtk_matrix(array: np.ndarray):
    import slicer.util

    return slicer.util.vtkMatrixFromArray(array)


def numpy_matrix(matrix) -> np.ndarray:
    import slicer.util

    return slicer.util.arrayFromVTKMatrix(matrix)


def slicer_read(core, path):
    node = core.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = core.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node), f"Slicer could not read {path}"
    core.scene.RemoveNode(storage)
    return node


def slicer_segments(node, reference: Volume) -> list[dict]:
    """Each segment as Slicer holds it, its mask put on ``reference``'s grid by index only.

    The labelmap Slicer keeps for a segment (a shared layer, or the segment's own) must lie on the
    reference grid: same directions, spacing and origin, its extent a box inside the grid.
    """
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    out = []
    segmentation = node.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        segment = segmentation.GetSegment(segment_id)
        image = segment.GetRepresentation("Binary labelmap")
        matrix = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(matrix)
        np.testing.assert_allclose(numpy_matrix(matrix), reference.affine_ras, atol=1e-6)
        i0, i1, j0, j1, k0, k1 = image.GetExtent()
        mask = np.zeros(reference.shape, bool)
        if i1 >= i0 and j1 >= j0 and k1 >= k0:
            assert min(i0, j0, k0) >= 0 and (i1, j1, k1) < reference.shape
            values = vtk_to_numpy(image.GetPointData().GetScalars())
            values = values.reshape(k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1)
            mask[i0:i1 + 1, j0:j1 + 1, k0:k1 + 1] = values.transpose(2, 1, 0) == segment.GetLabelValue()
        out.append({"id": segment_id, "name": segment.GetName(), "color": segment.GetColor(),
                    "terminology": segment.GetTerminology(), "mask": mask})
    return out


def oriented_image(mask: np.ndarray, reference: Volume):
    import slicer
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    image = slicer.vtkOrientedImageData()
    image.SetDimensions(*mask.shape)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    vtk_to_numpy(image.GetPointData().GetScalars())[:] = mask.transpose(2, 1, 0).ravel()
    image.SetImageToWorldMatrix(vtk_matrix(reference.affine_ras))
    return image


def slicer_segmentation(core, seg: Segmentation):
    """A segmentation node made by Slicer's own API from ``seg`` (overlaps kept in layers)."""
    from slicer import vtkSegmentationConverter, vtkSlicerSegmentationsModuleLogic

    node = core.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation = node.GetSegmentation()
    geometry = vtkSegmentationConverter.SerializeImageGeometry(
        oriented_image(np.zeros(seg.reference.shape, bool), seg.reference))
    name = vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    segmentation.SetConversionParameter(name, geometry)
    for n, segment in enumerate(seg.segments):
        segment_id = segmentation.AddEmptySegment(segment.id or f"slicer_{n}", segment.name, segment.color)
        assert vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            oriented_image(segment.mask, seg.reference), node, segment_id)
        if segment.terminology:
            segmentation.GetSegment(segment_id).SetTerminology(terminology_to_string(segment.terminology))
    segmentation.CollapseBinaryLabelmaps(False)
    return node


def overlaps(seg: Segmentation) -> bool:
    return any(np.any(a.mask & b.mask) for n, a in enumerate(seg.segments) for b in seg.segments[n + 1:])


#: What Slicer gives a segment created without terminology ("Tissue").
SLICER_DEFAULT_TERMINOLOGY = {"category": {"scheme": "SCT", "code": "85756007", "meaning": "Tissue"},
                              "type": {"scheme": "SCT", "code": "85756007", "meaning": "Tissue"},
                              "modifier": None, "region": None, "region_modifier": None}


def assert_same_segments(got: Segmentation, expected: Segmentation, default_terminology=None) -> None:
    assert got.names == expected.names
    for mine, theirs in zip(got.segments, expected.segments):
        np.testing.assert_array_equal(mine.mask, theirs.mask, err_msg=mine.name)
        np.testing.assert_allclose(mine.color, theirs.color, atol=1e-6)
        assert mine.terminology == (theirs.terminology or default_terminology)


# ------------------------------------------------------------------------------------- tests
@EXAMPLES
@given(seg=segmentations())
def test_slicer_reads_what_we_write(core, tmp_path, seg):
    path = write_segmentation(seg, tmp_path / "ours.seg.nrrd")
    node = slicer_read(core, path)
    try:
        found = slicer_segments(node, seg.reference)
        assert [s["name"] for s in found] == seg.names
        for ours, theirs in zip(seg.segments, found):
            np.testing.assert_array_equal(theirs["mask"], ours.mask, err_msg=ours.name)
            np.testing.assert_allclose(theirs["color"], ours.color, atol=1e-6)
            if ours.id:
                assert theirs["id"] == ours.id
            if ours.terminology:
                assert theirs["terminology"] == terminology_to_string(ours.terminology)
                assert terminology_from_string(theirs["terminology"]) == ours.terminology
        # non-overlapping segments share one labelmap layer, as in Slicer's own files
        layers = node.GetSegmentation().GetNumberOfLayers()
        assert layers >= 2 if overlaps(seg) else layers == 1
    finally:
        core.scene.RemoveNode(node)


@EXAMPLES
@given(seg=segmentations(), crop=st.booleans())
def test_we_read_what_slicer_writes_and_slicer_reads_it_back(core, tmp_path, seg, crop):
    node = slicer_segmentation(core, seg)
    storage = core.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetCropToMinimumExtent(crop)
    storage.SetFileName(str(tmp_path / "slicer.seg.nrrd"))
    try:
        assert storage.WriteData(node)
    finally:
        core.scene.RemoveNode(storage)
        core.scene.RemoveNode(node)
    header = nrrd.read_header(str(tmp_path / "slicer.seg.nrrd"))
    assert header["dimension"] == (4 if overlaps(seg) else 3)

    read = read_segmentation(tmp_path / "slicer.seg.nrrd")
    if not crop:
        assert read.reference.same_grid(seg.reference, atol=1e-6)
    aligned = align_segmentation(read, seg.reference)
    assert_same_segments(aligned, seg, SLICER_DEFAULT_TERMINOLOGY)

    # and back to Slicer through our writer, voxel for voxel
    again = slicer_read(core, write_segmentation(aligned, tmp_path / "again.seg.nrrd"))
    try:
        for ours, theirs in zip(seg.segments, slicer_segments(again, seg.reference)):
            np.testing.assert_array_equal(theirs["mask"], ours.mask, err_msg=ours.name)
    finally:
        core.scene.RemoveNode(again)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seg=segmentations())
def test_a_ras_space_file_reads_the_same_in_slicer_and_here(core, tmp_path, seg):
    voxels, header = nrrd.read(str(write_segmentation(seg, tmp_path / "lps.seg.nrrd")), index_order="F")
    flip = np.diag([-1.0, -1.0, 1.0])
    header["space"] = "right-anterior-superior"
    header["space origin"] = flip @ header["space origin"]
    directions = header["space directions"]
    spatial = np.isfinite(directions).all(axis=1)
    directions[spatial] = directions[spatial] @ flip
    nrrd.write(str(tmp_path / "ras.seg.nrrd"), voxels, header, index_order="F")

    read = read_segmentation(tmp_path / "ras.seg.nrrd")
    assert read.reference.same_grid(seg.reference, atol=1e-6)
    assert_same_segments(read, seg)
    node = slicer_read(core, tmp_path / "ras.seg.nrrd")
    try:
        for ours, theirs in zip(seg.segments, slicer_segments(node, seg.reference)):
            np.testing.assert_array_equal(theirs["mask"], ours.mask, err_msg=ours.name)
    finally:
        core.scene.RemoveNode(node)


def test_many_structures_keep_their_label_values_in_one_layer(core, tmp_path):
    """The label value of each structure (as in the label-map output) is the value in Slicer's layer."""
    reference = Volume(np.zeros((40, 3, 2), np.uint8), [1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    segments = []
    for n in range(40):
        mask = np.zeros(reference.shape, bool)
        mask[n] = True
        segments.append(Segment(f"s{n}", mask, (0.5, 0.5, 0.5), label_value=2 * n + 3))
    path = write_segmentation(Segmentation(reference, segments), tmp_path / "many.seg.nrrd")
    node = slicer_read(core, path)
    try:
        segmentation = node.GetSegmentation()
        assert segmentation.GetNumberOfLayers() == 1
        values = [segmentation.GetNthSegment(n).GetLabelValue() for n in range(40)]
        assert values == [2 * n + 3 for n in range(40)]
    finally:
        core.scene.RemoveNode(node)
