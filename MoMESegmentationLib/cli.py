"""The ``mome`` command line.

Subcommands: ``demo``, ``segment``, ``evaluate``, ``models`` (list, ``download``, ``install``),
``info``, ``worker``, ``serve`` (an HTTP server for clients without a GPU), ``review`` (where a model
and an existing label disagree), ``corrections`` (corrected segmentations as training data), ``web``
(the browser app, with the ``web`` extra), and, when
their modules are present, ``train`` and ``import``. A user mistake
prints one line starting with ``mome: error:`` and exits with status 2; nothing is left half-written.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path

from . import __version__
from .errors import Cancelled, InputError, MoMEError

__all__ = ["main", "build_parser"]

logger = logging.getLogger("mome")

DEMO_PROMPTS = "liver, spleen, left kidney, right kidney, stomach, urinary bladder, aorta, inferior vena cava"


# ------------------------------------------------------------------ progress
class _ProgressBar:
    """A tqdm bar driven by the engine's ``progress(fraction, stage, message)`` callback."""

    def __init__(self, description: str, enabled: bool = True) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=1000, desc=description, disable=not enabled, leave=False,
                         bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining} {postfix}")

    def __call__(self, fraction: float, stage: str, message: str) -> None:
        self._bar.n = int(1000 * max(0.0, min(1.0, fraction)))
        self._bar.set_postfix_str(f"{stage}: {message}", refresh=True)

    def close(self) -> None:
        self._bar.close()


def _print_table(structures, dice: dict[str, float] | None = None, stream=None, routing=None) -> None:
    """One row per structure, with the volume where the model is unsure (probability between 0.3 and
    0.7), found or not; with ``routing`` (``--explain``) the expert that dominates inside the mask."""
    stream = sys.stdout if stream is None else stream  # the current stdout, not the one at import
    header = (f"{'#':>3}  {'structure':<26} {'match':<24} {'found':<5} {'volume mL':>10} {'mean p':>7} "
              f"{'uncertain mL':>12}")
    if dice is not None:
        header += f" {'Dice':>6}"
    if routing is not None:
        header += f"  {'dominant expert':<22}"
    print(header, file=stream)
    print("-" * len(header), file=stream)
    for s in structures:
        row = (f"{s.label:>3}  {s.name[:26]:<26} {(s.match or '-')[:24]:<24} {'yes' if s.found else 'no':<5} "
               f"{s.volume_ml:>10.1f} {s.mean_probability:>7.2f} {s.uncertain_ml:>12.1f}")
        if dice is not None:
            value = dice.get(s.id or "")
            row += f" {value:>6.3f}" if value is not None else f" {'-':>6}"
        if routing is not None:
            entry = routing.get(s.label) or {}
            row += f"  {(entry.get('dominant') or '-')[:22]:<22}"
        if not s.found and s.note:
            row += f"  [{s.rule}] {s.note}"
        print(row, file=stream)


# ------------------------------------------------------------------ segment
def _output_for(input_path: Path, out: Path, batch: bool, fmt: str) -> Path:
    if not batch:
        return out
    name = input_path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".seg.nrrd"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return out / f"{name}{fmt}"


def _parse_roi(text: str | None):
    """``--roi`` accepts ``x0,y0,z0,x1,y1,z1`` (LPS mm) or a JSON file with ``{"roi_lps": [[..],[..]]}``."""
    if not text:
        return None
    candidate = Path(text)
    if candidate.suffix == ".json":
        if not candidate.is_file():
            raise InputError(f"{candidate}: ROI file not found")
        try:
            data = json.loads(candidate.read_text())
            return data["roi_lps"] if isinstance(data, dict) else data
        except (ValueError, KeyError):
            raise InputError(f"{candidate}: ROI file must hold {{\"roi_lps\": [[x0,y0,z0],[x1,y1,z1]]}}") from None
    try:
        values = [float(v) for v in text.replace(";", ",").split(",")]
    except ValueError:
        raise InputError(f"--roi '{text}': expected six numbers x0,y0,z0,x1,y1,z1 in LPS mm") from None
    if len(values) != 6:
        raise InputError(f"--roi '{text}': expected six numbers x0,y0,z0,x1,y1,z1 in LPS mm")
    return [values[:3], values[3:]]


