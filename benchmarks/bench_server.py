"""`mome serve` against a local run: identical results and where the time goes.

Serves the demo weights (or ``--model``) on this machine's loopback, uploads the bundled real CT
once through :class:`~MoMESegmentationLib.remote_client.RemoteWorkerClient`, runs the demo prompts
and then a new prompt on the same image (served from the cached image features), and runs the same
prompts locally with the same :class:`~MoMESegmentationLib.engine.Segmenter`. Checks that every
segment is identical voxel for voxel and writes JSON (``--out``): upload bytes, seconds per step,
windows encoded and reused.

    python benchmarks/bench_server.py --fast --out benchmarks/results/server_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from MoMESegmentationLib.cli import DEMO_PROMPTS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--prompts", default=DEMO_PROMPTS)
    parser.add_argument("--new-prompt", default="pancreas")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import torch
    import uvicorn

    from MoMESegmentationLib.data.sample import load_sample_ct
    from MoMESegmentationLib.engine import Segmenter
    from MoMESegmentationLib.io.readers import read_volume, write_volume
    from MoMESegmentationLib.io.segmentation import read_segmentation
    from MoMESegmentationLib.outputs import write_result
    from MoMESegmentationLib.remote_client import RemoteWorkerClient
    from MoMESegmentationLib.server import ServerConfig, create_app

    key = "bench-key-0123456789abcdef"
    segmenter = Segmenter(args.model, args.device)
    app = create_app(ServerConfig(api_key=key), [segmenter])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    report: dict = {
        "machine": platform.node(),
        "torch": torch.__version__,
        "device": str(segmenter.device),
        "threads": torch.get_num_threads(),
        "model": args.model,
        "fast": args.fast,
    }
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        source = folder / "ct.nrrd"  # as Slicer exports it: a raw NRRD
        write_volume(load_sample_ct().image, source)
        report["image"] = {"shape": list(read_volume(source).shape), "bytes": source.stat().st_size}
        client = RemoteWorkerClient(url, key)
        client.ensure_started()
        steps = {}
        for name, prompts in (("remote_first", args.prompts), ("remote_new_prompt", args.new_prompt)):
            started = time.perf_counter()
            client.send(
                {
                    "cmd": "segment",
                    "id": name,
                    "input": str(source),
                    "prompts": prompts,
                    "output": str(folder / f"{name}.seg.nrrd"),
                    "options": {"fast": args.fast},
                }
            )
            uploaded = None
            while True:
                event = client.wait_event(lambda e, n=name: e.get("id") == n, timeout=3600)
                if event["event"] == "progress" and event.get("stage") != "upload" and uploaded is None:
                    uploaded = time.perf_counter() - started
                if event["event"] in ("done", "error", "cancelled"):
                    break
            if event["event"] != "done":
                raise SystemExit(f"{name}: {event}")
            steps[name] = {
                "seconds": round(time.perf_counter() - started, 3),
                "until_server_started_s": round(uploaded or 0.0, 3),
                "feature_windows": event["summary"]["feature_windows"],
                "server_timings_s": event["summary"]["timings_s"],
            }
        client.stop()
        identical = True
        for name, prompts in (("local_first", args.prompts), ("local_new_prompt", args.new_prompt)):
            segmenter.clear_cache()
            started = time.perf_counter()
            result = segmenter.segment(read_volume(source), prompts, fast=args.fast)
            write_result(result, folder / f"{name}.seg.nrrd", result.summary(str(source)))
            steps[name] = {"seconds": round(time.perf_counter() - started, 3)}
            remote = {
                s.name: np.asarray(s.mask)
                for s in read_segmentation(folder / f"{name.replace('local', 'remote')}.seg.nrrd").segments
            }
            local = {
                s.name: np.asarray(s.mask) for s in read_segmentation(folder / f"{name}.seg.nrrd").segments
            }
            same = sorted(remote) == sorted(local) and all(np.array_equal(remote[k], local[k]) for k in local)
            steps[name]["segments"] = len(local)
            steps[name]["identical_to_remote"] = same
            identical = identical and same
        report["steps"] = steps
        report["identical"] = identical
    server.should_exit = True
    thread.join(timeout=10)
    app.state.service.close()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
