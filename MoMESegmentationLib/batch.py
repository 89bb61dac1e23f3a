"""``mome segment --batch FOLDER -o OUT/``: every case of a folder, sharded across processes and GPUs.

Under ``torchrun --nproc-per-node=N`` (one or several nodes) rank ``r`` of ``W`` segments cases
``r, r + W, r + 2W, ...`` of the sorted case list on ``cuda:LOCAL_RANK`` (or the CPU with its share
of the cores); without torchrun one process does them all. Each output is written atomically (see
:func:`~.outputs.write_result`), and each finished case, done or failed, leaves a small record in
``OUT/.mome-batch/``; after a barrier rank 0 merges them into ``OUT/manifest.json``::

    {"cases": {"case1": {"status": "done", "output": ..., "seconds": ..., "rank": 0},
               "case2": {"status": "error", "error": "one line", ...}},
     "done": 1, "errors": 1, "pending": 0}

A rerun skips the cases recorded as done whose output is still there, and retries the others.
A case is a supported image file or a folder (a DICOM series) in ``FOLDER``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from .errors import InputError, MoMEError

__all__ = ["find_cases", "shard", "run_batch", "RECORDS", "MANIFEST"]

logger = logging.getLogger(__name__)

#: Per-case records, one small JSON per case, written by whichever rank segmented it.
RECORDS = ".mome-batch"
#: The merged manifest in the output folder.
MANIFEST = "manifest.json"


def find_cases(folder: Path) -> list[Path]:
    """The images (supported suffixes) and sub-folders (DICOM series) of ``folder``, sorted by name."""
    from .io.readers import SUPPORTED_SUFFIXES

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: --batch needs a folder of images")
    cases = []
    for path in sorted(folder.iterdir()):
        name = path.name.lower()
        if path.name.startswith("."):
            continue
        if path.is_dir() or (name.endswith(SUPPORTED_SUFFIXES) and not name.endswith(".seg.nrrd")):
            cases.append(path)
    if not cases:
        raise InputError(f"{folder}: no images ({', '.join(SUPPORTED_SUFFIXES)}) or DICOM folders found")
    return cases


def shard(items: list, rank: int, world: int) -> list:
    """Rank ``rank``'s share of ``items`` out of ``world`` ranks (round robin, in order)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} out of range for {world} ranks")
    return items[rank::world]


def _write_json(path: Path, data: dict) -> None:
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        stream.write(json.dumps(data, indent=2) + "\n")
    os.replace(temp, path)


def _read_records(folder: Path) -> dict[str, dict]:
    records = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("case"), str):
            records[record["case"]] = record
    return records


def _record_name(case: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in case) + ".json"


class _Group:
    """torch.distributed over gloo when started by torchrun (a barrier is all it is used for)."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world)))
        self.started = False
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo")
                self.started = True

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.started:
            import torch.distributed as dist

            dist.destroy_process_group()


def _device_for(requested: str, group: _Group) -> str:
    import torch

    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{group.local_rank % torch.cuda.device_count()}"
    if requested == "auto":
        return "cpu"
    return requested


def run_batch(args: argparse.Namespace) -> int:
    """Segment this rank's share of ``args.batch`` into ``args.output``; rank 0 writes the manifest.

    Returns 0 when every case is done, 1 (rank 0 only) when some failed; the manifest names them.
    """
    from .cli import _output_for, _parse_roi
    from .outputs import check_output, write_result

    out = Path(args.output)
    if not out.is_dir():
        raise InputError(f"{out}: output folder does not exist")
    cases = find_cases(Path(args.batch))
    targets = {case: _output_for(case, out, True, args.format) for case in cases}
    if len(set(targets.values())) != len(targets):
        raise InputError("two cases would write the same output name; rename one of them")
    roi = _parse_roi(args.roi)
    records_dir = out / RECORDS
    records_dir.mkdir(exist_ok=True)
    group = _Group()
    try:
        records = _read_records(records_dir)
        mine = shard(cases, group.rank, group.world)
        todo = [
            case
            for case in mine
            if not (records.get(case.name, {}).get("status") == "done" and targets[case].is_file())
        ]
        device = _device_for(str(args.device), group)
        threads = args.threads
        if threads is None and device == "cpu" and group.local_world > 1:
            threads = max(1, (os.cpu_count() or 1) // group.local_world)
        print(
            f"rank {group.rank}/{group.world} on {device}: {len(mine)} cases, {len(mine) - len(todo)} done "
            f"before, {len(todo)} to do",
            flush=True,
        )
        if todo:
            from .engine import Segmenter

            segmenter = Segmenter(args.model, device, threads=threads)
            for case in todo:
                _segment_case(
                    segmenter,
                    case,
                    targets[case],
                    records_dir,
                    args,
                    roi,
                    group.rank,
                    check_output,
                    write_result,
                )
        group.barrier()
        if group.rank != 0:
            return 0
        return _write_manifest(out, cases, targets, records_dir)
    finally:
        group.close()


def _segment_case(
    segmenter, case: Path, target: Path, records_dir: Path, args, roi, rank: int, check_output, write_result
) -> None:
    from .io.readers import read_volume

    started = time.monotonic()
    record = {"case": case.name, "input": str(case), "output": str(target), "rank": rank}
    try:
        overwrite = args.overwrite or (records_dir / _record_name(case.name)).is_file()  # a retry or an
        check_output(target, overwrite)  # interrupted case replaces its own output, nothing else's
        volume = read_volume(case)
        result = segmenter.segment(
            volume,
            args.prompt,
            roi=roi,
            probabilities=args.probabilities,
            largest_component=args.largest_component,
            fast=args.fast,
            anatomy_guard=args.anatomy_guard,
            explain=getattr(args, "explain", False),
        )
        write_result(result, target, result.summary(str(case)), probabilities=args.probabilities)
        record.update(status="done", found=[s.id for s in result.structures if s.found])
        print(f"{case} -> {target}", flush=True)
    except MoMEError as error:
        record.update(status="error", error=" ".join(str(error).split()))
    except Exception as error:  # one bad case must not stop the others
        logger.error("%s", traceback.format_exc())
        record.update(status="error", error=f"{type(error).__name__}: {' '.join(str(error).split())[:300]}")
    record["seconds"] = round(time.monotonic() - started, 3)
    if record["status"] == "error":
        print(f"{case}: error: {record['error']}", file=sys.stderr, flush=True)
    _write_json(records_dir / _record_name(case.name), record)


def _write_manifest(out: Path, cases: list[Path], targets: dict, records_dir: Path) -> int:
    records = _read_records(records_dir)
    entries = {}
    for case in cases:
        record = dict(records.get(case.name) or {"status": "pending"})
        if record.get("status") == "done" and not targets[case].is_file():
            record = {"status": "pending", "note": "the output was removed"}
        record.pop("case", None)
        entries[case.name] = record
    counts = {
        status: sum(1 for e in entries.values() if e["status"] == status)
        for status in ("done", "error", "pending")
    }
    _write_json(
        out / MANIFEST, {"cases": entries, **{k if k != "error" else "errors": v for k, v in counts.items()}}
    )
    print(
        f"{counts['done']} done, {counts['error']} failed, {counts['pending']} pending; "
        f"manifest: {out / MANIFEST}",
        flush=True,
    )
    return 0 if counts["error"] == 0 and counts["pending"] == 0 else 1
