"""Run LightningCLI fits one after another, each with its own TensorBoard directory, resumably.

`run_fit(group, name, args)` runs `python -m src.cli fit <args>` with its logger at
<workdir>/outputs/<group>/<name>/run; a run that finished earlier (a DONE file beside its logs) is
not rerun. Relative paths in the arguments and configs resolve against `workdir` (default: the repo).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[2]


def run_logdir(group: str, name: str, workdir: Path = ROOT) -> Path:
    return Path(workdir) / "outputs" / group / name / "run"


def mean_range(xs: List[float], sign: str = "") -> str:
    """Fractions as 'mean [min, max]' in points (sign "+": signed), as the tables state spreads over seeds."""
    return f"{100 * sum(xs) / len(xs):{sign}.1f} [{100 * min(xs):{sign}.1f}, {100 * max(xs):{sign}.1f}]"


def seed_group(group: str, seed: int) -> str:
    """Where a row fitted with seed_everything `seed` lives: outputs/<group> for seed 0 (the configs'
    own), outputs/<group>_seed<seed> otherwise."""
    return group if seed == 0 else f"{group}_seed{seed}"


def fitted_seeds(group: str, workdir: Path = ROOT) -> List[int]:
    """0 and every seed with a outputs/<group>_seed<K> folder on this machine, ascending."""
    found = (p.name[len(group) + len("_seed"):] for p in (Path(workdir) / "outputs").glob(f"{group}_seed*"))
    return [0] + sorted(int(s) for s in found if s.isdigit() and int(s) > 0)


def seed_args(seed: int) -> List[str]:
    """The fit arguments of a seed (none for seed 0: the configs' own seed_everything)."""
    return ["--seed_everything", str(seed)] if seed else []


def run_fit(group: str, name: str, args: List[str], steps: Optional[int] = None,
            python: str = sys.executable, workdir: Path = ROOT) -> Path:
    logdir = run_logdir(group, name, workdir)
    done = logdir / "DONE"
    if done.exists():
        print(f"[{name}] finished earlier: {logdir}", flush=True)
        return logdir
    cmd = [python, "-m", "src.cli", "fit", *args,
           "--trainer.logger.init_args.save_dir", f"outputs/{group}", "--trainer.logger.init_args.name", name,
           "--trainer.logger.init_args.version", "run"]
    if steps:
        cmd += ["--trainer.max_steps", str(steps)]
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    subprocess.run(cmd, cwd=workdir, check=True, env=env)
    done.write_text("ok\n")
    return logdir


def parse_row_args(doc: str, rows, steps: bool = True, seed: bool = False, extra=None):
    """The row runners' shared CLI: --only (rows, validated against `rows`), --table-only and, for fits,
    --steps (and --seed where `seed`); `extra(parser)` adds a runner's own
    -> (args, chosen row names in the order given)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if extra is not None:
        extra(ap)
    if steps:
        ap.add_argument("--steps", type=int, default=None, help="override trainer.max_steps for every row")
    if seed:
        ap.add_argument("--seed", type=int, default=0,
                        help="the fits' seed_everything (it orders the training stream); seed 0 is the configs' own")
    ap.add_argument("--only", default=",".join(rows), help="comma-separated rows")
    ap.add_argument("--table-only", action="store_true", help="only (re)write the table from finished runs")
    args = ap.parse_args()
    if seed and args.seed < 0:
        sys.exit(f"--seed must be >= 0, got {args.seed}")
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - set(rows)
    if unknown:
        sys.exit(f"--only: unknown rows {sorted(unknown)}; known: {list(rows)}")
    return args, names
