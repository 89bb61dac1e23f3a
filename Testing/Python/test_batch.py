"""``mome segment --batch FOLDER``: two gloo ranks under torchrun share the cases; a rerun resumes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from engine_fixtures import make_ct, make_tiny_checkpoint  # noqa: E402
from MoMESegmentationLib.batch import find_cases, shard  # noqa: E402
from MoMESegmentationLib.cli import main  # noqa: E402
from MoMESegmentationLib.engine import Segmenter  # noqa: E402
from MoMESegmentationLib.io.readers import read_volume, write_volume  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PROMPT = "liver, spleen"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_shard_and_find_cases(tmp_path):
    assert shard(list(range(7)), 0, 2) == [0, 2, 4, 6] and shard(list(range(7)), 1, 2) == [1, 3, 5]
    assert sorted(
        shard(list(range(7)), 0, 3) + shard(list(range(7)), 1, 3) + shard(list(range(7)), 2, 3)
    ) == list(range(7))
    with pytest.raises(ValueError):
        shard([1], 2, 2)
    for name in ("b.nii.gz", "a.nrrd", "c.seg.nrrd", "notes.txt", ".hidden.nrrd"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "dicom_series").mkdir()
    assert [p.name for p in find_cases(tmp_path)] == ["a.nrrd", "b.nii.gz", "dicom_series"]


def test_two_ranks_share_the_cases_and_a_rerun_resumes(tmp_path, capsys):
    checkpoint = make_tiny_checkpoint(tmp_path)
    cases, out = tmp_path / "cases", tmp_path / "out"
    cases.mkdir()
    out.mkdir()
    for n in range(3):
        write_volume(
            make_ct(shape=(20 + 2 * n, 18, 16), spacing=(8.0, 8.0, 8.0), seed=n), cases / f"case{n}.nrrd"
        )
    (cases / "broken.nii.gz").write_bytes(b"not an image")
    batch_args = ["segment", "--batch", str(cases), "-o", str(out), "--model", str(checkpoint), "--device", "cpu",
                  "--prompt", PROMPT, "--quiet"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "-m", "MoMESegmentationLib.cli", *batch_args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode != 0, "a failed case makes the batch exit non-zero"
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["done"], manifest["errors"], manifest["pending"]) == (3, 1, 0), manifest
    order = ["broken.nii.gz", "case0.nrrd", "case1.nrrd", "case2.nrrd"]
    assert {name: entry["rank"] for name, entry in manifest["cases"].items()} == {
        name: n % 2 for n, name in enumerate(order)
    }, "cases are dealt to the ranks in turn"
    error = manifest["cases"]["broken.nii.gz"]["error"]
    assert "broken.nii.gz" in error and "\n" not in error
    segmenter = Segmenter(str(checkpoint), "cpu")
    for n in range(3):
        written = read_volume(out / f"case{n}.nii.gz")
        expected = segmenter.segment(read_volume(cases / f"case{n}.nrrd"), PROMPT).labelmap
        assert written.shape == (20 + 2 * n, 18, 16) and np.array_equal(written.array, expected)
    assert not [p for p in out.iterdir() if p.name.startswith(".mome-tmp")], "no half-written outputs"

    # rerun in one process: done cases are skipped, the failed one is tried again
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("case*.nii.gz")}
    assert main(batch_args) == 1
    assert "3 done before, 1 to do" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("case*.nii.gz")} == stamps, (
        "done cases were redone"
    )
    # the broken case repaired and one output lost: both are done now, the others stay as they were
    write_volume(make_ct(shape=(16, 16, 16), spacing=(8.0, 8.0, 8.0), seed=9), cases / "broken.nii.gz")
    (out / "case1.nii.gz").unlink()
    assert main(batch_args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["done"], manifest["errors"], manifest["pending"]) == (4, 0, 0), manifest
    assert (out / "broken.nii.gz").is_file() and (out / "case1.nii.gz").is_file()
    assert (out / "case0.nii.gz").stat().st_mtime_ns == stamps["case0.nii.gz"]


def test_batch_refuses_other_inputs_and_a_missing_folder(tmp_path, capsys):
    assert (
        main(["segment", "--batch", str(tmp_path), "x.nrrd", "-o", str(tmp_path), "--prompt", "liver"]) == 2
    )
    assert "--batch FOLDER takes no other inputs" in capsys.readouterr().err
    assert (
        main(["segment", "--batch", str(tmp_path / "missing"), "-o", str(tmp_path), "--prompt", "liver"]) == 2
    )
    assert "needs a folder of images" in capsys.readouterr().err
    assert main(["segment", "-o", str(tmp_path), "--prompt", "liver"]) == 2
    assert "--batch FOLDER" in capsys.readouterr().err
