"""The lmms-eval plugin through lmms-eval's own command line: a VISOR fit's checkpoint scored on the
offline task, against this project's `validate` (accuracies) and `predict` (answers and GFLOPs,
sample by sample). Skipped where lmms-eval is not installed (`pip install .[eval]`; `make test`
installs it)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

from src.cli import main  # noqa: E402
ROOT = Path(__file__).resolve().parents[1]

DATA = ["--data.train_images", "8", "--data.val_images", "4", "--data.images_per_shard", "4",
        "--data.num_workers", "0", "--data.batch_size", "4", "--data.val_batch_size", "8"]
BASE = ["--config", str(ROOT / "configs/visor.yaml"), "--model.base_checkpoint", str(ROOT / "checkpoints/base")]


def lmms_eval(tmp_path, model_args, *extra):
    assert (ROOT / "visor.egg-info" / "entry_points.txt").exists(), (
        "the plugin's entry point needs the project's metadata: `python setup.py egg_info` (make does it)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = tmp_path / "lmms_out"
    cmd = [sys.executable, "-m", "lmms_eval", "eval", "--model", "visor", "--model_args", model_args,
           "--include_path", str(ROOT / "src/eval/tasks"), "--tasks", "visor_offline", "--batch_size", "4",
           "--output_path", str(out), "--log_samples", *extra]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(next(out.rglob("*_results.json")).read_text())["results"]["visor_offline"]
    samples = sorted((json.loads(line) for line in next(out.rglob("*_samples_visor_offline.jsonl")).open()),
                     key=lambda s: s["doc_id"])
    return results, samples, run.stdout + run.stderr


@pytest.mark.parametrize("interface", ["chat", "simple"])
def test_lmms_eval_scores_a_visor_checkpoint_as_validate_and_predict_do(tmp_path, monkeypatch, interface):
    import datasets

    from src.eval.offline_task import build

    monkeypatch.chdir(tmp_path)
    fit = main(["fit", *BASE, *DATA, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"])
    ckpt = tmp_path / "visor.ckpt"
    fit.trainer.save_checkpoint(str(ckpt))
    folder = build([*BASE, *DATA])
    docs = datasets.load_from_disk(str(folder))["val"]

    stats = tmp_path / "stats.jsonl"
    results, samples, log = lmms_eval(tmp_path, f"checkpoint={ckpt},config={ROOT / 'configs/visor.yaml'},"
                                                f"budget=max,stats_path={stats}",
                                      *([] if interface == "chat" else ["--force_simple"]))
    assert len(samples) == len(docs) > 8

    val = main(["validate", *BASE, *DATA, "--ckpt_path", str(ckpt)])
    metrics = {k: float(v) for k, v in val.trainer.callback_metrics.items()}
    for ours, theirs in [("val/acc", "acc"), ("val/acc/easy", "acc_easy"), ("val/acc/hard", "acc_hard")] + [
            (f"val/acc/{t}", f"acc_{t}") for t in ("background", "large", "spatial", "read", "count")]:
        assert results[f"{theirs},none"] == pytest.approx(metrics[ours], abs=1e-6), (ours, results, metrics)

    preds = tmp_path / "preds.jsonl"
    main(["predict", *BASE, *DATA, "--ckpt_path", str(ckpt), "--predict_writer.output_path", str(preds)])
    rows = {r["id"]: r for r in map(json.loads, preds.read_text().splitlines())}
    per_sample = [json.loads(line) for line in stats.read_text().splitlines()]
    assert sorted(s["doc_id"] for s in per_sample) == [s["doc_id"] for s in samples]
    by_doc = {s["doc_id"]: s for s in per_sample}
    for s in samples:
        row = rows[docs[s["doc_id"]]["id"]]
        resp = s["filtered_resps"] if isinstance(s["filtered_resps"], str) else s["filtered_resps"][0]
        assert resp.strip() == row["prediction"].strip()  # the same answer, sample by sample
        assert s["acc"] == float(row["correct"])
        stat = by_doc[s["doc_id"]]
        assert (stat["budget"], stat["prompt_tokens"]) == (row["budget"], row["prompt_tokens"])
        assert stat["gflops"] == pytest.approx(row["gflops"])
    assert "visor: visor_offline:" in log and "LLM GFLOPs/sample" in log


def test_loglikelihood_is_the_answers_loss_and_says_whether_greedy_gives_it(tmp_path, monkeypatch):
    """The plugin's loglikelihood on the offline task's questions: the summed NLL of the answer after
    the chat prompt (recomputed here from the model's logits), and greedy == the model's prediction."""
    from types import SimpleNamespace

    import datasets
    import torch

    from src.eval.lmms_plugin import Visor
    from src.eval.offline_task import build

    monkeypatch.chdir(tmp_path)
    fit = main(["fit", *BASE, *DATA, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0"])
    ckpt = tmp_path / "visor.ckpt"
    fit.trainer.save_checkpoint(str(ckpt))
    docs = datasets.load_from_disk(str(build([*BASE, *DATA])))["val"]
    model = Visor(checkpoint=str(ckpt), config=str(ROOT / "configs/visor.yaml"))
    model.task_dict = {"t": {"val": docs}}
    visual = lambda doc: [doc["image"]]  # noqa: E731
    requests = [SimpleNamespace(args=(docs[i]["question"], docs[i]["answer"], visual, i, "t", "val"))
                for i in range(6)]
    lls = model.loglikelihood(requests)
    gens = model.generate_until([SimpleNamespace(args=(docs[i]["question"], {"max_new_tokens": 8}, visual, i, "t", "val"))
                                 for i in range(6)])
    tok, lvlm = model.tok, model.lvlm
    for i, (nll, greedy) in enumerate(lls):
        prompt, answer = tok.prompt(docs[i]["question"]), tok.encode(docs[i]["answer"])
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logits = lvlm(model.model.images([docs[i]["image"]], model.device), ids, image_at=tok.image_at)[0]
        logp = logits[len(prompt) - 1: -1].log_softmax(-1)
        assert nll == pytest.approx(-float(logp.gather(1, torch.tensor(answer)[:, None]).sum()), rel=1e-5) and nll > 0
        words = docs[i]["answer"].split()  # the word tokenizer: one token per word
        assert greedy == (gens[i].text.split()[: len(words)] == words)
