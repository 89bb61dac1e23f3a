"""``mome train``: the training subcommand (registered into the main ``mome`` parser)."""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import MoMEError

__all__ = ["register", "cmd_train", "main"]

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand to ``mome``'s subparsers."""
    parser = subparsers.add_parser(
        "train",
        help="train or fine-tune a MoME model from a YAML/JSON config",
        description="Train MoME on phantoms, the bundled CT, manifests or public datasets with partial labels. "
                    "Multi-GPU: torchrun --nproc_per_node N -m MoMESegmentationLib.training CONFIG",
    )
    parser.add_argument("config", metavar="CONFIG", help="training config (.yaml or .json)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUTPUT/resume (same config and number of processes; a state saved "
                             "with another seed, world size or batch size is refused)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check dataset folders and print scans and labelled structures per dataset")
    parser.add_argument("--init-backbone", metavar="FILE", default=None,
                        help="MONAI SwinUNETR weights for the backbone (e.g. self-supervised pre-training)")
    parser.add_argument("--output", metavar="DIR", default=None, help="run folder (default: output.dir)")
    parser.add_argument("--max-steps", metavar="N", type=int, default=None,
                        help="stop after N steps; the learning-rate schedule still follows schedule.max_steps")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--validate", metavar="CHECKPOINT", default=None,
                        help="no training: score CHECKPOINT on the config's held-out data (Dice per structure) "
                             "and write OUTPUT/validation.json")
    parser.set_defaults(handler=cmd_train)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config

    config = load_config(args.config)
    if args.dry_run:
        from .trainer import dry_run

        print(dry_run(config))
        return 0
    from .trainer import Trainer

    if args.validate:
        result = Trainer(config, output_dir=args.output, device=args.device).evaluate(args.validate)
        for name, dice in result["val_dice"].items():
            print(f"{name:32s} {dice:.3f}")
        mean = result["val_mean_dice"]
        print(f"mean Dice {'n/a' if mean is None else f'{mean:.3f}'} over {len(result['val_dice'])} structures "
              f"on {len(result['held_out_cases'])} held-out cases")
        return 0
    if args.max_steps is not None and args.max_steps < 0:
        raise MoMEError(f"--max-steps must be >= 0, got {args.max_steps}")
    trainer = Trainer(config, output_dir=args.output, device=args.device, stop_step=args.max_steps,
                      resume=args.resume, init_backbone=args.init_backbone)
    try:
        result = trainer.fit()
    finally:
        trainer.close()
    if trainer.is_main:
        dice = "n/a" if result.val_mean_dice is None else f"{result.val_mean_dice:.3f}"
        print(f"trained {result.steps} steps; validation mean Dice {dice}; weights: {result.checkpoint}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m MoMESegmentationLib.training``), e.g. under torchrun."""
    parser = argparse.ArgumentParser(prog="mome")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command")
    train = register(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] != "train" and not argv[0].startswith("-"):
        argv.insert(0, "train")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.command != "train":
        train.print_help()
        return 2
    try:
        return cmd_train(args)
    except MoMEError as error:
        print(f"mome: error: {error}", file=sys.stderr)
        return 2
