"""Shared pytest set-up: tests run offline, headless and on the CPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
# The library, and the module's Qt-free Slicer-side package (MoMESegmentation/MoMESlicer).
for folder in (REPO_ROOT / "MoMESegmentation", REPO_ROOT):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

# Nothing may be downloaded while testing, and Qt renders offscreen.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

try:
    from hypothesis import settings

    settings.register_profile("mome", deadline=None, max_examples=25, derandomize=True)
    settings.load_profile("mome")
except ImportError:  # hypothesis is a test extra
    pass


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of small tensors (faster on a busy 2-core machine); restored after.

    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def core():
    """Slicer's MRML core from the ``slicer-core`` wheel, one per test session (see slicer_core.py).

    Skips, naming the reason, where slicer-core is not installed. Tests that add nodes clear the
    scene afterwards (``core.clear()``).
    """
    from MoMESlicer import slicer_core

    reason = slicer_core.available()
    if reason:
        pytest.skip(reason)
    return slicer_core.start()


@pytest.fixture(scope="module")
def worker_client():
    """The real worker process (``mome worker``), one per test module; stopped at the module's end."""
    from MoMESegmentationLib.worker_client import WorkerClient

    client = WorkerClient([sys.executable, "-m", "MoMESegmentationLib.cli", "worker"], cwd=str(REPO_ROOT),
                          startup_timeout=300)
    yield client
    client.stop()