def cmd_segment(args: argparse.Namespace) -> int:
    from .engine import Segmenter
    from .io.readers import read_volume
    from .outputs import check_output, write_result
    from .worker_client import WorkerError

    if args.batch:  # a folder, sharded across torchrun's processes (MoMESegmentationLib/batch.py)
        if args.inputs or args.server:
            raise InputError("--batch FOLDER takes no other inputs and runs here (no --server)")
        from .batch import run_batch

        return run_batch(args)
    if not args.inputs:
        raise InputError("give the images to segment, or --batch FOLDER")
    inputs = [Path(p) for p in args.inputs]
    out = Path(args.output)
    batch = len(inputs) > 1 or out.is_dir() or str(args.output).endswith(("/", "\\"))
    if batch and not out.is_dir():
        raise InputError(f"{out}: output folder does not exist (a batch writes one file per input into a folder)")
    for path in inputs:
        if not path.exists():
            raise InputError(f"{path}: input not found")
    outputs = [_output_for(p, out, batch, args.format) for p in inputs]
    if len(set(outputs)) != len(outputs):
        raise InputError("two inputs would write the same output name; segment them into separate folders")
    for target in outputs:
        check_output(target, args.overwrite)
    roi = _parse_roi(args.roi)
    if args.server:  # on a `mome serve` server: same outputs, written atomically here
        from .remote_client import api_key_from_env, segment_on_server

        options = {"roi": roi, "probabilities": args.probabilities, "fast": args.fast, "explain": args.explain,
                   "largest_component": args.largest_component, "anatomy_guard": args.anatomy_guard}
        try:
            segment_on_server(args.server, args.api_key or api_key_from_env(), inputs, outputs, args.prompt,
                              options, quiet=args.quiet)
        except WorkerError as error:
            raise MoMEError(str(error)) from None
        return 0
    segmenter = Segmenter(args.model, args.device, threads=args.threads)
    segmenter.plan_prompts(args.prompt)  # fail on a bad prompt before reading any volume
    for path, target in zip(inputs, outputs):
        volume = read_volume(path)
        bar = _ProgressBar(path.name, enabled=not args.quiet)
        try:
            result = segmenter.segment(volume, args.prompt, roi=roi, probabilities=args.probabilities,
                                       largest_component=args.largest_component, fast=args.fast,
                                       anatomy_guard=args.anatomy_guard, explain=args.explain, progress=bar)
        finally:
            bar.close()
        write_result(result, target, result.summary(str(path)), probabilities=args.probabilities)
        for warning in result.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(f"{path} -> {target}")
        explanation = result.explanation
        if explanation is not None and not explanation.has_maps:
            print(f"explain: {explanation.note}", file=sys.stderr)
        if not args.quiet:
            if result.coverage is not None:
                print(result.coverage["description"])
            _print_table(result.structures, routing=None if explanation is None or not explanation.has_maps
                         else explanation.routing_json())
    return 0


