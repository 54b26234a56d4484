"""lmms-eval model plugin `visor`: any checkpoint this project writes, scored by lmms-eval's own CLI.

    python -m lmms_eval eval --model visor \
        --model_args checkpoint=outputs/visor/export,budget=max,dtype=float32 \
        --include_path src/eval/tasks --tasks visor_offline --batch_size 8 --output_path outputs/lmms_eval

Found through the entry-point group `lmms_eval.models` (pyproject.toml; `manifest` below) once the
project's metadata is on the path (`pip install -e .[eval]`, or `python setup.py egg_info` in the
clone, which `make` runs). Both lmms-eval interfaces are served: `visor` resolves to the chat model
(`VisorChat`, messages), `--force_simple` to `Visor` (context + doc_to_visual).

--model_args:
  checkpoint   an export folder, a Lightning .ckpt (with `config`) or a converted LLaVA-OneVision
               (with `tokenizer`): src/eval/checkpoints.py
  config       the YAML(s) it was fit with, `a.yaml+b.yaml` (token reduction: add its delta, e.g.
               `configs/visor.yaml+configs/token_reduction/fastv75.yaml`)
  budget       max | min | an index | policy (the router's argmax) | target (the router held to a
               mean relative cost `target_cost`)
  device, dtype (float32 | bfloat16 | float16), batch_size, max_new_tokens (when the task gives none),
  seed (sampling), stats_path (a JSONL of each sample's budget, GFLOPs and token counts)
Each generated sample's budget and LLM GFLOPs (src/flops.py, its prompt's prefill) go to
`stats_path`, and the per-task means to the log at the end.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from loguru import logger
from tqdm import tqdm

from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

from src.eval.checkpoints import load_for_eval
from src.flops import sample_flops
from src.lit.batch import sizes_of
from src.lit.checkpoint_io import dtype_named
from src.lit.predict import decode
from src.models.generation import generate
from src.models.policy import select_budgets


def manifest() -> ModelManifest:
    """The entry point's payload (pyproject.toml [project.entry-points."lmms_eval.models"])."""
    return ModelManifest(model_id="visor", simple_class_path="src.eval.lmms_plugin.Visor",
                         chat_class_path="src.eval.lmms_plugin.VisorChat")


