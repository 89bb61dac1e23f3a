"""Sampled mutation testing with mutmut 3: pick mutants at random, then count the outcomes.

Running every mutant of the engine, the DICOM reader, the outputs and the trainer takes days on a
small machine (about 4,900 mutants; many need the engine or a training run per mutant). A fixed-
seed random sample per module estimates the kill rate with a known uncertainty instead. See
docs/TESTING.md for the whole procedure.

    # in a worktree with a [tool.mutmut] table, after `mutmut run <a name that matches nothing>`
    # has generated the mutants and collected which tests reach which function:
    python scripts/mutation_sample.py pick . engine.py=40 dicom.py=40 outputs.py=40 trainer.py=30 > sample.txt
    mutmut run --max-children 1 $(cat sample.txt)
    python scripts/mutation_sample.py count . sample.txt          # per module: killed, survived, ...
    python scripts/mutation_sample.py count . sample.txt --list   # ... and the survivors' names

The sample depends only on the module's file name and the list of its mutants, so two worktrees
with the same module code draw the same mutants.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
from collections import Counter, defaultdict
from pathlib import Path

#: mutmut 3's exit codes per mutant, as stored in mutants/**/*.meta
OUTCOMES = {1: "killed", 3: "killed", 0: "survived", 33: "no tests", 5: "no tests",
            -24: "timeout", 24: "timeout", 36: "timeout", -9: "timeout", 152: "timeout"}


def metas(worktree: Path) -> dict[str, dict[str, int | None]]:
    """Module file name -> {mutant name: exit code or None (not run)}."""
    return {meta.name[: -len(".meta")]: json.loads(meta.read_text())["exit_code_by_key"]
            for meta in sorted(Path(worktree, "mutants").glob("**/*.py.meta"))}


def outcome(code: int | None) -> str:
    return "not run" if code is None else OUTCOMES.get(code, f"exit {code}")


def wilson(killed: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson interval of a proportion."""
    if total == 0:
        return 0.0, 1.0
    p = killed / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def pick(worktree: Path, sizes: dict[str, int]) -> list[str]:
    names = []
    for module, mutants in metas(worktree).items():
        if module in sizes:
            keys = sorted(mutants)
            names += random.Random(f"mome-{module}.meta").sample(keys, min(sizes[module], len(keys)))
    return names


def count(worktree: Path, sample: list[str], show: bool) -> None:
    wanted = set(sample)
    rows: dict[str, Counter] = defaultdict(Counter)
    survivors = []
    for module, mutants in metas(worktree).items():
        for name, code in mutants.items():
            if name in wanted:
                rows[module][outcome(code)] += 1
                if outcome(code) == "survived":
                    survivors.append(name)
    print(f"{'module':<14} {'sampled':>7} {'killed':>6} {'survived':>8} {'no tests':>8} {'timeout':>7} "
          f"{'not run':>7}  killed/(killed+survived+no tests) [95% CI]")
    for module, c in rows.items():
        judged = c["killed"] + c["survived"] + c["no tests"]
        low, high = wilson(c["killed"], judged)
        rate = f"{c['killed'] / judged:.0%} [{low:.0%}-{high:.0%}]" if judged else "-"
        print(f"{module:<14} {sum(c.values()):>7} {c['killed']:>6} {c['survived']:>8} {c['no tests']:>8} "
              f"{c['timeout']:>7} {c['not run']:>7}  {rate}")
    if show:
        print("\n".join(sorted(survivors)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pick", help="print a fixed-seed sample of mutant names")
    p.add_argument("worktree", type=Path)
    p.add_argument("sizes", nargs="+", help="MODULE.py=N, e.g. engine.py=40")
    c = sub.add_parser("count", help="outcomes of the sampled mutants")
    c.add_argument("worktree", type=Path)
    c.add_argument("sample", type=Path)
    c.add_argument("--list", action="store_true", help="also print the survivors")
    args = parser.parse_args(argv)
    if args.command == "pick":
        sizes = {}
        for item in args.sizes:
            match = re.fullmatch(r"(.+\.py)=(\d+)", item)
            if not match:
                parser.error(f"{item}: expected MODULE.py=N")
            sizes[match.group(1)] = int(match.group(2))
        print("\n".join(pick(args.worktree, sizes)))
    else:
        count(args.worktree, args.sample.read_text().split(), args.list)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
