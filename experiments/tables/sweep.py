"""Ablation sweep over layer placements, budgets and token reduction: one LightningCLI fit per grid point.

    python experiments/tables/sweep.py experiments/sweeps/placements.yaml [--dry-run] [--jobs N] [--table-only]

The grid YAML (see experiments/sweeps/placements.yaml):

    name: placements                 # outputs/sweeps/<name>/<point>/run, results under experiments/results/
    configs: [configs/visor.yaml]    # every point starts from these LightningCLI configs
    args: [--model.budget_sampling, uniform]   # extra CLI arguments for every point
    n_layers: 6
    fixed_self: [0]                  # self layers present in every budget
    grid:                            # the cross product of these axes is the set of points
      cross_every: [2, 3]            # a cross layer every k-th layer (at k-1, 2k-1, ...)
      self_position: [early, middle, late, uniform]   # where the optional self candidates sit
      n_self: [1, 2]                 # number of optional self candidates
      reduction: [none, pool2]       # a configs/token_reduction/<name>.yaml delta, or none
      seed: [0]

A point's optional self candidates take layers among those not in `fixed_self`; a skipped
candidate runs as cross (skip_kind cross), so a candidate on a cross position only adds the self
path there. The remaining cross positions are cross, the rest text. Every point is a universal model over the nested budgets
of its candidates; validation evaluates each budget, so a point gives one result row per budget.

Resumable: a point whose run finished (DONE beside its logs) is not rerun. `--jobs N` runs N
points in parallel processes (the first point runs alone first, so the data set is generated
once). Writes experiments/results/sweep_<name>.csv, .md and _pareto.png (hard accuracy vs LLM
GFLOPs per sample, Pareto front marked).

On a cluster (`--engine`, the `sweep` extra), every point is the same `run_fit` with the same DONE
marker, run where the engine puts it; the nodes must see this checkout (outputs/, data/) at the
same path, a shared filesystem:

    python experiments/tables/sweep.py GRID --engine ray [--ray-address auto] [--cpus-per-point 4] [--gpus-per-point 1]
    python experiments/tables/sweep.py GRID --engine submitit --submitit timeout_min=240 slurm_partition=gpu gpus_per_node=1

Ray: one task per point on an existing cluster (`ray start --head` there; `--ray-address auto`)
or, without an address, on a Ray instance started on this machine with `--jobs` CPUs. submitit:
one SLURM job per point (logs under outputs/sweeps/<name>/submitit; without SLURM, submitit's
local executor); `--submitit KEY=VALUE` sets its parameters (timeout_min, gpus_per_node,
cpus_per_task, mem_gb, slurm_partition, slurm_account, ...).
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import sys
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments.tables.runs import run_fit, run_logdir  # noqa: E402
from experiments.tables.tb_scalars import latest_scalars  # noqa: E402
from src.models.plan import LayerPlan  # noqa: E402

POSITIONS = ("early", "middle", "late", "uniform")
AXES = ("cross_every", "self_position", "n_self", "reduction", "seed")
DEFAULTS = {"cross_every": [2], "self_position": ["uniform"], "n_self": [1], "reduction": ["none"], "seed": [0]}


@dataclass(frozen=True)
class Point:
    cross_every: int
    self_position: str
    n_self: int
    reduction: str
    seed: int

    @property
    def name(self) -> str:
        return f"c{self.cross_every}_{self.self_position}{self.n_self}_{self.reduction}_s{self.seed}"


def candidate_layers(available: List[int], n: int, position: str) -> List[int]:
    """n layers out of `available` (ascending) placed early / in the middle / late / spread uniformly."""
    m = len(available)
    if not 1 <= n <= m:
        raise ValueError(f"grid.n_self={n}: must be in [1, {m}] (the layers not in fixed_self)")
    if position == "early":
        return available[:n]
    if position == "late":
        return available[m - n:]
    if position == "middle":
        start = (m - n) // 2
        return available[start:start + n]
    if position == "uniform":
        if n == 1:
            return [available[m // 2]]
        return [available[round(j * (m - 1) / (n - 1))] for j in range(n)]
    raise ValueError(f"grid.self_position={position!r}: must be one of {POSITIONS}")


def point_plan(point: Point, n_layers: int, fixed_self: List[int]) -> dict:
    """The LayerPlan fields of a point (validated by building the LayerPlan)."""
    if point.cross_every < 1:
        raise ValueError(f"grid.cross_every={point.cross_every}: must be >= 1")
    available = [i for i in range(n_layers) if i not in fixed_self]
    optional = candidate_layers(available, point.n_self, point.self_position)
    self_layers = sorted(set(fixed_self) | set(optional))
    cross = [i for i in range(point.cross_every - 1, n_layers, point.cross_every) if i not in self_layers]
    plan = dict(n_layers=n_layers, self_layers=self_layers, cross_layers=cross, optional_self=optional,
                skip_kind="cross", cross_every=None, budgets=None, all_self=False)
    LayerPlan(**plan)  # raises PlanError naming the field
    return plan


def load_grid(path: Path) -> dict:
    spec = yaml.safe_load(path.read_text())
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: a sweep spec is a mapping (name, configs, grid, ...)")
    unknown = set(spec.get("grid", {})) - set(AXES)
    if unknown:
        raise ValueError(f"{path}: unknown grid axes {sorted(unknown)}; known: {list(AXES)}")
    for key in ("name", "configs", "n_layers"):
        if key not in spec:
            raise ValueError(f"{path}: missing field {key!r}")
    for c in spec["configs"]:
        if not (ROOT / c).exists():
            raise ValueError(f"{path}: configs entry {c!r} does not exist")
    if not isinstance(spec.get("args", []), list):
        raise ValueError(f"{path}: args must be a list of CLI arguments")
    spec.setdefault("args", [])
    spec.setdefault("fixed_self", [0])
    return spec


def expand(spec: dict) -> List[Point]:
    grid = {axis: spec.get("grid", {}).get(axis, DEFAULTS[axis]) for axis in AXES}
    points = [Point(*values) for values in itertools.product(*(grid[a] for a in AXES))]
    for p in points:
        point_plan(p, spec["n_layers"], spec["fixed_self"])  # fail before any run starts
        if p.reduction != "none" and not (ROOT / "configs/token_reduction" / f"{p.reduction}.yaml").exists():
            raise ValueError(f"grid.reduction={p.reduction!r}: no configs/token_reduction/{p.reduction}.yaml")
    return points


def point_args(spec: dict, point: Point) -> List[str]:
    args: List[str] = []
    for c in spec["configs"]:
        args += ["--config", str(ROOT / c)]
    if point.reduction != "none":
        args += ["--config", str(ROOT / "configs/token_reduction" / f"{point.reduction}.yaml")]
    plan = point_plan(point, spec["n_layers"], spec["fixed_self"])
    # null fields are LayerPlan's defaults; left out, since jsonargparse reads a JSON null inside a
    # nested subclass override as the string "None"
    plan = {k: v for k, v in plan.items() if v is not None}
    return args + ["--model.lvlm.init_args.plan", json.dumps(plan), "--seed_everything", str(point.seed),
                   *map(str, spec["args"])]


def group(spec: dict) -> str:
    return f"sweeps/{spec['name']}"


def point_rows(spec: dict, point: Point, workdir: Path = ROOT) -> List[dict]:
    """One row per budget from a finished point's final validation (empty if it never validated)."""
    logdir = run_logdir(group(spec), point.name, workdir)
    if not (logdir / "DONE").exists():
        return []
    val = {k: v.value for k, v in latest_scalars(str(logdir), "val/").items()}
    plan = LayerPlan(**point_plan(point, spec["n_layers"], spec["fixed_self"]))
    rows = []
    for k in range(plan.n_budgets):
        suffix = f"@budget={k}" if plan.n_budgets > 1 else ""
        easy, hard = val.get(f"val/acc/easy{suffix}"), val.get(f"val/acc/hard{suffix}")
        gflops = val.get(f"val/gflops{suffix}")
        if hard is None or gflops is None:
            continue
        rows.append(dict(point=point.name, cross_every=point.cross_every, self_position=point.self_position,
                         n_self=point.n_self, reduction=point.reduction, seed=point.seed, budget=k,
                         layers=plan.budget_name(k), easy=easy, hard=hard, llm_gflops=gflops))
    return rows


