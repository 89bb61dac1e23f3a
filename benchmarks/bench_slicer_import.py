"""Memory of a result imported into Slicer's scene: one labelmap layer per segment, or shared layers.

``CopySegmentFromSegmentation`` gives every copied segment its own full-size labelmap layer.
:class:`MoMESlicer.scene.SlicerScene` (``MoMESegmentation/MoMESlicer/``) collapses them afterwards
(``vtkSegmentation::CollapseBinaryLabelmaps``), so non-overlapping segments share one layer, as
after Slicer's own imports. This benchmark imports one result with many structures both ways, on
Slicer's own MRML classes (``slicer-core``), and reports layers, bytes held by the layers, the
process's resident memory growth and the import time, side by side.

The result is built from the bundled CT's reference label map (TotalSegmentator's predictions):
its first ``--structures`` labels become the segments of a ``.seg.nrrd`` written by the library's
writer, exactly as the worker writes results.

    python benchmarks/bench_slicer_import.py --out benchmarks/results/slicer_import_cpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "MoMESegmentation"))  # MoMESlicer
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MoMESlicer import slicer_core  # noqa: E402
from MoMESegmentationLib.data.sample import load_sample_ct, sample_ct_path  # noqa: E402
from MoMESegmentationLib.io.segmentation import Segment, Segmentation, write_segmentation  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def write_result(folder: Path, count: int) -> tuple[Path, list[str]]:
    case = load_sample_ct()
    names = case.label_table  # label value -> structure id
    labels = [int(v) for v in np.unique(case.labels.array) if v > 0][:count]
    segments = [Segment(name=names.get(v, f"label {v}"), mask=case.labels.array == v,
                        color=tuple(np.random.default_rng(v).uniform(0.2, 1.0, 3)), label_value=i + 1)
                for i, v in enumerate(labels)]
    path = folder / "result.seg.nrrd"
    write_segmentation(Segmentation(reference=case.labels, segments=segments), path)
    return path, [s.name for s in segments]


def measure(core, seg_path: Path, collapse: bool) -> dict:
    from MoMESlicer.scene import SlicerScene, segmentation_layers

    core.clear()
    gc.collect()
    scene = SlicerScene(core.scene, collapse_layers=collapse)
    volume = core.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    storage = core.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(sample_ct_path()))
    assert storage.ReadData(volume)
    core.scene.RemoveNode(storage)
    before = rss_bytes()
    start = time.perf_counter()
    node = scene.import_result(seg_path, {}, None, False, volume)
    seconds = time.perf_counter() - start
    gc.collect()
    layers, layer_bytes = segmentation_layers(node)
    return {"collapse_layers": collapse, "segments": node.GetSegmentation().GetNumberOfSegments(),
            "layers": layers, "layer_bytes": layer_bytes, "rss_growth_bytes": rss_bytes() - before,
            "import_s": round(seconds, 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--structures", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None, help="JSON results file")
    args = parser.parse_args(argv)
    reason = slicer_core.available()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    core = slicer_core.start()
    with tempfile.TemporaryDirectory() as folder:
        seg_path, names = write_result(Path(folder), args.structures)
        # Baseline first, then the collapsed import, each on a cleared scene.
        rows = [measure(core, seg_path, collapse=False), measure(core, seg_path, collapse=True)]
    result = {
        "what": "import of one worker result into a Slicer segmentation node (slicer-core, real MRML)",
        "structures": len(names), "grid": list(load_sample_ct().image.shape),
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "platform": platform.platform()},
        "slicer_core": _version("slicer-core"),
        "rows": rows,
    }
    print(f"{'':<26} {'layers':>6} {'layer MB':>9} {'RSS growth MB':>14} {'import s':>9}")
    for row in rows:
        label = "shared layers (collapsed)" if row["collapse_layers"] else "one layer per segment"
        print(f"{label:<26} {row['layers']:>6} {row['layer_bytes'] / 1e6:>9.1f} "
              f"{row['rss_growth_bytes'] / 1e6:>14.1f} {row['import_s']:>9.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"Wrote {args.out}")
    return 0


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    raise SystemExit(main())