# --------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from .data.sample import load_sample_ct
    from .engine import Segmenter
    from .evaluation import dice_per_structure
    from .outputs import render_montage, write_result

    folder = Path(args.output) if args.output else Path.cwd() / time.strftime("mome-demo-%Y%m%d-%H%M%S")
    if folder.exists() and any(folder.iterdir()):
        raise InputError(f"{folder}: folder exists and is not empty; choose another with --output")
    case = load_sample_ct()
    print(f"Sample CT: {case.image.name} {case.image.shape} voxels at "
          f"{'x'.join(f'{s:g}' for s in case.image.spacing)} mm (TotalSegmentator example, Apache-2.0)")
    segmenter = Segmenter(args.model, args.device, threads=args.threads)
    print(f"Model: {segmenter.model_name} ({segmenter.checkpoint_path.name}) on {segmenter.device}")
    bar = _ProgressBar("demo", enabled=not args.quiet)
    try:
        result = segmenter.segment(case.image, args.prompt, progress=bar, fast=args.fast)
    finally:
        bar.close()
    folder.mkdir(parents=True, exist_ok=True)
    summary = result.summary(case.image.name)
    dice = dice_per_structure(result, case.labels.array, case.label_table)
    summary["agreement"] = {
        "reference": "TotalSegmentator predictions bundled with the sample CT (not manual labels)",
        "note": "the demo weights saw this scan in training: this is in-sample agreement, not accuracy",
        "dice": dice,
    }
    write_result(result, folder / "labels.nii.gz", summary)
    write_result(result, folder / "segmentation.seg.nrrd", summary, probabilities=False)
    render_montage(result, folder / "montage.png", title=f"MoME demo: {args.prompt}")
    print()
    print("Agreement (Dice) with TotalSegmentator's labels on a scan the demo weights saw in training:")
    _print_table(result.structures, dice)
    print(f"\nInference {result.timings.get('inference', 0):.1f} s, total {result.timings.get('total', 0):.1f} s")
    print(f"Wrote {folder}/labels.nii.gz, labels.json, segmentation.seg.nrrd and montage.png")
    return 0


# ----------------------------------------------------------------- evaluate
def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_files

    rows = evaluate_files(Path(args.prediction), Path(args.reference), Path(args.output),
                          reference_table=Path(args.reference_table) if args.reference_table else None,
                          tolerance_mm=args.tolerance)
    print(f"{'structure':<28} {'Dice':>6} {'NSD':>6}")
    for row in rows:
        print(f"{row['structure']:<28} {row['dice']:>6.3f} {row['nsd']:>6.3f}")
    print(f"Wrote {args.output}")
    return 0


# ------------------------------------------------------------------- models
def cmd_models(args: argparse.Namespace) -> int:
    from .registry import default_store, installed_models, load_registry

    store = Path(args.store).expanduser() if getattr(args, "store", None) else default_store()
    action = getattr(args, "models_action", None) or "list"
    if action == "download":
        from .downloads import download_model

        download_model(args.name, store=store, yes=args.yes)
        return 0
    if action == "install":
        return _models_install(args, store)
    entries = load_registry()
    print(f"Model store: {store}  (remove a model by deleting its folder there)")
    print(f"{'name':<24} {'kind':<9} {'present':<8} {'structures':>10} {'size MB':>8}  license")
    for entry in entries.values():
        path = entry.checkpoint_path(store)
        present = path is not None and path.is_file()
        size, count, digest = "-", "-", ""
        if present:
            meta = json.loads(path.with_suffix(".json").read_text()) if path.with_suffix(".json").is_file() else {}
            size = f"{path.stat().st_size / 1e6:.1f}"
            count = str(len(meta.get("structures", [])))
            digest = (meta.get("provenance", {}).get("source_sha256") or meta.get("weights", {}).get("sha256") or "")
        print(f"{entry.name:<24} {entry.kind:<9} {'yes' if present else 'no':<8} {count:>10} {size:>8}  "
              f"{entry.license}")
        if digest:
            print(f"{'':<24} sha256 {digest}  {path}")
    for model in installed_models(store):
        if model.kind == "local":
            print(f"{model.name:<24} {'local':<9} {'yes':<8} {len(model.structures):>10} "
                  f"{model.path.stat().st_size / 1e6:>8.1f}  {model.license}")
    return 0


class _JsonProgress:
    """``--progress-json``: one JSON object per line on stdout, at most every 0.2 s or 0.5 %."""

    def __init__(self) -> None:
        self._last = (-1.0, "", 0.0)

    def emit(self, **event) -> None:
        print(json.dumps(event), flush=True)

    def __call__(self, fraction: float, stage: str, message: str) -> None:
        last_fraction, last_stage, last_time = self._last
        now = time.monotonic()
        if stage == last_stage and fraction - last_fraction < 0.005 and now - last_time < 0.2:
            return
        self._last = (fraction, stage, now)
        self.emit(event="progress", fraction=round(float(fraction), 4), stage=stage, message=message)


