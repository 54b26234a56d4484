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
ROOT = Path(__file__).resolve().parents[2]

DATA = ["--data.train_images", "8", "--data.val_images", "4", "--data.images_per_shard", "4",
        "--data.num_workers", "0", "--data.batch_size", "4", "--data.val_batch_size", "8"]
BASE = ["--config", str(ROOT / "configs/visor.yaml"), "--model.base_checkpoint", str(ROOT / "checkpoints/base")]


def lmms_eval(tmp_path, model_args, *extra, task="visor_offline", batch_size=4, out="lmms_out"):
    """lmms-eval's CLI on `task`, writing to tmp_path/out (a fresh folder per run)
    -> (its results for the task, its logged samples by doc_id, the log)."""
    assert (ROOT / "visor.egg-info" / "entry_points.txt").exists(), (
        "the plugin's entry point needs the project's metadata: `python setup.py egg_info` (make does it)")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = tmp_path / out
    assert not out.exists(), f"{out} holds an earlier run's results"
    cmd = [sys.executable, "-m", "lmms_eval", "eval", "--model", "visor", "--model_args", model_args,
           "--include_path", str(ROOT / "src/eval/tasks"), "--tasks", task, "--batch_size", str(batch_size),
           "--output_path", str(out), "--log_samples", *extra]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(next(out.rglob("*_results.json")).read_text())["results"][task]
    samples = sorted((json.loads(line) for line in next(out.rglob(f"*_samples_{task}.jsonl")).open()),
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
    """The plugin's loglikelihood on the offline task's questions, in right-padded batches of mixed
    lengths: the summed NLL of the answer after the chat prompt (recomputed here one sample at a time
    from the model's logits), and greedy == the model's prediction."""
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
    model = Visor(checkpoint=str(ckpt), config=str(ROOT / "configs/visor.yaml"), batch_size=4)  # batches of mixed lengths
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


def _nll(model, doc, answer):
    """The answer's summed NLL after the chat prompt, from one unbatched forward pass of the model."""
    import torch

    tok = model.tok
    prompt, cont = tok.prompt(doc["question"]), tok.encode(answer)
    with torch.no_grad():
        logits = model.lvlm(model.model.images([doc["image"]], model.device), torch.tensor([prompt + cont]),
                            image_at=tok.image_at)[0]
    logp = logits[len(prompt) - 1: -1].log_softmax(-1)
    return -float(logp.gather(1, torch.tensor(cont)[:, None]).sum())


def test_lmms_eval_multiple_choice_picks_the_least_loss_answer(tmp_path, monkeypatch):
    """visor_offline_mc through lmms-eval's CLI (its simple interface builds loglikelihood requests),
    with --limit as CI runs it: each question's prediction is the choice of least NLL computed here
    from the model's own logits, and accuracy overall and per task is the mean of those."""
    import datasets

    from src.eval.lmms_plugin import Visor
    from src.eval.offline_task import N_CHOICES, build

    monkeypatch.chdir(tmp_path)
    fit = main(["fit", *BASE, *DATA, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"])
    ckpt = tmp_path / "visor.ckpt"
    fit.trainer.save_checkpoint(str(ckpt))
    docs = datasets.load_from_disk(str(build([*BASE, *DATA])))["val"]
    assert all(d["choices"][d["label"]] == d["answer"] and len(set(d["choices"])) == len(d["choices"]) <= N_CHOICES
               for d in docs)
    assert max(len(d["choices"]) for d in docs) > 1
    limit = 10
    results, samples, _ = lmms_eval(tmp_path, f"checkpoint={ckpt},config={ROOT / 'configs/visor.yaml'}",
                                    "--force_simple", "--limit", str(limit), task="visor_offline_mc")
    assert [s["doc_id"] for s in samples] == list(range(limit))
    model = Visor(checkpoint=str(ckpt), config=str(ROOT / "configs/visor.yaml"))
    correct = {}
    for s in samples:
        doc = docs[s["doc_id"]]
        losses = [_nll(model, doc, c) for c in doc["choices"]]
        correct[s["doc_id"]] = float(losses.index(min(losses)) == doc["label"])
        assert s["acc"] == correct[s["doc_id"]], (doc["choices"], losses, s)
    assert results["acc,none"] == pytest.approx(sum(correct.values()) / limit)
    for t in {docs[i]["task"] for i in correct}:
        mine = [c for i, c in correct.items() if docs[i]["task"] == t]
        assert results[f"acc_{t},none"] == pytest.approx(sum(mine) / len(mine))


def test_lmms_eval_router_budgets_are_predicts(tmp_path, monkeypatch):
    """A policy-stage checkpoint through lmms-eval's CLI with budget=policy and budget=target: every
    sample's budget, answer (8 new tokens at most, as the task asks) and GFLOPs equal the policy
    module's own `predict` in the same mode
    (`target` meets its mean cost over a batch: the same batches of 8 in both). The router's weights
    are randomised after a 2-step fit so that its choices differ from sample to sample."""
    import datasets
    import torch

    from src.eval.offline_task import build
    from src.lit.checkpoint_io import export_checkpoint
    from src.models import DecoderConfig, LayerPlan, VisionEncoder, VisorLVLM

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    universal = VisorLVLM(VisionEncoder("lcnet_075", 2, 128, pos_embed="sincos", feature_norm=True),
                          DecoderConfig(preset="tiny"), LayerPlan(6, self_layers=[0, 2, 4], optional_self=[2, 4],
                                                                  cross_layers=[1, 5], skip_kind="cross"), pos_conv=True)
    export = str(export_checkpoint(universal, tmp_path / "universal", {}))
    policy = ["--config", str(ROOT / "configs/policy.yaml"), "--model.init_args.universal_checkpoint", export]
    fit = main(["fit", *policy, *DATA, "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0"])
    with torch.no_grad():
        for p in fit.model.lvlm.policy.parameters():
            p.normal_(0, 1)
    ckpt = tmp_path / "policy.ckpt"
    fit.trainer.save_checkpoint(str(ckpt))
    docs = datasets.load_from_disk(str(build([*policy, *DATA])))["val"]
    for budget, predict_mode in [("policy", ["--model.init_args.inference", "policy"]),
                                 ("target,target_cost=0.7", ["--model.init_args.inference", "target",
                                                             "--model.init_args.target_cost", "0.7"])]:
        stats = tmp_path / f"stats_{budget[:6]}.jsonl"
        _, samples, _ = lmms_eval(tmp_path, f"checkpoint={ckpt},config={ROOT / 'configs/policy.yaml'},"
                                             f"budget={budget},stats_path={stats}", batch_size=8,
                                  out=f"lmms_{budget[:6]}")
        preds = tmp_path / f"preds_{budget[:6]}.jsonl"
        main(["predict", *policy, *DATA, *predict_mode, "--model.init_args.max_new_tokens", "8", "--ckpt_path", str(ckpt),
              "--predict_writer.output_path", str(preds)])
        rows = {r["id"]: r for r in map(json.loads, preds.read_text().splitlines())}
        per_sample = {s["doc_id"]: s for s in map(json.loads, stats.read_text().splitlines())}
        assert len(rows) == len(per_sample) == len(samples) == len(docs) > 8
        for s in samples:
            row, stat = rows[docs[s["doc_id"]]["id"]], per_sample[s["doc_id"]]
            assert stat["budget"] == row["budget"] and stat["gflops"] == pytest.approx(row["gflops"]), (stat, row)
            assert s["filtered_resps"].strip() == row["prediction"].strip()
        assert len({r["budget"] for r in rows.values()}) > 1, rows  # the router chose different budgets


def _local_docvqa(folder: Path, answers) -> Path:
    """A stand-in for a downloaded DocVQA dataset repo: README.md whose `configs:` name the parquet
    file, as on the Hub, and the columns lmms-eval's docvqa tasks read (images in modes L and RGBA too)."""
    import datasets
    from PIL import Image

    rows = {"questionId": [], "question": [], "image": [], "answers": []}
    for i, answer in enumerate(answers):
        mode = ["RGB", "L", "RGBA"][i % 3]
        rows["questionId"].append(str(5000 + i))
        rows["question"].append(f"What is written in box {i}?")
        rows["image"].append(Image.new(mode, (64 + 8 * i, 48), 255 if mode == "L" else (255,) * len(mode)))
        rows["answers"].append(answer)
    features = datasets.Features({"questionId": datasets.Value("string"), "question": datasets.Value("string"),
                                  "image": datasets.Image(), "answers": datasets.Sequence(datasets.Value("string"))})
    (folder / "DocVQA").mkdir(parents=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / "DocVQA/validation-00000-of-00001.parquet"))
    (folder / "README.md").write_text("---\nconfigs:\n- config_name: DocVQA\n  data_files:\n  - split: validation\n"
                                      "    path: DocVQA/validation-*\n---\n")
    return folder


def test_a_standard_task_runs_on_a_local_copy_of_its_data(tmp_path):
    """lmms-eval's own docvqa_val (its prompt, `until`, ANLS) through src.eval.local_task over a
    local folder, with the shipped VISOR export: every sample answered, and ANLS computed on the
    plugin's text (rows whose answer list holds the model's answer score 1, the others 0)."""
    from src.eval.local_task import write_local_task

    # the shipped model answers a blank page "white 1 white": rows 0, 1 and 3 list that answer
    answers = [["white 1 white"], ["white", "white 1 white"], ["zzz"], ["white 1 white"], ["qqq"]]
    data = _local_docvqa(tmp_path / "DocVQA", answers)
    tasks = write_local_task("docvqa_val", str(data), out=str(tmp_path / "local_tasks"))
    assert tasks.name == "docvqa_val_local.yaml" and "lmms_eval/tasks/docvqa/" in tasks.read_text()
    # a fresh datasets cache: datasets would otherwise serve an earlier run's copy of a same-named dataset
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf_home")}
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "lmms_eval", "eval", "--model", "visor", "--model_args",
                          f"checkpoint={ROOT / 'checkpoints/visor'},budget=max", "--include_path", str(tasks.parent),
                          "--tasks", "docvqa_val_local", "--batch_size", "2", "--limit", "4", "--log_samples",
                          "--output_path", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(next(out.rglob("*_results.json")).read_text())["results"]["docvqa_val_local"]
    samples = [json.loads(line) for line in next(out.rglob("*_samples_docvqa_val_local.jsonl")).open()]
    assert len(samples) == 4
    hits = [float(s["filtered_resps"].strip().lower() in [a.lower() for a in answers[s["doc_id"]]]) for s in samples]
    assert [s["anls"] for s in sorted(samples, key=lambda s: s["doc_id"])] == [
        h for _, h in sorted(zip([s["doc_id"] for s in samples], hits))]
    assert 0 < sum(hits) < 4, [s["filtered_resps"] for s in samples]  # both outcomes occur
    assert results["anls,none"] == pytest.approx(sum(hits) / 4)
