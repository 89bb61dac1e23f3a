"""``mome import NAME FILE``: convert public weights the user downloaded or brought (offline)."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from ..errors import InputError
from . import IMPORTERS

__all__ = ["register", "cmd_import"]


def cmd_import(args: argparse.Namespace) -> int:
    source = Path(args.file).expanduser()
    if not source.is_file():
        raise InputError(f"{source}: file not found (download it with `mome models download {args.name}`)")
    module_name, function_name = IMPORTERS[args.name].split(":")
    convert = getattr(importlib.import_module(module_name), function_name)
    report = convert(source, args.output, store=args.store, half=args.half)
    provenance_license = "CC BY-NC-ND 4.0" if args.name == "universal-model" else ""
    print(f"{report.source} -> {report.output}")
    print(f"source sha256 {report.source_sha256}")
    print(f"{report.tensors} tensors, {len(report.structures)} structures: {', '.join(report.structures)}")
    if provenance_license:
        print(f"license: {provenance_license} (non-commercial; keep the converted file for your own use)")
    model = args.name if args.output is None and args.store is None else report.output
    print(f'use it: mome segment CT.nii.gz --model {model} --prompt "liver, spleen" -o labels.nii.gz')
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``import`` subcommand to the ``mome`` parser."""
    parser = subparsers.add_parser(
        "import",
        help="convert public weights (e.g. the CLIP-Driven Universal Model .pth) into a MoME checkpoint",
        description="Convert a downloaded weights file into a MoME checkpoint in the model store "
        "(works offline).",
    )
    parser.add_argument("name", choices=sorted(IMPORTERS), help="which public model the file is")
    parser.add_argument("file", help="the downloaded file, e.g. clip_driven_universal_swin_unetr.pth")
    parser.add_argument(
        "-o", "--output", default=None, help="output .safetensors file or folder (default: the model store)"
    )
    parser.add_argument("--store", default=None, help="model store folder (default ~/.mome/models)")
    parser.add_argument("--half", action="store_true", help="store weights as float16 (half the size)")
    parser.set_defaults(handler=cmd_import)
    return parser