def _watch_stdin_for_cancel(flag: threading.Event) -> None:
    """Set ``flag`` when a line ``cancel`` arrives on stdin (how the Slicer panel cancels)."""

    def read() -> None:
        try:
            for line in sys.stdin:
                if line.strip().lower() == "cancel":
                    flag.set()
                    return
        except (OSError, ValueError):
            pass

    threading.Thread(target=read, name="mome-cancel", daemon=True).start()


def _models_install(args: argparse.Namespace, store: Path) -> int:
    from .model_install import install_model
    from .registry import load_registry

    registry = load_registry(Path(args.registry)) if args.registry else None
    cancelled = threading.Event()
    json_progress = _JsonProgress() if args.progress_json else None
    if json_progress is not None:
        _watch_stdin_for_cancel(cancelled)

    def ask(question: str) -> bool:
        if json_progress is not None:
            raise MoMEError("--progress-json cannot ask for the license; accept it first and pass --yes")
        print(question, file=sys.stderr)
        if not sys.stdin or not sys.stdin.isatty():
            raise MoMEError("cannot ask for confirmation (no terminal); read the license above and pass "
                            "--yes to accept it")
        return input("Accept? [y/N] ").strip().lower() in ("y", "yes")

    def on_terminate(signum, frame) -> None:
        raise Cancelled(
            f"installation of '{args.name}' stopped (signal {signum}); the model store was not changed"
        )

    bar = None
    if json_progress is None:
        bar = _ProgressBar(f"install {args.name}", enabled=sys.stderr.isatty())
    previous = None
    if threading.current_thread() is threading.main_thread():  # signal handlers only work there
        previous = signal.signal(signal.SIGTERM, on_terminate)
    try:
        path = install_model(args.name, args.file, store=store, yes=args.yes, ask=ask,
                             progress=json_progress or bar, cancel=cancelled.is_set, force=args.force,
                             registry=registry)
    except MoMEError as error:
        if json_progress is not None:
            json_progress.emit(event="error", message=str(error), cancelled=isinstance(error, Cancelled))
        raise
    finally:
        if bar is not None:
            bar.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if json_progress is not None:
        json_progress.emit(event="done", name=args.name, path=str(path))
    else:
        print(f"installed {args.name}: {path}")
        model = path if getattr(args, "store", None) else args.name  # names resolve in the default store
        print(f'use it: mome segment CT.nii.gz --model {model} --prompt "liver, spleen" -o labels.nii.gz')
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import platform

    import torch

    info = {"mome": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda}
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:
        info["monai"] = "not installed"
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    for key, value in info.items():
        print(f"{key:<15} {value}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from .worker import serve

    return serve(sys.stdin, sys.stdout)


# ------------------------------------------------------------------- parser
def _add_runtime_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="registry name or checkpoint path (default: demo)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--fast", action="store_true", help="coarser spacing (quicker on a CPU)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or table")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mome", description="Text-prompted CT segmentation with MoME.")
    parser.add_argument("--version", action="version", version=f"mome {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="segment the bundled real CT with the demo weights")
    demo.add_argument("--prompt", default=DEMO_PROMPTS, help=f"prompts (default: {DEMO_PROMPTS!r})")
    demo.add_argument("-o", "--output", default=None, help="output folder (default: ./mome-demo-<time>)")
    _add_runtime_options(demo)
    demo.set_defaults(handler=cmd_demo)

    segment = sub.add_parser("segment", help="segment CT volumes from text prompts")
    segment.add_argument("inputs", nargs="*", metavar="INPUT", help="image file or DICOM folder")
    segment.add_argument("--batch", default=None, metavar="FOLDER",
                         help="segment every image and DICOM folder in FOLDER into the folder -o; under "
                              "torchrun the cases are shared across processes (one GPU each); a manifest "
                              "records done and failed cases, and a rerun resumes")
    segment.add_argument("--prompt", "-p", required=True, help='e.g. "liver, spleen, left kidney"')
    segment.add_argument("-o", "--output", required=True,
                         help="output .nii.gz/.nrrd/.seg.nrrd file, or a folder for several inputs")
    segment.add_argument("--format", default=".nii.gz", choices=[".nii.gz", ".nrrd", ".seg.nrrd"],
                         help="file type of batch outputs (default .nii.gz)")
    segment.add_argument("--roi", default=None, help="x0,y0,z0,x1,y1,z1 in LPS mm, or a JSON file")
    segment.add_argument("--probabilities", action="store_true", help="also write probability maps")
    segment.add_argument("--explain", action="store_true",
                         help="also write the router's maps per structure (dominant expert, entropy) into "
                              "<output>_experts/ and each expert's mean gate inside and at the border of each "
                              "structure into the JSON summary")
    segment.add_argument("--largest-component", action="store_true", help="keep each structure's largest part")
    segment.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    segment.add_argument("--no-anatomy-guard", dest="anatomy_guard", action="store_false",
                         help="segment non-CT input and keep masks the scan's field of view makes implausible "
                              "(e.g. a liver in a head CT); for unusual anatomy")
    segment.add_argument("--server", default=None, metavar="URL",
                         help="run on a 'mome serve' server (e.g. https://gpu-box:8765) instead of here")
    segment.add_argument("--api-key", default=None, help="the server's API key (default: $MOME_API_KEY)")
    _add_runtime_options(segment)
    segment.set_defaults(handler=cmd_segment)

    evaluate = sub.add_parser("evaluate", help="Dice and surface distance of a prediction against a reference")
    evaluate.add_argument("prediction", help="predicted label map (its JSON summary beside it names labels)")
    evaluate.add_argument("reference", help="reference label map or .seg.nrrd")
    evaluate.add_argument("-o", "--output", default="evaluation", help="output folder for CSV and PNG")
    evaluate.add_argument("--reference-table", default=None, help="JSON {label value: structure id} of REF")
    evaluate.add_argument("--tolerance", type=float, default=2.0, help="NSD tolerance in mm (default 2)")
    evaluate.set_defaults(handler=cmd_evaluate)

    models = sub.add_parser("models", help="list registered models; download or install public weights")
    models.add_argument("--store", default=None, help="model store folder (default ~/.mome/models)")
    models_sub = models.add_subparsers(dest="models_action")
    download = models_sub.add_parser("download", help="download public weights (asks before downloading)")
    download.add_argument("name")
    download.add_argument("--yes", action="store_true", help="accept the license without asking")
    download.add_argument("--store", default=argparse.SUPPRESS,
                          help="model store folder (default ~/.mome/models)")
    install = models_sub.add_parser(
        "install",
        help="download and convert a registered model, or add a local file (asks to accept the license)",
        description="Install a model into the model store: download and convert a registered model, convert "
        "its public weights from --file, or add a MoME .safetensors checkpoint (with its .json) from --file, "
        "under a registered name or a new one. Nothing is left half-installed.")
    install.add_argument("name",
                         help="registered model (e.g. universal-model), or a new name for a checkpoint")
    install.add_argument("--file", default=None, help="local .pth/.pt weights or .safetensors checkpoint "
                         "(no download)")
    install.add_argument("--yes", action="store_true", help="accept the license without asking")
    install.add_argument("--store", default=argparse.SUPPRESS,
                         help="model store folder (default ~/.mome/models)")
    install.add_argument("--force", action="store_true",
                         help="download and convert again if already installed")
    install.add_argument("--progress-json", action="store_true",
                         help="print progress as JSON lines on stdout; a line 'cancel' on stdin stops "
                         "the installation")
    install.add_argument("--registry", default=None, help="a models.json to use instead of the bundled one "
                         "(e.g. with a mirror's addresses)")
    models.set_defaults(handler=cmd_models)

    info = sub.add_parser("info", help="versions, device and CUDA")
    info.set_defaults(handler=cmd_info)

    worker = sub.add_parser("worker", help="JSON-lines worker for the Slicer module (stdin/stdout)")
    worker.set_defaults(handler=cmd_worker)

    for module_name in ("training.cli", "importers.cli", "review", "corrections", "server", "web.cli"):
        try:
            module = __import__(f"{__package__}.{module_name}", fromlist=["register"])
        except ImportError as error:
            logger.debug("subcommands of %s unavailable: %s", module_name, error)
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except MoMEError as error:
        print(f"mome: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mome: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
