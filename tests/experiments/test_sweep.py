"""The sweep runner: grid expansion, placements, resume and result writing on a two-point grid.

Points are real LightningCLI fits of 2 steps on tiny generated data (not `fast_dev_run`: that
disables the logger, and the runner reads each point's results from its TensorBoard run)."""

from pathlib import Path

import pytest
import yaml

import experiments.tables.runs as runs
from experiments.tables.sweep import Point, candidate_layers, expand, load_grid, main, point_plan
from src.models.plan import LayerPlan
from tests.fit_args import TINY_DATA

TINY = [*TINY_DATA, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
        "--model.new_params_only_steps", "1"]


def test_candidate_placements():
    avail = [1, 2, 3, 4, 5]
    assert candidate_layers(avail, 2, "early") == [1, 2]
    assert candidate_layers(avail, 2, "late") == [4, 5]
    assert candidate_layers(avail, 1, "middle") == [3]
    assert candidate_layers(avail, 3, "middle") == [2, 3, 4]
    assert candidate_layers(avail, 3, "uniform") == [1, 3, 5]
    with pytest.raises(ValueError, match="grid.n_self"):
        candidate_layers(avail, 6, "early")
    with pytest.raises(ValueError, match="grid.self_position"):
        candidate_layers(avail, 1, "anywhere")


def test_point_plan_is_a_valid_universal_plan():
    plan = LayerPlan(**point_plan(Point(2, "uniform", 2, "none", 0), 6, [0]))
    assert plan.self_layers == [0, 1, 5] and plan.optional_self == [1, 5] and plan.cross_layers == [3]
    assert plan.n_budgets == 3 and plan.budget_kinds(0) == ["self", "cross", "text", "cross", "text", "cross"]


def _spec(tmp_path, base_export, **grid):
    spec = dict(name="two", configs=["configs/visor.yaml"], n_layers=6, fixed_self=[0],
                args=["--model.budget_sampling", "uniform", "--model.base_checkpoint", base_export, *TINY],
                grid=dict(cross_every=[2], self_position=["late"], n_self=[1], reduction=["none"], seed=[0], **grid))
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_grid_errors_name_the_field(tmp_path, base_export):
    with pytest.raises(ValueError, match="unknown grid axes"):
        load_grid(_spec(tmp_path, base_export, colour=["red"]))
    spec = load_grid(_spec(tmp_path, base_export))
    spec["grid"]["reduction"] = ["nosuch"]
    with pytest.raises(ValueError, match="grid.reduction='nosuch'"):
        expand(spec)


def test_two_point_sweep_runs_resumes_and_writes_results(tmp_path, base_export, monkeypatch, capsys):
    grid = _spec(tmp_path, base_export)
    spec = yaml.safe_load(grid.read_text())
    spec["grid"]["reduction"] = ["none", "pool2"]
    grid.write_text(yaml.safe_dump(spec))
    out = tmp_path / "results"
    main([str(grid), "--dry-run", "--workdir", str(tmp_path)])
    assert "2 points" in capsys.readouterr().out

    calls = []
    real_run = runs.subprocess.run

    def counting_run(cmd, **kw):
        calls.append(cmd)
        return real_run(cmd, **kw)

    monkeypatch.setattr(runs.subprocess, "run", counting_run)
    main([str(grid), "--workdir", str(tmp_path), "--out", str(out)])
    assert len(calls) == 2
    rows = (out / "sweep_two.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2 * 2  # header + 2 points x 2 budgets (late candidate [5]: off / on)
    assert (out / "sweep_two_pareto.png").stat().st_size > 0
    table = (out / "sweep_two.md").read_text()
    assert "c2_late1_pool2_s0" in table and "c2_late1_none_s0" in table

    main([str(grid), "--workdir", str(tmp_path), "--out", str(out)])  # resume: nothing left to run
    assert len(calls) == 2
    (tmp_path / "outputs/sweeps/two/c2_late1_pool2_s0/run/DONE").unlink()
    main([str(grid), "--workdir", str(tmp_path), "--out", str(out)])  # only the unfinished point reruns
    assert len(calls) == 3 and "c2_late1_pool2_s0" in " ".join(calls[-1])


def _two_point_grid(tmp_path, base_export):
    grid = _spec(tmp_path, base_export)
    spec = yaml.safe_load(grid.read_text())
    spec["grid"]["reduction"] = ["none", "pool2"]
    grid.write_text(yaml.safe_dump(spec))
    return grid


def _finished(out: str):
    """The runner's 'finished: <logdir> (process <pid>, engine <e>)' lines -> [(point, pid, engine)]."""
    import re
    return [(Path(m[0]).parent.name, int(m[1]), m[2])
            for m in re.findall(r"finished: (\S+) \(process (\d+), engine (\w+)\)", out)]


def test_sweep_on_a_local_ray_cluster_of_two_workers(tmp_path, base_export, capsys):
    """--engine ray on a Ray instance of 2 CPUs (one CPU a point): each point a Ray task in a worker
    process, with the same DONE markers (a rerun dispatches nothing) and the same results table."""
    import os
    grid, out = _two_point_grid(tmp_path, base_export), tmp_path / "results"
    argv = [str(grid), "--workdir", str(tmp_path), "--out", str(out), "--engine", "ray", "--jobs", "2"]
    main(argv)
    ran = _finished(capsys.readouterr().out)
    assert sorted(p for p, _, _ in ran) == ["c2_late1_none_s0", "c2_late1_pool2_s0"]
    assert all(engine == "ray" and pid != os.getpid() for _, pid, engine in ran)
    assert all((tmp_path / f"outputs/sweeps/two/{p}/run/DONE").exists() for p, _, _ in ran)
    assert len((out / "sweep_two.csv").read_text().strip().splitlines()) == 1 + 2 * 2
    main(argv)
    assert _finished(capsys.readouterr().out) == []  # resumed: both points finished earlier


def test_sweep_through_submitit(tmp_path, base_export, capsys):
    """--engine submitit with submitit's local executor (what it uses without SLURM): one job per
    point, its logs under outputs/sweeps/<name>/submitit, the same results."""
    import os
    grid, out = _two_point_grid(tmp_path, base_export), tmp_path / "results"
    main([str(grid), "--workdir", str(tmp_path), "--out", str(out), "--engine", "submitit",
          "--submitit-cluster", "local", "--submitit", "timeout_min=20"])
    ran = _finished(capsys.readouterr().out)
    assert len(ran) == 2 and all(engine == "submitit" and pid != os.getpid() for _, pid, engine in ran)
    assert any((tmp_path / "outputs/sweeps/two/submitit").glob("*_log.out"))
    assert len((out / "sweep_two.csv").read_text().strip().splitlines()) == 1 + 2 * 2
    with pytest.raises(SystemExit):
        main([str(grid), "--engine", "submitit", "--submitit", "timeout_min"])  # not KEY=VALUE
    assert "expected KEY=VALUE" in capsys.readouterr().err
