"""src/lit/predict.py: prompts cut before their answers, and `python -m src.cli predict` writing
JSONL on tiny generated data (from an export, a fit checkpoint, the policy stage)."""
import pytest
import torch

from src.models import LayerPlan, VisionEncoder, VisorLVLM
from src.models.generation import visual_kv_bytes


def test_split_prompt_cuts_each_sample_before_its_answer():
    from src.data.tokenizer import WordTokenizer
    from src.lit.predict import decode, split_prompt
    # <bos> q q <sep> | a a   and   <bos> q <sep> | a, right-padded (pad 0); labels mark the answers
    batch = {"input_ids": torch.tensor([[1, 7, 8, 3, 9, 10], [1, 7, 3, 9, 0, 0]]),
             "labels": torch.tensor([[-100, -100, -100, 9, 10, 2], [-100, -100, 9, 2, -100, -100]])}
    prompt, lens = split_prompt(batch, pad_id=0)
    assert lens.tolist() == [4, 3] and prompt.tolist() == [[1, 7, 8, 3], [1, 7, 3, 0]]
    tok = WordTokenizer(["x", "y"])  # ids 5, 6
    assert decode(tok, [5, 6]) == "x y" and decode(tok, [5, 99, 6]) == "x <id 99> y"
    from src.lit.predict import JsonlPredictionWriter
    with pytest.raises(ValueError, match="predict_writer.output_path"):
        JsonlPredictionWriter(str(__import__("pathlib").Path(__file__).parent))


ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]
SMALL_DATA = ["--data.train_images", "2", "--data.val_images", "1", "--data.images_per_shard", "4",
              "--data.num_workers", "0", "--data.val_batch_size", "8", "--data.image_size", "64"]
FIELDS = {"id", "question", "answer", "prediction", "budget", "gflops", "gflops_total", "correct", "task",
          "difficulty", "budget_layers", "prompt_tokens", "generated_tokens", "generated_ids", "visual_tokens",
          "visual_kv_kib"}


def _export(tmp_path, plan, pos_conv):
    from src.lit.checkpoint_io import export_checkpoint
    from src.models.decoder import DecoderConfig
    torch.manual_seed(0)
    model = VisorLVLM(VisionEncoder("test_byobnet", 2, 64, pos_embed="sincos", feature_norm=True), DecoderConfig(preset="tiny"), plan,
                      pos_conv=pos_conv)
    return str(export_checkpoint(model, tmp_path / "export", {}))


def _read_jsonl(path, cli):
    import json
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    n_samples = sum(len(b["key"]) for b in cli.datamodule.predict_dataloader())
    assert len(rows) == n_samples > 3  # one line per question about the val image
    assert all(set(r) == FIELDS for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)
    assert all(isinstance(r["question"], str) and r["question"] and isinstance(r["answer"], str) and r["answer"]
               for r in rows)
    return rows


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])  # bf16-mixed: the crash, the embedded default
def test_cli_predict_writes_jsonl(tmp_path, monkeypatch, precision):
    from src.cli import main
    from src.flops import sample_flops
    monkeypatch.chdir(tmp_path)
    export = _export(tmp_path, LayerPlan(6, all_self=True), pos_conv=False)
    out = tmp_path / "preds" / "visor.jsonl"
    cli = main(["predict", "--config", str(ROOT / "configs/visor.yaml"), "--model.base_checkpoint", export,
                "--model.lvlm.init_args.vision.init_args.name", "test_byobnet", "--model.max_new_tokens", "3",
                "--predict_writer.output_path", str(out), "--trainer.precision", precision, *SMALL_DATA])
    rows = _read_jsonl(out, cli)
    lvlm = cli.model.lvlm
    assert all(r["budget"] == 0 and r["budget_layers"] == "SCCTCC" and 1 <= r["generated_tokens"] <= 3 for r in rows)
    assert all(len(r["generated_ids"]) == r["generated_tokens"] and all(isinstance(t, int) for t in r["generated_ids"])
               for r in rows)
    r = rows[0]
    assert r["gflops"] == pytest.approx(sample_flops(lvlm, r["prompt_tokens"], 0).llm / 1e9)
    assert r["visual_tokens"] == lvlm.num_visual_tokens and r["visual_kv_kib"] == visual_kv_bytes(lvlm, 0) / 1024
    # the question is the prompt's question span (no <bos>/<sep>), the answer what the labels supervise
    assert all(r["question"].endswith("?") and "<" not in r["question"] + r["answer"] for r in rows)


def test_cli_predict_from_a_fit_checkpoint_takes_the_weights_and_the_command_line(tmp_path, monkeypatch):
    """`predict --ckpt_path`: the checkpoint's weights, the model arguments of the configs and command
    line (not the hyperparameters saved in the checkpoint)."""
    from src.cli import main
    monkeypatch.chdir(tmp_path)
    export = _export(tmp_path, LayerPlan(6, all_self=True), pos_conv=False)
    common = ["--config", str(ROOT / "configs/visor.yaml"), "--model.base_checkpoint", export,
              "--model.lvlm.init_args.vision.init_args.name", "test_byobnet", *SMALL_DATA]
    fit = main(["fit", *common, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
                "--model.max_new_tokens", "6"])
    ckpt = tmp_path / "fit.ckpt"
    fit.trainer.save_checkpoint(str(ckpt))
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert saved["hyper_parameters"]["max_new_tokens"] == 6
    marked = next(k for k in saved["state_dict"] if k.endswith("mlp.up_proj.weight"))
    saved["state_dict"][marked] += 0.01  # weights the base checkpoint cannot give
    torch.save(saved, ckpt)
    out = tmp_path / "preds.jsonl"
    cli = main(["predict", *common, "--ckpt_path", str(ckpt), "--model.max_new_tokens", "2",
                "--predict_writer.output_path", str(out)])
    assert cli.model.hparams.max_new_tokens == 2
    rows = _read_jsonl(out, cli)
    assert all(1 <= r["generated_tokens"] <= 2 for r in rows)
    weights = cli.model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in saved["state_dict"].items())


def test_cli_predict_policy_stage(tmp_path, monkeypatch):
    from src.cli import main
    monkeypatch.chdir(tmp_path)
    plan = LayerPlan(6, self_layers=[0, 2, 4], optional_self=[2, 4], cross_layers=[1, 5], skip_kind="cross")  # as the config
    export = _export(tmp_path, plan, pos_conv=True)
    out = tmp_path / "policy.jsonl"
    cli = main(["predict", "--config", str(ROOT / "configs/policy.yaml"), "--model.init_args.universal_checkpoint",
                export, "--model.init_args.lvlm.init_args.vision.init_args.name", "test_byobnet",
                "--model.init_args.lvlm.init_args.vision.init_args.image_size", "64", "--model.init_args.inference",
                "min", "--model.init_args.max_new_tokens", "2", "--predict_writer.output_path", str(out), *SMALL_DATA])
    rows = _read_jsonl(out, cli)
    assert all(r["budget"] == 0 and r["budget_layers"] == "SCCTCC" for r in rows)  # inference: min
