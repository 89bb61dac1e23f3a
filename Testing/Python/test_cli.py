"""The `mome` command line: segment, evaluate, models, bad input (one-line errors, nothing left behind)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine_fixtures import (
    ORGAN_HU,
    IntensityNetwork,
    grid_centres,
    in_box,
    make_ct,
    make_phantom,
    make_tiny_checkpoint,
    never,
    step,
)
from MoMESegmentationLib.cli import main
from MoMESegmentationLib.io.readers import read_volume, write_volume

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture()
def ct_file(tmp_path):
    path = tmp_path / "ct.nrrd"
    write_volume(make_ct(direction=np.diag([-1.0, 1.0, 1.0])), path)
    return path


def run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_segment_writes_labelmap_and_summary_on_input_grid(checkpoint, ct_file, tmp_path, capsys):
    out = tmp_path / "seg.nii.gz"
    code, stdout, stderr = run(["segment", ct_file, "--prompt", "liver, left kidney", "-o", out,
                                "--model", checkpoint, "--device", "cpu", "--quiet"], capsys)
    assert code == 0, stderr
    summary = json.loads((tmp_path / "seg.json").read_text())
    assert [s["id"] for s in summary["structures"]] == ["liver", "kidney_left"]
    assert {"label", "name", "match", "similarity", "terminology", "color", "volume_ml",
            "mean_probability"} <= set(summary["structures"][0])
    labels, image = read_volume(out), read_volume(ct_file)
    assert labels.same_grid(image, atol=1e-5)


def test_segment_seg_nrrd_and_probabilities(checkpoint, ct_file, tmp_path, capsys):
    from MoMESegmentationLib.io.segmentation import read_segmentation

    out = tmp_path / "result.seg.nrrd"
    code, _, stderr = run(["segment", ct_file, "-p", "liver; spleen", "-o", out, "--model", checkpoint,
                           "--device", "cpu", "--probabilities", "--quiet"], capsys)
    assert code == 0, stderr
    assert (tmp_path / "result.json").is_file()
    assert len(list((tmp_path / "result_probabilities").glob("*.nii.gz"))) == 2
    seg = read_segmentation(out)
    assert seg.reference.same_grid(read_volume(ct_file), atol=1e-5)


def test_batch_into_folder(checkpoint, ct_file, tmp_path, capsys):
    second = tmp_path / "other.nii.gz"
    write_volume(make_ct(seed=4), second)
    out = tmp_path / "batch"
    out.mkdir()
    code, _, stderr = run(["segment", ct_file, second, "-p", "liver", "-o", out, "--model", checkpoint,
                           "--device", "cpu", "--quiet"], capsys)
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["ct.json", "ct.nii.gz", "other.json", "other.nii.gz"]


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_input", "not found"),
        ("empty_prompt", "no prompt given"),
        ("unknown_model", "unknown model"),
        ("missing_folder", "does not exist"),
        ("exists", "already exists"),
        ("bad_roi", "six numbers"),
        ("not_an_image", "ct.txt"),
        ("no_gpu", "no CUDA GPU is available"),
    ],
)
def test_bad_input_one_line_error_and_nothing_written(case, message, checkpoint, ct_file, tmp_path, capsys,
                                                      monkeypatch):
    out = tmp_path / "out.nii.gz"
    args = ["segment", ct_file, "-p", "liver", "-o", out, "--model", checkpoint, "--device", "cpu", "--quiet"]
    if case == "missing_input":
        args[1] = tmp_path / "nope.nii.gz"
    elif case == "empty_prompt":
        args[3] = " , "
    elif case == "unknown_model":
        args[args.index("--model") + 1] = "no-such-model"
    elif case == "missing_folder":
        args[5] = tmp_path / "missing" / "out.nii.gz"
    elif case == "exists":
        out.write_text("keep me")
    elif case == "bad_roi":
        args += ["--roi", "1,2,3"]
    elif case == "not_an_image":
        bogus = tmp_path / "ct.txt"
        bogus.write_text("hello")
        args[1] = bogus
    elif case == "no_gpu":
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        args[args.index("--device") + 1] = "cuda"
    before = sorted(p.name for p in tmp_path.iterdir())
    code, stdout, stderr = run(args, capsys)
    assert code == 2
    lines = [line for line in stderr.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("mome: error:") and message in lines[0], stderr
    assert "Traceback" not in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    if case == "exists":
        assert out.read_text() == "keep me"


def test_failure_during_write_leaves_nothing(checkpoint, ct_file, tmp_path, capsys, monkeypatch):
    calls = []

    def broken(*args, **kwargs):
        calls.append(args)
        raise OSError("disk full")

    monkeypatch.setattr("MoMESegmentationLib.io.readers.write_labelmap", broken)
    out = tmp_path / "seg.nii.gz"
    with pytest.raises(OSError):
        main(["segment", str(ct_file), "-p", "liver", "-o", str(out), "--model", str(checkpoint),
              "--device", "cpu", "--quiet"])
    assert not out.exists() and not (tmp_path / "seg.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mome-tmp")]
    assert len(calls) == 1, "the failure must come from writing the label map"


@pytest.mark.parametrize("suffix", [".nii.gz", ".seg.nrrd"])
def test_segment_writes_the_organ_where_it_is(checkpoint, tmp_path, capsys, monkeypatch, suffix):
    """With known probabilities (a fault-injection stub in place of the network: the organ is whatever
    exceeds 75 HU), the written file puts the organ on the LPS box of a flipped phantom, and the JSON
    reports it found and the other structure not found, with its rule."""
    from MoMESegmentationLib.engine import Segmenter
    from MoMESegmentationLib.io.segmentation import read_segmentation

    install = Segmenter.__init__

    def with_stub(self, *args, **kwargs):
        install(self, *args, **kwargs)
        self.model = IntensityNetwork(self, {"liver": step(ORGAN_HU / 2), "spleen": never})

    monkeypatch.setattr(Segmenter, "__init__", with_stub)
    centre = np.array([-40.0, 25.0, 310.0])
    low, high = centre + [-10.0, -30.0, -20.0], centre + [40.0, 20.0, 30.0]
    ct = tmp_path / "ct.nrrd"
    write_volume(make_phantom((40, 36, 30), (4.0, 4.5, 5.0), np.diag([-1.0, 1.0, -1.0]), centre,
                              [(low, high, ORGAN_HU)]), ct)
    out = tmp_path / f"seg{suffix}"
    code, _, stderr = run(["segment", ct, "-p", "liver, spleen", "-o", out, "--model", checkpoint,
                           "--device", "cpu", "--quiet", "--no-anatomy-guard"], capsys)
    assert code == 0, stderr

    if suffix == ".seg.nrrd":
        seg = read_segmentation(out)
        assert [s.name for s in seg.segments] == ["Liver"]
        grid, liver = seg.reference, seg.segments[0].mask
    else:
        grid = read_volume(out)
        assert set(np.unique(grid.array)) == {0, 1}
        liver = grid.array == 1
    points = grid_centres(grid.shape, grid.spacing, grid.origin, grid.direction)
    truth = in_box(points, low, high)
    margin = 5.0 + 6.0  # the phantom's coarsest spacing and the model's
    assert liver[in_box(points, low, high, -margin)].all()
    assert not liver[~in_box(points, low, high, margin)].any()
    np.testing.assert_allclose(points[liver].mean(axis=0), points[truth].mean(axis=0), atol=2.0)

    summary = json.loads(out.with_name("seg.json").read_text())
    liver_row, spleen_row = summary["structures"]
    assert liver_row["found"] and liver_row["rule"] == "" and liver_row["label"] == 1
    assert liver_row["volume_ml"] == pytest.approx(truth.sum() * 4.0 * 4.5 * 5.0 / 1000, rel=0.15)
    assert not spleen_row["found"] and spleen_row["rule"] == "empty" and spleen_row["volume_ml"] == 0
    assert summary["anatomy_guard"] is False


def test_segment_table_shows_the_uncertain_volume(checkpoint, tmp_path, capsys, monkeypatch):
    """The printed table has an "uncertain mL" column next to the mean probability, the summary's figure
    for every structure, also for one that is not found. With known probabilities: the liver is sure
    (p = 0.9997 inside its box), the spleen is p = 0.40 over the whole body, so never found and
    uncertain over the body's volume."""
    from MoMESegmentationLib.engine import Segmenter

    install = Segmenter.__init__

    def with_stub(self, *args, **kwargs):
        install(self, *args, **kwargs)
        self.model = IntensityNetwork(self, {
            "liver": step(ORGAN_HU / 2),
            "spleen": lambda hu: torch.where(hu > -100, torch.full_like(hu, -0.4), torch.full_like(hu, -8.0)),
        })

    monkeypatch.setattr(Segmenter, "__init__", with_stub)
    centre = np.array([-40.0, 25.0, 310.0])
    phantom = make_phantom((40, 36, 30), (4.0, 4.5, 5.0), np.eye(3), centre,
                           [(centre - 20.0, centre + 20.0, ORGAN_HU)])
    write_volume(phantom, tmp_path / "ct.nrrd")
    out = tmp_path / "seg.nii.gz"
    code, stdout, stderr = run(["segment", tmp_path / "ct.nrrd", "-p", "liver, spleen", "-o", out, "--model",
                                checkpoint, "--device", "cpu", "--no-anatomy-guard"], capsys)
    assert code == 0, stderr
    summary = json.loads((tmp_path / "seg.json").read_text())["structures"]
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("#"))
    assert lines[header].split()[-2:] == ["uncertain", "mL"]
    columns = lines[header].split()
    assert columns.index("uncertain") == columns.index("p") + 1  # next to the mean probability
    liver, spleen = (line.split() for line in lines[header + 2:header + 4])
    assert liver[:4] == ["1", "Liver", "liver", "yes"] and spleen[:4] == ["2", "Spleen", "spleen", "no"]
    assert [liver[5], spleen[5]] == [f"{row['mean_probability']:.2f}" for row in summary]
    assert spleen[5] == "0.00"  # no voxel reached 0.5
    assert [liver[6], spleen[6]] == [f"{row['uncertain_ml']:.1f}" for row in summary]
    assert spleen[7:9] == ["[empty]", "no"]
    body_ml = (phantom.array > -500).sum() * phantom.voxel_volume_ml
    # The body less about a voxel of its surface (the model's grid here is 6 mm).
    assert 0.6 * body_ml < summary[1]["uncertain_ml"] <= body_ml
    assert summary[0]["uncertain_ml"] < 0.1 * summary[1]["uncertain_ml"]  # only the rim of the box