class Visor(lmms):
    """The simple interface: requests carry (context, gen_kwargs, doc_to_visual, doc_id, task, split)."""

    is_simple = True

    def __init__(self, checkpoint: str, config: Optional[str] = None, tokenizer: Optional[str] = None,
                 chat_template: Optional[str] = None, budget="max", target_cost: Optional[float] = None,
                 device: str = "cpu", dtype: str = "float32", batch_size=1, max_new_tokens: int = 16,
                 seed: int = 0, stats_path: Optional[str] = None, **unused) -> None:
        super().__init__()
        if unused:
            logger.warning(f"visor: ignoring model_args {sorted(unused)}")
        dtype = dtype_named(dtype, "visor: dtype")
        self.model = load_for_eval(str(checkpoint), config, tokenizer, chat_template)
        self.device = torch.device(device)
        self.lvlm = self.model.lvlm.to(self.device, dtype).eval()
        self.tok = self.model.tokenizer
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"visor: batch_size must be >= 1, got {batch_size}")
        self.max_new_tokens = int(max_new_tokens)
        self.generator = torch.Generator(device=self.device).manual_seed(int(seed))
        self.mode, self.target_cost = _budget_mode(budget, self.lvlm), target_cost
        if self.mode == "target" and target_cost is None:
            raise ValueError("visor: budget=target needs target_cost=<mean cost relative to the largest budget>")
        self.stats_path = Path(stats_path) if stats_path else None
        self.stats: List[Dict] = []

    # -- requests -> (question, image) ------------------------------------------------------------
    def _inputs(self, args) -> Tuple[str, object, dict]:
        """One generate_until request -> (question text, PIL image, gen_kwargs)."""
        context, gen_kwargs, doc_to_visual, doc_id, task, split = args
        return context, _one_image(doc_to_visual(self.task_dict[task][split][doc_id]), task, doc_id), gen_kwargs

    def _right_padded(self, rows: List[List[int]]) -> torch.Tensor:
        """Token rows -> (B, T) right-padded with pad_id on the device (T: the longest row)."""
        ids = torch.full((len(rows), max(map(len, rows))), self.tok.pad_id, dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, : len(row)] = torch.tensor(row)
        return ids.to(self.device)

    def _budget(self, lengths: List[int], sizes: List[Optional[tuple]]):
        """The budget spec `generate` takes: an index, or the router with this batch's relative costs
        (each sample's budgets' LLM FLOPs at its prompt length and image size, as predict prices them)."""
        if isinstance(self.mode, int):
            return self.mode
        flops = torch.tensor([[sample_flops(self.lvlm, t, k, hw, self.tok.image_at).llm
                               for k in range(self.lvlm.plan.n_budgets)] for t, hw in zip(lengths, sizes)],
                             dtype=torch.float64)
        largest = self.lvlm.plan.largest_budget
        costs = (flops / flops[:, largest:largest + 1]).mean(0).float().to(self.device)
        return lambda logits: select_budgets(logits, self.mode, costs, self.target_cost, largest,
                                             self.lvlm.plan.smallest_budget)

    # -- lmms-eval's interface --------------------------------------------------------------------
    def generate_until(self, requests: List[Instance]) -> List[GenerationResult]:
        # (request index, question, image, gen_kwargs, task, doc_id)
        items = [(i, *self._inputs(r.args), r.args[-2], r.args[-3]) for i, r in enumerate(requests)]
        groups: Dict[str, list] = defaultdict(list)  # batches share their generation settings
        for item in items:
            groups[json.dumps(item[3], sort_keys=True, default=str)].append(item)
        results: List[Optional[GenerationResult]] = [None] * len(requests)
        bar = tqdm(total=len(requests), desc="visor: generating", disable=self.rank != 0)
        for group in groups.values():
            for lo in range(0, len(group), self.batch_size):
                chunk = group[lo:lo + self.batch_size]
                for (i, *_), result in zip(chunk, self._generate(chunk)):
                    results[i] = result
                bar.update(len(chunk))
        bar.close()
        self._report()
        return results

    @torch.no_grad()
    def _generate(self, chunk) -> List[GenerationResult]:
        """A batch of requests sharing gen_kwargs: right-padded prompts, one cached generate call."""
        gen_kwargs = dict(chunk[0][3])
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        if not gen_kwargs.get("do_sample", temperature > 0):
            temperature = 0.0
        max_new = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
        prompts = [self.tok.prompt(question) for _, question, _, _, _, _ in chunk]
        lengths = [len(p) for p in prompts]
        ids = self._right_padded(prompts)
        images = self.model.images([image for _, _, image, _, _, _ in chunk], self.device)
        sizes = sizes_of(images)
        out = generate(self.lvlm, images, ids, torch.tensor(lengths, device=self.device), max_new,
                       budget=self._budget(lengths, sizes), eos_id=self.tok.eos_id, pad_id=self.tok.pad_id,
                       temperature=temperature, generator=self.generator if temperature > 0 else None,
                       image_at=self.tok.image_at, stop_sequences=[self.tok.encode(s) for s in until if s])
        results = []
        for b, (_, _, _, _, task, doc_id) in enumerate(chunk):
            new = out.tokens[b, : int(out.lengths[b])].tolist()
            text = decode(self.tok, [t for t in new if t != self.tok.eos_id])
            for s in until:  # the text up to the first stop string, as lmms-eval's models return it
                if s and s in text:
                    text = text[: text.index(s)]
            k = int(out.budgets[b])
            flops = sample_flops(self.lvlm, lengths[b], k, sizes[b], self.tok.image_at)
            self.stats.append({"task": task, "doc_id": doc_id, "budget": k, "budget_layers": self.lvlm.plan.budget_name(k),
                               "gflops": flops.llm / 1e9, "gflops_total": flops.total / 1e9,
                               "prompt_tokens": lengths[b], "generated_tokens": len(new)})
            results.append(GenerationResult(text=text, token_counts=TokenCounts(input_tokens=lengths[b],
                                                                                output_tokens=len(new))))
        return results

    @torch.no_grad()
    def loglikelihood(self, requests: List[Instance]) -> List[Tuple[float, bool]]:
        """(-log p(continuation | image, context), whether greedy decoding gives the continuation) per
        request: the continuation after the chat prompt of the context, in right-padded batches of
        batch_size. A loss, not a log-probability: lmms-eval's multiple-choice scoring takes the
        argmin (api/task.py), as its own models return their loss. The router and FastV see the
        prompt only: under budget=policy every choice of a question gets the same budget and visual
        tokens (`target` meets its cost over each batch, as in generation)."""
        items = []  # (request index, prompt ids, continuation ids, image)
        for i, r in enumerate(requests):
            context, target, doc_to_visual, doc_id, task, split = r.args
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            items.append((i, self.tok.prompt(context), self.tok.encode(continuation),
                          _one_image(doc_to_visual(doc), task, doc_id)))
        res: List[Tuple[float, bool]] = [(0.0, True)] * len(requests)  # an empty continuation costs nothing
        items = [it for it in items if it[2]]
        for lo in tqdm(range(0, len(items), self.batch_size), desc="visor: loglikelihood", disable=self.rank != 0):
            chunk = items[lo:lo + self.batch_size]
            for (i, *_), scored in zip(chunk, self._loglikelihood(chunk)):
                res[i] = scored
        return res

    def _loglikelihood(self, chunk) -> List[Tuple[float, bool]]:
        """A batch of (index, prompt, continuation, image) -> (NLL, greedy) each."""
        rows = [prompt + cont[:-1] for _, prompt, cont, _ in chunk]
        ids = self._right_padded(rows)
        lengths = [len(prompt) for _, prompt, _, _ in chunk]
        prompt_len = torch.tensor(lengths, device=self.device)[:, None]
        row_len = torch.tensor([len(row) for row in rows], device=self.device)[:, None]
        pos = torch.arange(ids.shape[1], device=self.device)[None, :]
        at = (pos >= prompt_len - 1) & (pos < row_len)  # the positions that predict the continuation
        prompt_mask = pos < prompt_len
        last = prompt_len[:, 0] - 1  # fastv ranks by the last prompt token, as in generation
        images = self.model.images([image for *_, image in chunk], self.device)
        k = self._budget(lengths, sizes_of(images))
        if callable(k):
            logits = self.lvlm.routed(images, ids, prompt_mask, k, last, logits_at=at, image_at=self.tok.image_at)[0]
        else:
            logits = self.lvlm(images, ids, budget=k, query_index=last, logits_at=at, image_at=self.tok.image_at)
        logp = logits.float().log_softmax(-1)  # (sum of continuation lengths, vocab), sample after sample
        out, lo = [], 0
        for _, _, cont, _ in chunk:
            target = torch.tensor(cont, device=self.device)
            part = logp[lo: lo + len(cont)]
            lo += len(cont)
            out.append((-float(part.gather(1, target[:, None]).sum()), bool((part.argmax(-1) == target).all())))
        return out

    def generate_until_multi_round(self, requests) -> List[str]:
        raise NotImplementedError("visor: multi-round generation is not implemented; use single-turn tasks")

    def _report(self) -> None:
        """Per-task mean budget cost to the log; every sample's row to stats_path."""
        by_task: Dict[str, List[Dict]] = defaultdict(list)
        for s in self.stats:
            by_task[s["task"]].append(s)
        for task, rows in by_task.items():
            logger.info(f"visor: {task}: {len(rows)} samples, LLM GFLOPs/sample {sum(r['gflops'] for r in rows) / len(rows):.3f}, "
                        f"budgets {sorted({r['budget_layers'] for r in rows})}")
        if self.stats_path is not None and self.rank == 0:
            self.stats_path.parent.mkdir(parents=True, exist_ok=True)
            self.stats_path.write_text("".join(json.dumps(s) + "\n" for s in self.stats))


