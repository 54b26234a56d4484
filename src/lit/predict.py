"""`predict`: cached greedy answers for a shard set, written as JSONL.

Both LightningModules' `predict_step` cut each validation-style batch (one question per sequence,
labels marking the answer) to its prompt (`split_prompt`), generate the answer with the KV cache
(src/models/generation.py) and return one row per sample (`prediction_rows`); the
`JsonlPredictionWriter` callback (added by `src.cli` as `predict_writer`) writes the rows.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from src.flops import sample_flops
from src.lit.batch import image_at, image_sizes, query_index
from src.models.generation import GenerationOutput, visual_kv_bytes

log = logging.getLogger(__name__)


def split_prompt(batch: dict, pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """A right-padded batch (input_ids (B, T), labels (B, T), -100 off the answers) -> (prompt ids
    (B, P) right-padded with pad_id, prompt lengths (B,) int64): each sample's tokens up to and
    including the one that predicts the first answer token (the whole unpadded sequence when the
    sample has no answer). With several turns in a sequence the prompt is the first question."""
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.dim() == 2 and labels.shape == ids.shape, (
        f"input_ids and labels must both be (B, T), got {tuple(ids.shape)}, {tuple(labels.shape)}")
    has_answer = (labels != -100).any(1)
    lens = torch.where(has_answer, query_index(labels) + 1, (ids != pad_id).sum(1).clamp_min(1))  # (B,)
    P = int(lens.max())
    prompt = ids[:, :P].clone()
    prompt[torch.arange(P, device=ids.device)[None, :] >= lens[:, None]] = pad_id
    return prompt, lens


def _reference_answer(labels: torch.Tensor, eos_id: Optional[int]) -> List[int]:
    """labels (T,) of one sample -> the first answer's ids (up to its end token, excluded)."""
    ids = labels.tolist()
    start = next((t for t, x in enumerate(ids) if x != -100), len(ids))
    out = []
    for x in ids[start:]:
        if x == -100 or x == eos_id:
            break
        out.append(x)
    return out


def _question_ids(tokenizer, prompt: Sequence[int]) -> List[int]:
    """The question's ids inside a single-turn prompt (start + head + question + tail), when the
    tokenizer says its chat layout; else the whole prompt."""
    if not hasattr(tokenizer, "chat_turn") or not hasattr(tokenizer, "start_ids"):
        return list(prompt)
    empty = tokenizer.chat_turn("", "")
    lo = len(tokenizer.start_ids) + len(empty.head) + len(getattr(tokenizer, "image_ids", []))
    hi = len(prompt) - len(empty.tail)
    return list(prompt[lo:hi]) if lo <= hi else list(prompt)


def decode(tokenizer, ids: Sequence[int]) -> str:
    """tokenizer.decode, with ids past the tokenizer's vocabulary (a model's padded embedding rows,
    which an untrained model may emit) shown as `<id N>` instead of failing."""
    n = tokenizer.vocab_size
    if all(i < n for i in ids):
        return tokenizer.decode(ids)
    parts, run = [], []
    for i in list(ids) + [None]:
        if i is not None and i < n:
            run.append(i)
            continue
        if run:
            parts.append(tokenizer.decode(run))
            run = []
        if i is not None:
            parts.append(f"<id {i}>")
    return " ".join(p for p in parts if p)