def test_evaluate_writes_csv_and_png(tmp_path, capsys):
    reference = make_ct()
    labels = np.zeros(reference.shape, np.uint8)
    labels[10:20, 10:20, 10:20] = 1
    pred = labels.copy()
    pred[10:12] = 0
    write_volume(reference.with_array(labels), tmp_path / "ref.nii.gz")
    write_volume(reference.with_array(pred), tmp_path / "pred.nii.gz")
    code, stdout, stderr = run(["evaluate", tmp_path / "pred.nii.gz", tmp_path / "ref.nii.gz",
                                "-o", tmp_path / "eval"], capsys)
    assert code == 0, stderr
    rows = (tmp_path / "eval" / "metrics.csv").read_text().splitlines()
    assert rows[0] == "structure,label,dice,nsd"
    assert abs(float(rows[1].split(",")[2]) - 2 * 800 / (800 + 1000)) < 1e-3
    assert (tmp_path / "eval" / "metrics.png").stat().st_size > 0


def test_models_lists_registry(capsys, tmp_path):
    code, stdout, _ = run(["models", "--store", tmp_path], capsys)
    assert code == 0
    assert "demo" in stdout and "universal-model" in stdout and "CC BY-NC-ND" in stdout


def test_console_script_runs_as_a_process():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    completed = subprocess.run([sys.executable, "-m", "MoMESegmentationLib.cli", "info"], capture_output=True,
                               text=True, env=env, cwd=REPO, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert "torch" in completed.stdout


def test_dicom_folder_output_on_the_series_grid(checkpoint, tmp_path, capsys):
    from test_io_dicom import oblique_cosines, write_ct_series

    ct = make_ct(shape=(30, 28, 12), spacing=(4.0, 4.0, 5.0))
    stored = (ct.array + 1024).astype(np.int16)
    write_ct_series(tmp_path / "dicom", stored, spacing=(4.0, 4.0, 5.0), cosines=oblique_cosines(0.3, 0.2))
    out = tmp_path / "dicom_seg.nii.gz"
    code, _, stderr = run(["segment", tmp_path / "dicom", "-p", "liver", "-o", out, "--model", checkpoint,
                           "--device", "cpu", "--quiet"], capsys)
    assert code == 0, stderr
    series = read_volume(tmp_path / "dicom")
    labels = read_volume(out)
    assert labels.shape == series.shape
    assert labels.same_grid(series, atol=1e-4)
    assert not np.allclose(series.direction, np.eye(3))  # the oblique geometry survived
