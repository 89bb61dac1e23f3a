"""The `mome` command line: segment, evaluate, models, bad input (one-line errors, nothing left behind)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine_fixtures import make_ct, make_tiny_checkpoint
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
    ],
)
def test_bad_input_one_line_error_and_nothing_written(case, message, checkpoint, ct_file, tmp_path, capsys):
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
    import MoMESegmentationLib.outputs as outputs

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("MoMESegmentationLib.io.readers.write_labelmap", broken)
    out = tmp_path / "seg.nii.gz"
    with pytest.raises(OSError):
        main(["segment", str(ct_file), "-p", "liver", "-o", str(out), "--model", str(checkpoint),
              "--device", "cpu", "--quiet"])
    assert not out.exists() and not (tmp_path / "seg.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mome-tmp")]
    assert outputs  # imported for the monkeypatch target


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