def prediction_rows(lvlm, batch: dict, prompt: torch.Tensor, prompt_lens: torch.Tensor, out: GenerationOutput,
                    tokenizer=None, seen: Optional[Counter] = None) -> List[Dict]:
    """One JSON-ready dict per sample: id (`<key>/<n>`, n counting the image's questions in reading
    order via `seen`), question, answer (reference), prediction, correct (exact match of the
    texts), task, difficulty, budget (index) and budget_layers (e.g. "SCTCTC"), prompt and generated
    token counts, the generated ids, the image's visual tokens and the visual KV cache it held
    (`visual_kv_kib`, at its budget), and GFLOPs from `src.flops.sample_flops` at the sample's budget
    and prompt length: `gflops` (LLM) and `gflops_total` (+ vision encoder and projector). They count
    the prefill forward over the prompt (what one forward pass costs), not the decode steps."""
    B = prompt.shape[0]
    seen = Counter() if seen is None else seen
    eos = getattr(tokenizer, "eos_id", None)
    plan = lvlm.plan
    rows = []
    for b in range(B):
        key = str(batch.get("key", [""] * B)[b])
        n = seen[key]
        seen[key] += 1
        P, k = int(prompt_lens[b]), int(out.budgets[b])
        new = out.tokens[b, : int(out.lengths[b])].tolist()
        new_text = [t for t in new if t != eos]
        answer_ids = _reference_answer(batch["labels"][b], eos)
        question_ids = _question_ids(tokenizer, prompt[b, :P].tolist())
        if tokenizer is not None:
            question = batch["question"][b] if "question" in batch else decode(tokenizer, question_ids)
            answer = batch["answer"][b] if "answer" in batch else decode(tokenizer, answer_ids)
            prediction = decode(tokenizer, new_text)
            correct = prediction.strip() == answer.strip()
        else:
            question, answer, prediction = question_ids, answer_ids, new_text
            correct = new_text == answer_ids
        hw = image_sizes(batch)[b]
        flops = sample_flops(lvlm, P, k, hw, image_at(batch))
        n_visual = lvlm.num_visual_tokens if hw is None else lvlm.anyres.num_tokens(*hw)
        rows.append({
            "id": f"{key}/{n}", "question": question, "answer": answer, "prediction": prediction,
            "correct": bool(correct), "task": batch.get("task", [None] * B)[b],
            "difficulty": batch.get("difficulty", [None] * B)[b], "budget": k, "budget_layers": plan.budget_name(k),
            "prompt_tokens": P, "generated_tokens": len(new), "generated_ids": new,  # eos included: an empty or
            # odd prediction can be diagnosed from the file
            "visual_tokens": n_visual, "visual_kv_kib": visual_kv_bytes(lvlm, k, n_visual=n_visual) / 1024,
            "gflops": flops.llm / 1e9,
            "gflops_total": flops.total / 1e9,
        })
    return rows


def log_cache_report(lvlm) -> None:
    """One line: visual KV-cache bytes per sample at each budget, and the ratio to the all-self LVLM,
    for one crop's visual tokens, or with AnyRes a tile-sized image's (a base crop and one tile); each
    predict row has its own image's (`visual_kv_kib`)."""
    if lvlm.anyres is None:
        n, what = lvlm.num_visual_tokens, "one crop"
    else:
        side = lvlm.anyres.tile
        n, what = lvlm.anyres.num_tokens(side, side), f"a {side}x{side} AnyRes image"
    full = visual_kv_bytes(lvlm, all_self=True, n_visual=n)
    parts = [f"budget {k} ({lvlm.plan.budget_name(k)}): {visual_kv_bytes(lvlm, k, n_visual=n) / 1024:.1f} KiB "
             f"(all-self / this = {full / max(1, visual_kv_bytes(lvlm, k, n_visual=n)):.2f}x)"
             for k in range(lvlm.plan.n_budgets)]
    rank_zero_info(f"[predict] visual KV cache per sample ({what}: {n} visual tokens; each row gives its "
                   f"image's): all-self {full / 1024:.1f} KiB; " + "; ".join(parts))


class JsonlPredictionWriter(BasePredictionWriter):
    """Writes each predict batch's rows (a list of dicts from `predict_step`) to `output_path` as
    JSON lines, one per sample. `output_path` None: `<trainer.log_dir or default_root_dir>/
    predictions.jsonl`. The file is rewritten at each predict run; with several processes each
    writes `<stem>.rank<r>.jsonl`. `src.cli` adds it as `--predict_writer.output_path`."""

    def __init__(self, output_path: Optional[str] = None) -> None:
        super().__init__(write_interval="batch")
        if output_path is not None and (not str(output_path).strip() or Path(output_path).is_dir()):
            raise ValueError(f"predict_writer.output_path={output_path!r} must be a file path (it is a folder "
                             "or empty)")
        self.output_path = output_path
        self._file = None
        self.path: Optional[Path] = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        path = Path(self.output_path) if self.output_path is not None else (
            Path(trainer.log_dir or trainer.default_root_dir) / "predictions.jsonl")
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("w")
        except OSError as e:
            raise ValueError(f"predict_writer.output_path={path}: cannot write there ({e})") from e
        self.path = path
        rank_zero_info(f"[predict] writing predictions to {path}")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        assert self._file is not None, "predict_writer: setup() did not run for predict"
        for row in prediction:
            self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "predict" and self._file is not None:
            self._file.close()
            self._file = None