COLUMNS = ["point", "cross_every", "self_position", "n_self", "reduction", "seed", "budget", "layers",
           "easy", "hard", "llm_gflops"]


def write_results(spec: dict, rows: List[dict], out_dir: Path) -> Optional[Path]:
    """CSV, Markdown table and Pareto plot of every finished point's rows."""
    from src.plots import pareto_chart, pareto_front

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"sweep_{spec['name']}"
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    front = set(pareto_front([(r["llm_gflops"], r["hard"]) for r in rows]))
    lines = [f"Sweep `{spec['name']}`: configs {spec['configs']}, extra args {spec['args']}. Accuracy in % "
             "(final validation, exact match); LLM GFLOPs per sample; * = on the hard-accuracy Pareto front.",
             "", "| point | layers (budget) | reduction | seed | easy | hard | LLM GFLOPs | |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["llm_gflops"]):
        star = "*" if (r["llm_gflops"], r["hard"]) in front else ""
        lines.append(f"| {r['point']} | {r['layers']} ({r['budget']}) | {r['reduction']} | {r['seed']} | "
                     f"{100 * r['easy']:.1f} | {100 * r['hard']:.1f} | {r['llm_gflops']:.3f} | {star} |")
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    if not rows:
        return None
    points = {f"{r['point']}@{r['budget']}": (r["llm_gflops"], 100 * r["hard"]) for r in rows}
    png = Path(f"{stem}_pareto.png")
    pareto_chart(points, title=f"sweep {spec['name']}: hard accuracy vs LLM GFLOPs",
                 xlabel="LLM GFLOPs per sample", ylabel="hard accuracy %").save(png)
    return png


ENGINES = ("local", "ray", "submitit")


def _fit_point(group_name: str, name: str, args: List[str], workdir: str) -> Tuple[str, int]:
    """One point's fit where an engine runs it -> (its log folder, the process that ran it)."""
    return str(run_fit(group_name, name, args, workdir=Path(workdir))), os.getpid()


def parse_submitit(pairs: List[str]) -> Dict[str, object]:
    """['timeout_min=240', 'slurm_partition=gpu'] -> {'timeout_min': 240, 'slurm_partition': 'gpu'}."""
    params: Dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--submitit {pair!r}: expected KEY=VALUE (for example timeout_min=240)")
        params[key] = int(value) if value.lstrip("-").isdigit() else value
    return params


def dispatch(engine: str, jobs: List[Tuple[str, str, List[str]]], workdir: Path, parallel: int,
             opts: argparse.Namespace) -> List[Tuple[str, int]]:
    """Run the fits `jobs` [(group, point name, fit arguments)] on `engine`, all of them to the end
    -> [(log folder, process id)] in order. A failed point raises once the others have finished."""
    calls = [(g, n, a, str(workdir)) for g, n, a in jobs]
    # where the engine's workers unpickle _fit_point: this checkout importable (experiments.tables.sweep)
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    if engine == "local":
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            return list(pool.map(lambda c: _fit_point(*c), calls))
    if engine == "ray":
        import ray

        env = {"env_vars": {"PYTHONPATH": pythonpath}}
        started = not ray.is_initialized()
        if started:
            ray.init(address=opts.ray_address, num_cpus=None if opts.ray_address else parallel,
                     runtime_env=env, include_dashboard=False, log_to_driver=True)
        try:
            task = ray.remote(num_cpus=opts.cpus_per_point, num_gpus=opts.gpus_per_point)(_fit_point)
            return ray.get([task.remote(*c) for c in calls])
        finally:
            if started:
                ray.shutdown()
    if engine == "submitit":
        import submitit

        folder = workdir / "outputs" / jobs[0][0] / "submitit" if jobs else workdir
        executor = submitit.AutoExecutor(folder=str(folder), cluster=opts.submitit_cluster)
        executor.update_parameters(**parse_submitit(opts.submitit))
        before = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = pythonpath  # jobs inherit the submitting environment (sbatch --export=ALL)
        try:
            submitted = [executor.submit(_fit_point, *c) for c in calls]
        finally:
            if before is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = before
        return [job.result() for job in submitted]
    raise ValueError(f"--engine {engine!r}: one of {ENGINES}")


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("grid", type=Path, help="the sweep YAML")
    ap.add_argument("--dry-run", action="store_true", help="list the points and their arguments, run nothing")
    ap.add_argument("--jobs", type=int, default=1, help="points run in parallel processes")
    ap.add_argument("--table-only", action="store_true", help="only (re)write the results from finished points")
    ap.add_argument("--out", type=Path, default=ROOT / "experiments/results", help="results folder")
    ap.add_argument("--workdir", type=Path, default=ROOT,
                    help="where runs write outputs/ and find relative paths (data/, checkpoints/)")
    ap.add_argument("--engine", choices=ENGINES, default="local",
                    help="where points run: local processes (default), a Ray cluster, SLURM through submitit")
    ap.add_argument("--ray-address", default=None,
                    help="--engine ray: an existing cluster ('auto' or host:port); none: start one here with --jobs CPUs")
    ap.add_argument("--cpus-per-point", type=float, default=1, help="--engine ray: CPUs each point reserves")
    ap.add_argument("--gpus-per-point", type=float, default=0, help="--engine ray: GPUs each point reserves")
    ap.add_argument("--submitit", nargs="*", default=[], metavar="KEY=VALUE",
                    help="--engine submitit: executor parameters (timeout_min=240 slurm_partition=gpu ...)")
    ap.add_argument("--submitit-cluster", default=None,
                    help="--engine submitit: submitit's cluster (default: slurm where sbatch exists, else local)")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.cpus_per_point <= 0 or args.gpus_per_point < 0:
        ap.error("--cpus-per-point must be > 0 and --gpus-per-point >= 0")
    try:
        parse_submitit(args.submitit)
    except ValueError as e:
        ap.error(str(e))
    spec = load_grid(args.grid)
    points = expand(spec)
    wd = args.workdir

    def fit(todo: List[Point]) -> None:
        for logdir, pid in dispatch(args.engine, [(group(spec), p.name, point_args(spec, p)) for p in todo], wd,
                                    args.jobs, args):
            print(f"finished: {logdir} (process {pid}, engine {args.engine})", flush=True)

    if args.dry_run:
        for p in points:
            done = (run_logdir(group(spec), p.name, wd) / "DONE").exists()
            print(f"{p.name}{'  [done]' if done else ''}\n    python -m src.cli fit {' '.join(point_args(spec, p))}")
        print(f"{len(points)} points")
        return
    if not args.table_only:
        todo = [p for p in points if not (run_logdir(group(spec), p.name, wd) / "DONE").exists()]
        print(f"{len(points)} points, {len(points) - len(todo)} finished earlier, {len(todo)} to run", flush=True)
        if len(todo) > 1 and (args.jobs > 1 or args.engine != "local"):
            fit(todo[:1])  # generates the data set once, before parallel runs could race on it
            todo = todo[1:]
        if todo:
            fit(todo)
    rows = [r for p in points for r in point_rows(spec, p, wd)]
    png = write_results(spec, rows, args.out)
    print(f"{len(rows)} result rows -> {args.out}/sweep_{spec['name']}.csv/.md" + (f", {png}" if png else ""))


if __name__ == "__main__":
    main()
