"""Slicer's slice view rendered offscreen (MoMESegmentation/MoMESlicer/render.py) on real MRML nodes.

A small synthetic volume and a one-segment segmentation are built with ``slicer.util`` and drawn by
Slicer's slice logic and segmentations displayable manager; the picture must show the segment's
colour blended over the volume exactly where the segment is, on the patient-right side of the
screen's left half, and plain grey elsewhere. Skips, naming the reason, without ``slicer-core``.
"""

from __future__ import annotations

import numpy as np
import pytest

from MoMESlicer import slicer_core

REASON = slicer_core.available()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

SIZE = 128
COLOUR = (0.1, 0.9, 0.2)
GREY_HU = 40.0  # the window's level: mid grey


@pytest.fixture
def core():
    core = slicer_core.start()
    core.clear()
    yield core
    core.clear()


def build_scene(core):
    """A 40 x 40 x 10 mm volume centred on the origin (1 mm voxels, RAS axes) and one box segment.

    The box covers RAS x 4..13 (patient right), y -10..-1, z -2..2; returns ``(volume, segmentation,
    box_min, box_max)`` with the box's corners in RAS.
    """
    import slicer

    volume = core.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "synthetic")
    volume.SetOrigin(-20.0, -20.0, -5.0)
    volume.SetSpacing(1.0, 1.0, 1.0)
    slicer.util.updateVolumeFromArray(volume, np.full((10, 40, 40), GREY_HU, np.int16))
    volume.CreateDefaultDisplayNodes()
    display = volume.GetDisplayNode()
    display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
    display.AutoWindowLevelOff()
    display.SetWindowLevel(400.0, GREY_HU)

    segmentation = core.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segment_id = segmentation.GetSegmentation().AddEmptySegment("box", "box", COLOUR)
    mask = np.zeros((10, 40, 40), np.uint8)
    box_min, box_max = np.array([4, -10, -2]), np.array([13, -1, 2])  # RAS, voxel centres
    lo, hi = box_min - [-20, -20, -5], box_max - [-20, -20, -5]   # voxel indices (i, j, k)
    mask[lo[2]:hi[2] + 1, lo[1]:hi[1] + 1, lo[0]:hi[0] + 1] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, segment_id, volume)
    return volume, segmentation, box_min, box_max


def screen_rows_columns(view, ras_points: np.ndarray) -> np.ndarray:
    """(row, column) in the captured picture (row 0 at the top) of RAS points on the slice."""
    import slicer.util

    xy_to_ras = view.slice_node.GetXYToRAS()
    matrix = slicer.util.arrayFromVTKMatrix(xy_to_ras)
    xy = np.linalg.inv(matrix) @ np.c_[ras_points, np.ones(len(ras_points))].T
    return np.stack([SIZE - 1 - xy[1], xy[0]], axis=1)


def test_axial_slice_view_draws_the_segment_over_the_volume_where_it_is(core):
    from MoMESlicer import render as slicer_render

    volume, _segmentation, box_min, box_max = build_scene(core)
    view = slicer_render.SliceViewRenderer(core, "Red", "Axial", size=(SIZE, SIZE))
    try:
        view.show(volume)
        view.jump_to((0.0, 0.0, 0.0))
        pixels = view.capture().astype(int)
        # the box's outer faces (voxel centres +- half a voxel) on screen
        corners = screen_rows_columns(view, np.array([box_min - 0.5, box_max + 0.5], float))
        volume_area = screen_rows_columns(view, np.array([[-19.5, -19.5, 0], [19.5, 19.5, 0]], float))
    finally:
        view.close()

    (row_a, col_a), (row_b, col_b) = corners
    top, bottom = sorted((row_a, row_b))
    left, right = sorted((col_a, col_b))
    rows, columns = np.mgrid[0:SIZE, 0:SIZE]
    inside = (rows > top + 2) & (rows < bottom - 2) & (columns > left + 2) & (columns < right - 2)
    near = (rows > top - 3) & (rows < bottom + 3) & (columns > left - 3) & (columns < right + 3)
    in_volume = ((rows > volume_area[:, 0].min() + 2) & (rows < volume_area[:, 0].max() - 2)
                 & (columns > volume_area[:, 1].min() + 2) & (columns < volume_area[:, 1].max() - 2))
    assert inside.sum() > 50, "the box is too small on screen for the test to mean anything"

    # Radiological convention: patient right (RAS x > 0) is on the screen's left.
    assert right < SIZE / 2, (f"the patient-right box is not on the left of the screen "
                              f"(columns {left:.0f}..{right:.0f})")

    grey = pixels[in_volume & ~near]
    assert len(grey) > 100
    assert np.all(np.abs(grey - grey.mean(axis=0)) <= 2), "the volume outside the segment is not one grey"
    grey_level = grey.mean()
    assert 100 < grey_level < 155, f"the volume at its window's level is not mid grey: {grey_level:.0f}"
    assert np.ptp(grey.mean(axis=0)) < 2, "the volume outside the segment is tinted"

    # Slicer's default 2D fill: the segment's colour at half opacity over the volume's grey.
    expected = 0.5 * grey_level + 0.5 * 255 * np.array(COLOUR)
    filled = pixels[inside]
    assert np.all(np.abs(filled - expected) <= 12), (
        f"segment pixels {np.unique(filled, axis=0)[:5].tolist()} are not its colour over grey "
        f"{expected.round().tolist()}")

    # The outline ring is drawn in the segment's colour, fully opaque: greener than the fill.
    ring = pixels[near & ~inside & in_volume]
    assert (ring[:, 1] - ring[:, 0] > 150).any(), "no outline in the segment's colour around the box"
