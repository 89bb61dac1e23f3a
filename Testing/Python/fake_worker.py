"""A stand-in for ``mome worker`` that speaks the same JSON-lines protocol (docs/DESIGN.md).

It needs no model: a ``segment`` request reports progress in ``--steps`` steps of ``--step-time``
seconds, then writes a ``.seg.nrrd`` on the input's grid with one box per known structure.

Modes (``--mode``):
    normal          behave like the real worker (cancel is honoured between steps)
    ignore-cancel   never answer ``cancel`` (the client has to kill the process)
    crash           exit with status 3 after two progress events, with a CUDA-like error on stderr
    load-error      answer ``load`` with a checkpoint error
    prompt-error    answer ``segment`` with a prompt error
    bad-grid        write a result whose grid differs from the input's
    stray-output    write lines that are not protocol events to stdout (text, JSON that is not an
                    event object, bytes that are not UTF-8) before ``ready`` and between events
    never-ready     hang at start-up without ever saying ``ready``
    ignore-stop     ignore ``shutdown`` and the end of stdin (only a kill ends it)
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from MoMESegmentationLib.slicer_workflow import read_nrrd_geometry  # noqa: E402

STRUCTURES = {  # id: (label, display name, RGB 0-255)
    "liver": (1, "Liver", (221, 130, 101)),
    "spleen": (2, "Spleen", (157, 108, 162)),
    "kidney_left": (3, "Kidney left", (185, 102, 83)),
}
SYNONYMS = {"left kidney": "kidney_left", "kidney left": "kidney_left"}


def emit(**event) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def stray_output(tag: str) -> None:
    """Lines a careless library might print to stdout; none of them is a protocol event."""
    sys.stdout.write(f"stray text {tag}\n[1, 2]\n{{\"note\": \"no event key\"}}\n{{\"event\": 3}}\n\"event\"\n")
    sys.stdout.write("[" * 5000 + "\n")
    sys.stdout.flush()
    sys.stdout.buffer.write(b"\xff\xfe not utf-8 " + tag.encode() + b"\n")
    sys.stdout.buffer.flush()


def write_seg_nrrd(path: Path, shape: tuple[int, int, int], ijk_to_lps, found: list[str]) -> None:
    """A single-layer Slicer segmentation with one box per structure (raw uint8, Fortran order)."""
    labels = bytearray(shape[0] * shape[1] * shape[2])
    for n, structure in enumerate(found):
        value = STRUCTURES[structure][0]
        i0, j0, k0 = (n * s // (len(found) + 1) for s in shape)
        for k in range(k0, k0 + max(1, shape[2] // 4)):
            for j in range(j0, j0 + max(1, shape[1] // 4)):
                start = i0 + shape[0] * (j + shape[1] * k)
                labels[start:start + max(1, shape[0] // 4)] = bytes([value]) * max(1, shape[0] // 4)
    directions = " ".join("(" + ",".join(f"{v:.17g}" for v in ijk_to_lps[:3, axis]) + ")" for axis in range(3))
    header = [
        "NRRD0004", "type: uint8", "dimension: 3", "space: left-posterior-superior",
        f"sizes: {shape[0]} {shape[1]} {shape[2]}", f"space directions: {directions}",
        "kinds: domain domain domain", "encoding: raw",
        "space origin: (" + ",".join(f"{v:.17g}" for v in ijk_to_lps[:3, 3]) + ")",
        "Segmentation_MasterRepresentation:=Binary labelmap",
        "Segmentation_ReferenceImageExtentOffset:=0 0 0",
    ]
    for n, structure in enumerate(found):
        label, name, color = STRUCTURES[structure]
        header += [f"Segment{n}_ID:={structure}", f"Segment{n}_Name:={name}", f"Segment{n}_LabelValue:={label}",
                   f"Segment{n}_Layer:=0", f"Segment{n}_Color:=" + " ".join(f"{c / 255:.4f}" for c in color)]
    path.write_bytes(("\n".join(header) + "\n\n").encode("latin-1") + bytes(labels))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", default="normal")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--step-time", type=float, default=0.05)
    args = parser.parse_args()

    requests: queue.Queue = queue.Queue()
    cancelled: set[str] = set()

    def read() -> None:
        for line in sys.stdin:
            if not line.strip():
                continue
            request = json.loads(line)
            if request.get("cmd") == "cancel":
                if args.mode != "ignore-cancel":
                    cancelled.add(request.get("id"))
                continue
            requests.put(request)
        if args.mode != "ignore-stop":
            requests.put({"cmd": "shutdown"})

    threading.Thread(target=read, daemon=True).start()
    if args.mode == "never-ready":
        print(f"fake worker hangs before ready, pid {os.getpid()}", file=sys.stderr, flush=True)
        time.sleep(3600)
    if args.mode == "stray-output":
        stray_output("before ready")
    emit(event="ready", version="fake-1")
    print(f"fake worker pid {os.getpid()} in mode {args.mode}", file=sys.stderr, flush=True)
    loaded = False
    while True:
        request = requests.get()
        command, job = request.get("cmd"), request.get("id")
        if command == "shutdown":
            if args.mode == "ignore-stop":
                print("fake worker ignores shutdown", file=sys.stderr, flush=True)
                continue
            return 0
        if command == "load":
            if args.mode == "load-error":
                emit(event="error", id=None, message=f"model '{request['model']}' is not installed", kind="checkpoint")
                continue
            loaded = True
            emit(event="loaded", model=request["model"], device=request.get("device", "cpu"),
                 structures=list(STRUCTURES), free_text=False, threads=request.get("threads"))
            continue
        if command != "segment":
            emit(event="error", id=job, message=f"unknown command '{command}'", kind="input")
            continue
        if not loaded:
            emit(event="error", id=job, message="no model loaded: send a 'load' request first", kind="input")
            continue
        if args.mode == "prompt-error":
            emit(event="error", id=job, message=f"'{request['prompts']}': no structure matches this prompt", kind="prompt")
            continue
        stopped = False
        for step in range(args.steps):
            if job in cancelled:
                emit(event="cancelled", id=job)
                stopped = True
                break
            emit(event="progress", id=job, fraction=step / args.steps, stage="inference",
                 message=f"window {step + 1}/{args.steps}")
            if args.mode == "stray-output":
                stray_output(f"step {step}")
            if args.mode == "crash" and step == 1:
                print("RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB", file=sys.stderr, flush=True)
                os._exit(3)
            time.sleep(args.step_time)
        if stopped:
            continue
        geometry = read_nrrd_geometry(request["input"])
        shape = geometry.shape if args.mode != "bad-grid" else tuple(s + 1 for s in geometry.shape)
        prompts = [p.strip().lower() for p in request["prompts"].split(",") if p.strip()]
        entries = []
        for n, prompt in enumerate(prompts):
            structure = SYNONYMS.get(prompt, prompt.replace(" ", "_"))
            known = structure in STRUCTURES
            label, name, color = STRUCTURES.get(structure, (0, prompt, (128, 128, 128)))
            entries.append({"label": label, "name": name, "id": structure if known else "", "prompt": prompt,
                            "match": name, "similarity": 1.0 if known else 0.2, "found": known, "color": list(color),
                            "volume_ml": 12.5 * (n + 1) if known else 0.0, "mean_probability": 0.9 if known else 0.0})
        found = [e["id"] for e in entries if e["found"]]
        write_seg_nrrd(Path(request["output"]), shape, geometry.ijk_to_lps, found)
        summary = {"model": {"name": "fake"}, "input": request["input"], "prompts": prompts, "structures": entries}
        emit(event="done", id=job, output=request["output"], summary=summary)


if __name__ == "__main__":
    sys.exit(main())
