"""Slicer .seg.nrrd files and label maps as segments (MoMESegmentationLib.io.segmentation)."""

from __future__ import annotations

import nrrd
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from MoMESegmentationLib.errors import InputError, MoMEError
from MoMESegmentationLib.io.readers import write_labelmap
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

FAST = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

LIVER = {
    "category": {"scheme": "SCT", "code": "123037004", "meaning": "Anatomical Structure"},
    "type": {"scheme": "SCT", "code": "10200004", "meaning": "Liver"},
    "modifier": None,
    "region": None,
    "region_modifier": None,
}
KIDNEY_LEFT = {
    "category": {"scheme": "SCT", "code": "123037004", "meaning": "Anatomical Structure"},
    "type": {"scheme": "SCT", "code": "64033007", "meaning": "Kidney"},
    "modifier": {"scheme": "SCT", "code": "7771000", "meaning": "Left"},
    "region": None,
    "region_modifier": None,
}
# As Slicer writes a segment tag (3D Slicer General Anatomy list context).
SLICER_RIB_TAG = (
    "Segmentation.Status:inprogress|TerminologyEntry:Segmentation category and type - "
    "3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure~SCT^113197003^Rib~^^"
    "~Anatomic codes - DICOM master list~^^~^^|"
)


def random_rotation(seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    return q * np.sign(np.diag(r))[None, :]


def grid(shape=(6, 7, 8), seed=0) -> Volume:
    return Volume(
        np.zeros(shape, dtype=np.uint8), [0.8, 1.1, 2.5], [-40.0, 12.5, 100.0], random_rotation(seed)
    )


# ----------------------------------------------------------------------------- terminology
@pytest.mark.parametrize("terminology", [LIVER, KIDNEY_LEFT])
def test_terminology_string_round_trip(terminology):
    text = terminology_to_string(terminology)
    parts = text.split("~")
    assert len(parts) == 7
    assert parts[0] == "Segmentation category and type - 3D Slicer General Anatomy list"
    assert parts[1] == "SCT^123037004^Anatomical Structure"
    assert parts[4] == "Anatomic codes - DICOM master list"
    assert parts[3] == ("^^" if terminology["modifier"] is None else "SCT^7771000^Left")
    assert terminology_from_string(text) == terminology
    # codes left out read back as None
    short = {k: terminology[k] for k in ("category", "type")}
    expected = {**short, "modifier": None, "region": None, "region_modifier": None}
    assert terminology_from_string(terminology_to_string(short)) == expected


def test_terminology_parses_slicer_examples():
    text = (
        "Segmentation category and type - 3D Slicer General Anatomy list"
        "~SCT^49755003^Morphologically Altered Structure~SCT^4147007^Mass~^^"
        "~Anatomic codes - DICOM master list~SCT^23451007^Adrenal gland~SCT^24028007^Right"
    )
    parsed = terminology_from_string(text)
    assert parsed["type"] == {"scheme": "SCT", "code": "4147007", "meaning": "Mass"}
    assert parsed["modifier"] is None
    assert parsed["region"]["meaning"] == "Adrenal gland"
    assert parsed["region_modifier"]["code"] == "24028007"
    assert terminology_from_string(terminology_to_string(parsed)) == parsed
    assert terminology_from_string("garbage") is None
    with pytest.raises(ValueError, match="category"):
        terminology_to_string({"type": LIVER["type"]})


# ----------------------------------------------------------------------------- round trips
@st.composite
def segmentations(draw) -> Segmentation:
    shape = tuple(draw(st.integers(2, 12)) for _ in range(3))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    reference = Volume(
        np.zeros(shape, dtype=np.int16),
        rng.uniform(0.3, 3.0, 3),
        rng.uniform(-200, 200, 3),
        random_rotation(seed),
    )
    count = draw(st.integers(1, 5))
    segments = []
    for n in range(count):
        mask = rng.random(shape) < draw(st.sampled_from([0.0, 0.05, 0.3]))
        segments.append(
            Segment(
                name=f"structure {n}",
                mask=mask,
                color=tuple(float(c) for c in np.round(rng.random(3), 4)),
                label_value=n + 1,
                terminology=draw(st.sampled_from([None, LIVER, KIDNEY_LEFT])),
                id=draw(st.sampled_from([None, f"id_{n}"])),
            )
        )
    return Segmentation(reference, segments)


@FAST
@given(seg=segmentations())
def test_seg_nrrd_round_trip_with_overlaps(tmp_path, seg):
    path = tmp_path / "out.seg.nrrd"
    write_segmentation(seg, path)
    read = read_segmentation(path)
    assert read.reference.same_grid(seg.reference, atol=1e-9)
    assert len(read.segments) == len(seg.segments)
    for written, got in zip(seg.segments, read.segments):
        assert got.name == written.name
        np.testing.assert_array_equal(got.mask, written.mask)
        np.testing.assert_allclose(got.color, written.color, atol=1e-6)
        assert got.label_value == written.label_value  # distinct label values are kept
        assert got.terminology == written.terminology
        if written.id:
            assert got.id == written.id
    assert len({s.id for s in read.segments}) == len(read.segments)
    overlapping = any(
        np.any(a.mask & b.mask) for i, a in enumerate(seg.segments) for b in seg.segments[i + 1 :]
    )
    header = nrrd.read_header(str(path))
    assert header["dimension"] == (4 if overlapping else 3)
    assert header["space"] == "left-posterior-superior"


def test_header_follows_slicer_layout(tmp_path):
    reference = grid()
    a = np.zeros(reference.shape, bool)
    a[1:3, 2:5, 0:4] = True
    b = np.zeros(reference.shape, bool)
    b[2:4, 3:6, 3:5] = True  # overlaps a
    empty = np.zeros(reference.shape, bool)
    seg = Segmentation(
        reference,
        [
            Segment("liver", a, (1.0, 0.5, 0.0), 1, LIVER, "liver"),
            Segment("tumour", b, (0.0, 0.0, 1.0), 2),
            Segment("nothing", empty, (0.2, 0.2, 0.2), 3),
        ],
    )
    write_segmentation(seg, tmp_path / "s.seg.nrrd")
    voxels, header = nrrd.read(str(tmp_path / "s.seg.nrrd"), index_order="F")
    assert header["kinds"] == ["list", "domain", "domain", "domain"]
    assert voxels.shape == (2, *reference.shape) and voxels.dtype == np.uint8
    assert np.isnan(header["space directions"][0]).all()
    np.testing.assert_allclose(header["space directions"][1:].T, reference.direction * reference.spacing)
    assert header["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert header["Segmentation_ContainedRepresentationNames"] == "Binary labelmap|"
    assert header["Segmentation_ReferenceImageExtentOffset"] == "0 0 0"
    assert header["Segment0_ID"] == "liver" and header["Segment0_Layer"] == "0"
    assert header["Segment1_Layer"] == "1" and header["Segment1_LabelValue"] == "2"
    # every segment's extent is its layer's (the whole grid), as Slicer writes shared layers
    assert {header[f"Segment{n}_Extent"] for n in range(3)} == {"0 5 0 6 0 7"}
    assert header["Segment0_Tags"] == "TerminologyEntry:" + terminology_to_string(LIVER) + "|"
    assert [float(c) for c in header["Segment0_Color"].split()] == [1.0, 0.5, 0.0]
    np.testing.assert_array_equal(voxels[0] == 1, a)
    np.testing.assert_array_equal(voxels[1] == 2, b)


def test_duplicate_label_values_get_free_values_in_a_layer(tmp_path):
    reference = grid()
    masks = [np.zeros(reference.shape, bool) for _ in range(3)]
    for n, mask in enumerate(masks):
        mask[n] = True
    seg = Segmentation(reference, [Segment(f"s{n}", m, (0.5, 0.5, 0.5)) for n, m in enumerate(masks)])
    write_segmentation(seg, tmp_path / "s.seg.nrrd")
    read = read_segmentation(tmp_path / "s.seg.nrrd")
    assert nrrd.read_header(str(tmp_path / "s.seg.nrrd"))["dimension"] == 3
    assert sorted(s.label_value for s in read.segments) == [1, 2, 3]
    for written, got in zip(seg.segments, read.segments):
        np.testing.assert_array_equal(got.mask, written.mask)


def test_write_segmentation_errors(tmp_path):
    seg = Segmentation(grid(), [])
    with pytest.raises(MoMEError, match="does not exist"):
        write_segmentation(seg, tmp_path / "nope" / "s.seg.nrrd")
    with pytest.raises(ValueError, match="seg.nrrd"):
        write_segmentation(seg, tmp_path / "s.nii.gz")
    write_segmentation(seg, tmp_path / "empty.seg.nrrd")
    assert read_segmentation(tmp_path / "empty.seg.nrrd").segments == []
    with pytest.raises(ValueError, match="reference grid"):
        Segmentation(grid(), [Segment("x", np.zeros((2, 2, 2), bool), (0, 0, 0))])
    with pytest.raises(ValueError, match="color"):
        Segment("x", np.zeros((2, 2, 2), bool), (0, 0, 255))


# ----------------------------------------------------------------------------- Slicer exports
def slicer_header(reference: Volume, dimension: int, segments: list[dict], offset=(0, 0, 0)) -> dict:
    directions = (reference.direction * reference.spacing).T
    header = {
        "space": "left-posterior-superior",
        "space origin": reference.origin,
        "encoding": "gzip",
        "kinds": ["domain"] * 3 if dimension == 3 else ["list", "domain", "domain", "domain"],
        "space directions": directions
        if dimension == 3
        else np.vstack([np.full((1, 3), np.nan), directions]),
        "Segmentation_ContainedRepresentationNames": "Binary labelmap|Closed surface|",
        "Segmentation_ConversionParameters": "Collapse labelmaps|1|Merge&Oversampling factor|1|x&",
        "Segmentation_MasterRepresentation": "Binary labelmap",
        "Segmentation_ReferenceImageExtentOffset": " ".join(str(o) for o in offset),
    }
    for n, fields in enumerate(segments):
        for key, value in fields.items():
            header[f"Segment{n}_{key}"] = value
    return header


def test_reads_single_layer_slicer_export(tmp_path):
    reference = grid()
    labels = np.zeros(reference.shape, np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    labels[4:, 4:, 4:] = 2
    segments = [
        {
            "Color": "0.992157 0.909804 0.619608",
            "ColorAutoGenerated": "1",
            "Extent": "1 2 1 2 1 2",
            "ID": "Segment_1",
            "LabelValue": "1",
            "Layer": "0",
            "Name": "ribs",
            "NameAutoGenerated": "1",
            "Tags": SLICER_RIB_TAG,
        },
        {
            "Color": "1 1 0.811765",
            "ColorAutoGenerated": "1",
            "ID": "Segment_2",
            "LabelValue": "2",
            "Layer": "0",
            "Name": "spine",
            "NameAutoGenerated": "1",
            "Tags": "Segmentation.Status:inprogress|",
        },
    ]
    nrrd.write(
        str(tmp_path / "slicer.seg.nrrd"), labels, slicer_header(reference, 3, segments), index_order="F"
    )
    seg = read_segmentation(tmp_path / "slicer.seg.nrrd")
    assert seg.names == ["ribs", "spine"]
    assert seg.reference.same_grid(reference)
    np.testing.assert_array_equal(seg["ribs"].mask, labels == 1)
    np.testing.assert_array_equal(seg["Segment_2"].mask, labels == 2)
    assert seg["ribs"].terminology["type"] == {"scheme": "SCT", "code": "113197003", "meaning": "Rib"}
    assert seg["spine"].terminology is None
    np.testing.assert_allclose(seg["ribs"].color, (0.992157, 0.909804, 0.619608))
    np.testing.assert_array_equal(seg.labelmap(), labels)


def test_reads_multi_layer_cropped_slicer_export_and_aligns_it(tmp_path):
    """Slicer crops to the segments' extent: the origin moves and the offset records the shift."""
    reference = grid(shape=(10, 9, 8), seed=3)
    layers = np.zeros((2, 4, 3, 5), np.uint8)
    layers[0, 1:3, :, 1:4] = 1
    layers[1, 0:2, 1:3, 0:2] = 1  # overlaps layer 0
    layers[1, 3, 2, 4] = 4
    offset = np.array([3, 2, 1])
    cropped = Volume(layers[0], reference.spacing, reference.index_to_physical(offset), reference.direction)
    segments = [
        {"ID": "a", "Name": "a", "Color": "1 0 0", "LabelValue": "1", "Layer": "0", "Extent": "4 5 2 4 2 4"},
        {"ID": "b", "Name": "b", "Color": "0 1 0", "LabelValue": "1", "Layer": "1"},
        {"ID": "c", "Name": "c", "Color": "0 0 1", "LabelValue": "4", "Layer": "1"},
    ]
    header = slicer_header(cropped, 4, segments, offset=offset)
    nrrd.write(str(tmp_path / "crop.seg.nrrd"), layers, header, index_order="F")
    seg = read_segmentation(tmp_path / "crop.seg.nrrd")
    assert seg.reference.shape == (4, 3, 5)
    np.testing.assert_allclose(seg.reference.origin, reference.index_to_physical(offset))
    np.testing.assert_array_equal(seg["b"].mask, layers[1] == 1)
    np.testing.assert_array_equal(seg["c"].mask, layers[1] == 4)

    aligned = align_segmentation(seg, reference)
    assert aligned.reference.same_grid(reference)
    expected = np.zeros(reference.shape, bool)
    expected[3:7, 2:5, 1:6] = layers[0] == 1
    np.testing.assert_array_equal(aligned["a"].mask, expected)
    assert aligned["c"].mask.sum() == 1 and aligned["c"].mask[6, 4, 5]


def test_reads_a_single_voxel_segmentation_cropped_by_slicer(tmp_path):
    """Slicer crops to the segments: one marked voxel is a 1x1x1 image at the offset (not an empty file)."""
    reference = grid()
    offset = np.array([2, 3, 4])
    voxel = Volume(np.ones((1, 1, 1), np.uint8), reference.spacing, reference.index_to_physical(offset),
                   reference.direction)
    segments = [{"ID": "dot", "Name": "dot", "Color": "1 0 0", "LabelValue": "1", "Layer": "0",
                 "Extent": "0 0 0 0 0 0"},
                {"ID": "none", "Name": "none", "Color": "0 1 0", "LabelValue": "2", "Layer": "0",
                 "Extent": "0 0 0 0 0 0"}]
    header = slicer_header(voxel, 3, segments, offset=offset)
    nrrd.write(str(tmp_path / "dot.seg.nrrd"), voxel.array, header, index_order="F")
    aligned = align_segmentation(read_segmentation(tmp_path / "dot.seg.nrrd"), reference)
    assert np.argwhere(aligned["dot"].mask).tolist() == [offset.tolist()]
    assert not aligned["none"].mask.any()


def test_reads_old_style_files_without_layer_keys(tmp_path):
    """Slicer 4.x wrote one segment per layer, value 1, without Layer/LabelValue keys."""
    reference = grid()
    layers = np.zeros((2, *reference.shape), np.uint8)
    layers[0, 0:2] = 1
    layers[1, 1:3] = 1
    segments = [{"ID": "x", "Name": "x", "Color": "1 0 0"}, {"ID": "y", "Name": "y", "Color": "0 1 0"}]
    nrrd.write(str(tmp_path / "old.seg.nrrd"), layers, slicer_header(reference, 4, segments), index_order="F")
    seg = read_segmentation(tmp_path / "old.seg.nrrd")
    np.testing.assert_array_equal(seg["x"].mask, layers[0] == 1)
    np.testing.assert_array_equal(seg["y"].mask, layers[1] == 1)


def test_reads_ras_space_segmentation(tmp_path):
    reference = grid()
    labels = np.zeros(reference.shape, np.uint8)
    labels[0, 0, 0] = 1
    header = slicer_header(reference, 3, [{"ID": "p", "Name": "p", "Color": "1 1 1", "LabelValue": "1"}])
    header["space"] = "right-anterior-superior"
    flip = np.diag([-1.0, -1.0, 1.0])
    header["space origin"] = flip @ reference.origin
    header["space directions"] = (flip @ reference.direction * reference.spacing).T
    nrrd.write(str(tmp_path / "ras.seg.nrrd"), labels, header, index_order="F")
    seg = read_segmentation(tmp_path / "ras.seg.nrrd")
    assert seg.reference.same_grid(reference)


# ----------------------------------------------------------------------------- label maps
@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_label_map_with_label_table(tmp_path, suffix):
    reference = grid()
    labels = np.zeros(reference.shape, np.uint8)
    labels[1:3] = 1
    labels[4:] = 5
    write_labelmap(labels, reference, tmp_path / f"labels{suffix}")
    table = {
        1: {"name": "liver", "color": (221, 130, 101), "terminology": LIVER, "id": "liver"},
        5: "spleen",
        7: "absent",
    }
    seg = read_segmentation(tmp_path / f"labels{suffix}", label_table=table)
    assert seg.names == ["liver", "spleen", "absent"]
    assert seg.reference.same_grid(reference, atol=1e-4)
    np.testing.assert_array_equal(seg["liver"].mask, labels == 1)
    assert seg["liver"].terminology == LIVER and seg["liver"].label_value == 1
    np.testing.assert_allclose(seg["liver"].color, (221 / 255, 130 / 255, 101 / 255))
    assert seg["spleen"].label_value == 5 and not seg["absent"].mask.any()
    # without a table: one segment per label present
    assert read_segmentation(tmp_path / f"labels{suffix}").names == ["Label 1", "Label 5"]
    # and to a .seg.nrrd and back
    write_segmentation(seg, tmp_path / "converted.seg.nrrd")
    again = read_segmentation(tmp_path / "converted.seg.nrrd")
    np.testing.assert_array_equal(again.labelmap(), labels)


def test_read_segmentation_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_segmentation(tmp_path / "missing.seg.nrrd")
    (tmp_path / "junk.seg.nrrd").write_text("this is not nrrd")
    with pytest.raises(InputError, match="junk.seg.nrrd"):
        read_segmentation(tmp_path / "junk.seg.nrrd")
    write_labelmap(np.zeros((2, 3, 4), np.uint8), grid((2, 3, 4)), tmp_path / "l.nii.gz")
    seg = read_segmentation(tmp_path / "l.nii.gz")
    assert seg.segments == []


@FAST
@given(seg=segmentations(), data=st.data())
def test_segment_voxel_keeps_its_physical_point_through_file_and_canonical_grid(tmp_path, seg, data):
    from MoMESegmentationLib.io.geometry import canonicalize, restore_from_canonical

    reference = seg.reference
    index = np.array([data.draw(st.integers(0, n - 1)) for n in reference.shape])
    point = reference.index_to_physical(index)
    mask = np.zeros(reference.shape, bool)
    mask[tuple(index)] = True
    write_segmentation(
        Segmentation(reference, [Segment("dot", mask, (1.0, 0.0, 0.0))]), tmp_path / "dot.seg.nrrd"
    )
    read = read_segmentation(tmp_path / "dot.seg.nrrd")
    canonical, record = canonicalize(read.reference.with_array(read["dot"].mask), "RAS")
    found = np.argwhere(canonical.array)
    assert len(found) == 1
    assert np.all(np.abs(canonical.physical_to_index(point) - found[0]) < 0.5)
    np.testing.assert_array_equal(restore_from_canonical(canonical.array, record), mask)
