"""The demo montage (``outputs.render_montage``) shows each organ where it is, in its colour.

A phantom holds two boxes at known LPS positions: one on the patient's right and towards the head,
one on the patient's left and towards the feet. The network is the fault-injection stub
:class:`engine_fixtures.IntensityNetwork` (one box per structure by Hounsfield units), so the
result is known in advance. The PNG is then read back and the overlay colours located: axial
panels in radiological convention (patient right on screen left), the coronal panel head up, and
a legend entry in each found structure's exact colour.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_fixtures import ORGAN_HU, TISSUE_HU, IntensityNetwork, make_phantom, make_tiny_checkpoint, never
from MoMESegmentationLib.engine import Segmenter
from MoMESegmentationLib.outputs import render_montage

CENTRE = np.array([0.0, 0.0, 0.0])
KIDNEY_HU = 320.0
#: render_montage's CT window and overlay opacity
VMIN, VMAX, ALPHA = -175.0, 250.0, 0.55
#: LPS boxes: +x is the patient's left, +z the head
RIGHT_HEAD = (np.array([-45.0, -20.0, 10.0]), np.array([-10.0, 20.0, 45.0]))
LEFT_FEET = (np.array([10.0, -20.0, -45.0]), np.array([45.0, 20.0, -10.0]))


def band(low: float, high: float):
    return lambda hu: torch.where((hu > low) & (hu < high), torch.full_like(hu, 8.0), torch.full_like(hu, -8.0))


@pytest.fixture
def montage(tmp_path):
    # Function scope on purpose: each test renders its own montage (2 s), so that a mutation tester
    # that runs only the tests that reach render_montage sees every check, not the first test's only.
    folder = tmp_path
    segmenter = Segmenter(make_tiny_checkpoint(folder / "ckpt", spacing=3.0), device="cpu")
    segmenter.model = IntensityNetwork(segmenter, {
        "liver": band((TISSUE_HU + ORGAN_HU) / 2, (ORGAN_HU + KIDNEY_HU) / 2),
        "kidney_left": band((ORGAN_HU + KIDNEY_HU) / 2, 2000.0),
        "spleen": never,
    })
    volume = make_phantom((40, 36, 30), (3.0, 3.0, 4.5), centre=CENTRE,  # anisotropic: 4.5 mm slices
                          boxes=[(*RIGHT_HEAD, ORGAN_HU), (*LEFT_FEET, KIDNEY_HU)])
    result = segmenter.segment(volume, "liver, left kidney, spleen", anatomy_guard=False)
    assert [s.found for s in result.structures] == [True, True, False]
    path = folder / "montage.png"
    path.write_bytes(b"an older montage")
    render_montage(result, path, title="phantom")
    import matplotlib.image

    return result, matplotlib.image.imread(str(path))[..., :3], folder


def colour_pixels(image: np.ndarray, rgb) -> np.ndarray:
    """(row, column) of pixels within two 8-bit steps of ``rgb`` (0..1)."""
    close = np.all(np.abs(image - np.asarray(rgb)[None, None, :]) <= 2.5 / 255, axis=-1)
    return np.argwhere(close)


def overlay_colour(structure, hu: float) -> np.ndarray:
    """The structure's colour at the montage's opacity over the grey of ``hu``."""
    grey = np.clip((hu - VMIN) / (VMAX - VMIN), 0, 1)
    return ALPHA * np.asarray(structure.color) / 255 + (1 - ALPHA) * grey


def panels(image: np.ndarray) -> list[np.ndarray]:
    """The montage's panels: equal columns, 5 inches at 90 dpi each."""
    count = int(round(image.shape[1] / 450))
    width = image.shape[1] // count
    return [image[:, i * width:(i + 1) * width] for i in range(count)]


def test_the_file_is_replaced_and_no_temporary_file_is_left(montage):
    _, image, folder = montage
    assert image.shape[0] > 300 and image.shape[1] >= 900
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == ["montage.png"]


def test_axial_panels_show_the_patients_right_on_the_left(montage):
    result, image, _ = montage
    liver, kidney = result.structures[:2]
    *axials, _ = panels(image)
    assert len(axials) == 2, "two axial slices: one through each organ"
    seen = {"liver": 0, "kidney": 0}
    for panel in axials:
        middle = panel.shape[1] / 2
        liver_pixels = colour_pixels(panel, overlay_colour(liver, ORGAN_HU))
        kidney_pixels = colour_pixels(panel, overlay_colour(kidney, KIDNEY_HU))
        if len(liver_pixels):
            seen["liver"] += 1
            assert liver_pixels[:, 1].max() < middle, "the patient's right must be on the screen's left"
        if len(kidney_pixels):
            seen["kidney"] += 1
            assert kidney_pixels[:, 1].min() > middle
    assert seen == {"liver": 1, "kidney": 1}
    # the liver box is 35 mm (left-right) by 40 mm (front-back): the axial aspect follows the spacing
    liver_pixels = colour_pixels(axials[1] if colour_pixels(axials[1], overlay_colour(liver, ORGAN_HU)).size
                                 else axials[0], overlay_colour(liver, ORGAN_HU))
    height, width = np.ptp(liver_pixels[:, 0]) + 1, np.ptp(liver_pixels[:, 1]) + 1
    assert height / width == pytest.approx(40 / 35, rel=0.12)


def test_coronal_panel_shows_the_head_up(montage):
    result, image, _ = montage
    liver, kidney = result.structures[:2]
    coronal = panels(image)[-1]
    liver_pixels = colour_pixels(coronal, overlay_colour(liver, ORGAN_HU))
    kidney_pixels = colour_pixels(coronal, overlay_colour(kidney, KIDNEY_HU))
    assert len(liver_pixels) > 50 and len(kidney_pixels) > 50
    assert liver_pixels[:, 0].mean() < kidney_pixels[:, 0].mean(), "the head must be up"
    assert liver_pixels[:, 1].mean() < kidney_pixels[:, 1].mean(), "the patient's right must be on the left"
    # the boxes are as tall as they are wide (35 mm): the aspect ratio follows the 3 x 4.5 mm voxels
    for pixels in (liver_pixels, kidney_pixels):
        height, width = np.ptp(pixels[:, 0]) + 1, np.ptp(pixels[:, 1]) + 1
        assert height / width == pytest.approx(1.0, rel=0.15)


def test_legend_names_found_structures_in_their_exact_colours(montage):
    result, image, _ = montage
    legend = image[int(image.shape[0] * 0.85):]
    for structure in result.structures[:2]:
        assert len(colour_pixels(legend, np.asarray(structure.color) / 255)) > 20, structure.name
    spleen = result.structures[2]
    assert not len(colour_pixels(legend, np.asarray(spleen.color) / 255)), "a structure not found has no entry"
