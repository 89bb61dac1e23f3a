"""The one rule for finding Resources/: package data in a wheel, else beside the library folder."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from MoMESegmentationLib.resources import resource_path, resources_dir

REPO = Path(__file__).resolve().parents[2]


def test_source_checkout_uses_the_top_level_resources_folder():
    assert resources_dir() == REPO / "Resources"
    assert resource_path("vocabulary.json").is_file()
    assert resource_path("models.json").is_file()
    assert resource_path("SampleData", "example_ct.nii.gz").is_file()


def test_missing_resource_is_a_clear_error():
    from MoMESegmentationLib.errors import MoMEError

    with pytest.raises(MoMEError, match="bundled resource missing"):
        resource_path("no-such-file.json")


def test_library_imports_without_slicer_qt_or_ctk():
    code = ("import sys, MoMESegmentationLib, MoMESegmentationLib.engine, MoMESegmentationLib.cli; "
            "bad = [m for m in ('slicer', 'qt', 'ctk', 'PySide6') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))


@pytest.mark.slow
def test_wheel_ships_resources_as_package_data(tmp_path):
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip("building the wheel offline needs setuptools >= 77 in the environment")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("vocabulary.json", "models.json", "SampleData/example_ct.nii.gz",
                     "Models/mome-demo/model.safetensors", "Models/mome-demo/model.json"):
        assert f"MoMESegmentationLib/_resources/{required}" in names
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    code = "from MoMESegmentationLib.resources import resources_dir; print(resources_dir())"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(target))).stdout.strip()
    assert Path(out) == target / "MoMESegmentationLib" / "_resources"