class VisorChat(Visor):
    """The chat interface: requests carry (context, doc_to_messages, gen_kwargs, doc_id, task, split);
    one user turn with one image and its text (LLaVA-OV's layout puts the image inside that turn)."""

    is_simple = False

    def _inputs(self, args):
        from lmms_eval.protocol import ChatMessages

        _, doc_to_messages, gen_kwargs, doc_id, task, split = args
        messages = ChatMessages(messages=doc_to_messages(self.task_dict[task][split][doc_id]))
        images, videos, _ = messages.extract_media()
        users = [m for m in messages.messages if m.role == "user"]
        if len(users) != 1 or videos:
            raise ValueError(f"visor: task {task} doc {doc_id}: one user turn with an image expected "
                             f"({len(users)} user turns, {len(videos)} videos)")
        text = "".join(c.text for c in users[0].content if c.type == "text")
        return text, _one_image(images, task, doc_id), gen_kwargs


def _one_image(visuals, task, doc_id):
    visuals = [v for v in (visuals or []) if v is not None]
    if len(visuals) != 1:
        raise ValueError(f"visor: task {task} doc {doc_id} has {len(visuals)} images; VISOR answers about exactly one")
    return visuals[0]


def _budget_mode(budget, lvlm):
    """`budget` model arg -> an index, or a router mode ('policy' | 'target')."""
    plan = lvlm.plan
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        if not float(budget).is_integer():
            raise ValueError(f"visor: budget={budget} is not a budget index")
        return plan.budget_index(int(budget), "visor: budget")
    if budget == "max":
        return plan.largest_budget
    if budget == "min":
        return plan.smallest_budget
    if budget in ("policy", "target"):
        if lvlm.policy is None:
            raise ValueError(f"visor: budget={budget} needs a model with a router (a policy-stage checkpoint)")
        return budget
    raise ValueError(f"visor: budget must be max, min, policy, target or an index, got {budget!r}")
