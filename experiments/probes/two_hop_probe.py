"""Why a decoder trained from scratch never finds the medium object a question names: two hops.

experiments/probes/binding_probe.py shows the shipped base answers `locate` ("where is the green circle ?")
with either medium object's cell, its attention blind to the asked colour, although the colour is
linearly readable from the visual tokens. This probe asks whether that is the *question form*:
in `<bos> where is the green circle ? <sep>` the cell is predicted at `<sep>`, which knows nothing
of "green" until an earlier layer moves the word there; only then can a later layer's query key on
the colour (two hops). At initialisation `<sep>` spreads its attention over ~256 visual tokens and
a few words, so the first hop gets almost no gradient until the second works, and the second none
until the first does.

It trains a fresh tiny decoder (the base's preset, `--layers` layers) plus a linear head from the
shipped base's frozen projected visual tokens (encoder + projector, the decoder's input) on one
task alone, in the two answer forms the generator offers for it:

- `--task locate` (`GeneratorConfig.locate_answer`): `cell`, the head reads the cell at `<sep>`
  (two hops); `object_cell`, the answer restates the object first ("green circle top left") and
  the head reads the cell at the restated shape word, teacher-forced: that token's own embedding
  and the colour word right before it can key the attention (one hop, as a question-embedding
  query would);
- `--task spatial` (`GeneratorConfig.spatial_answer`): `relation` at `<sep>`, or
  `object_relation`, read after the restated first object ("green circle left"). Only that object
  needs finding by its words: the other is the other medium object.

Same scenes, seeds, steps and optimiser for both forms; reported: held-out accuracy and how many
wrong answers mix the two objects up (`locate`: the other object's cell; `spatial`: the opposite
relation), during training.

    python experiments/probes/two_hop_probe.py [--task locate] [--checkpoint checkpoints/base] [--layers 2] [--steps 500]

Writes experiments/results/two_hop_probe.{md,json} (`spatial`: two_hop_probe_spatial.*).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments.probes.binding_probe import load_exported_base, medium_pair_scenes  # noqa: E402
from src.data.generator import (COLS3, LOCATE_ANSWERS, RELATIONS, ROWS3, SPATIAL_ANSWERS, GeneratorConfig,  # noqa: E402
                                SceneGenerator, vocabulary)
from src.data.scene_stream import image_tensor  # noqa: E402
from src.data.tokenizer import WordTokenizer  # noqa: E402
from src.models import VisorLVLM  # noqa: E402
from src.models.decoder import Decoder, DecoderConfig  # noqa: E402
from src.models.plan import LayerPlan  # noqa: E402

CELLS = [f"{r} {c}" for r in ROWS3 for c in COLS3]  # the generator's 3 x 3 cells, raster order
TASK_FORMS = {"locate": LOCATE_ANSWERS, "spatial": SPATIAL_ANSWERS}  # (plain, restated) answer forms
CLASSES = {"locate": CELLS, "spatial": list(RELATIONS)}
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}


def task_of(form: str) -> str:
    """The task whose answer forms (TASK_FORMS) include `form`."""
    for task, forms in TASK_FORMS.items():
        if form in forms:
            return task
    raise ValueError(f"form must be one of {[f for forms in TASK_FORMS.values() for f in forms]}, got {form!r}")


def probe_items(task: str, n_images: int, seed: int, image_size: int) -> Tuple[List[torch.Tensor], List[List[dict]]]:
    """-> images (each (3, H, W)) of the first `n_images` scenes with two medium objects, and per
    image its `task` QAs (`locate`: two, one per object; `spatial`: one) as the generator writes
    them in the restated forms (`locate`: "<colour> <shape> <row> <col>", `spatial`: "<colour>
    <shape> <relation>")."""
    if task not in TASK_FORMS:
        raise ValueError(f"task must be one of {tuple(TASK_FORMS)}, got {task!r}")
    gen = SceneGenerator(seed, GeneratorConfig(image_size=image_size, locate_answer="object_cell",
                                               spatial_answer="object_relation"), aux_questions=True)
    images, qas = [], []
    for image, _, qa in medium_pair_scenes(gen, n_images):
        images.append(image_tensor(image))
        qas.append([q for q in qa if q["task"] == task])
    return images, qas


def sequence_ids(tok: WordTokenizer, question: str, answer: str, form: str) -> Tuple[List[int], int]:
    """A QA with its answer in the restated form ("<colour> <shape> <rest>") -> (the ids the head
    reads the last of, the class of <rest> in its task's CLASSES). Plain forms (`cell`,
    `relation`): the prompt (ends at <sep>); restated forms (`object_cell`, `object_relation`): the
    prompt and the restated object, teacher-forced (ends at its shape word)."""
    task = task_of(form)
    words = answer.split()
    assert len(words) >= 3, f"expected '<colour> <shape> <answer>', got {answer!r}"
    ids = tok.prompt(question)
    if form == TASK_FORMS[task][1]:
        ids = ids + tok.encode(" ".join(words[:2]))
    return ids, CLASSES[task].index(" ".join(words[2:]))


def readout_targets(qas: List[List[dict]], form: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image its K QAs (all images alike) -> ids (N, K, T), label (N, K) and `confused` (N, K):
    the answer of a model that mixes up the two medium objects (`locate`: the other object's cell;
    `spatial`: the opposite relation, A and B swapped)."""
    tok = WordTokenizer(vocabulary())
    seqs = [[sequence_ids(tok, q["question"], q["answer"], form) for q in per_image] for per_image in qas]
    ids = torch.tensor([[s[0] for s in per_image] for per_image in seqs])  # questions of a task are equal-length
    label = torch.tensor([[s[1] for s in per_image] for per_image in seqs])
    if task_of(form) == "locate":
        assert label.shape[1] == 2, f"locate: two questions per image, got {label.shape[1]}"
        confused = label.flip(1)
    else:
        confused = torch.tensor([[RELATIONS.index(OPPOSITE[RELATIONS[k]]) for k in row] for row in label.tolist()])
    return ids, label, confused


@torch.no_grad()
def visual_tokens(model: VisorLVLM, images: List[torch.Tensor], batch: int = 100) -> torch.Tensor:
    """-> the decoder's visual input (N, V, d) in half precision (encoder + projector, frozen)."""
    out = [model.encode_images(torch.stack(images[i:i + batch])).tokens.half()
           for i in tqdm(range(0, len(images), batch), desc="visual tokens", unit="batch")]
    return torch.cat(out)


def train_readout(visual: torch.Tensor, qas: List[List[dict]], form: str, n_layers: int, steps: int,
                  n_val: int, lr: float = 1e-3, batch: int = 64, eval_every: int = 100,
                  seed: int = 0) -> List[dict]:
    """visual (N, V, d): frozen decoder inputs; qas: per image its K questions of one task
    (`probe_items`). Trains a fresh decoder (preset `tiny`, `n_layers`) + linear head on the first
    N - n_val images' questions -> [{step, loss, acc, other}] on the last n_val images' questions
    (acc: right; other: wrong and the answer for the two objects mixed up, `readout_targets`)."""
    N, V, d = visual.shape
    assert len(qas) == N and 0 < n_val < N, f"{len(qas)} QA lists for {N} images, n_val {n_val}"
    ids, label, confused = readout_targets(qas, form)
    K = label.shape[1]
    n_classes = len(CLASSES[task_of(form)])
    torch.manual_seed(seed)
    config = DecoderConfig(preset="tiny", n_layers=n_layers)
    assert config.d_model == d, f"visual tokens have d={d}, the tiny decoder d_model={config.d_model}"
    decoder = Decoder(config, LayerPlan(n_layers=n_layers, all_self=True))
    head = nn.Linear(d, n_classes)
    params = list(decoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def logits(images: torch.Tensor, which: torch.Tensor) -> torch.Tensor:  # (B,), (B,) -> (B, n_classes)
        x = torch.cat([visual[images].float(), decoder.embed_tokens(ids[images, which])], dim=1)
        return head(decoder.forward_plain(x)[:, -1])

    val = torch.arange(N - n_val, N)
    history = []
    for step in tqdm(range(1, steps + 1), desc=f"two-hop probe ({form})", unit="step"):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, step / 50)
        images = torch.randint(N - n_val, (batch,))
        which = torch.randint(K, (batch,))
        loss = F.cross_entropy(logits(images, which), label[images, which])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                right = other = 0
                for w in range(K):
                    pred = torch.cat([logits(val[i:i + 200], torch.full((len(val[i:i + 200]),), w))
                                      .argmax(-1) for i in range(0, n_val, 200)])
                    right += (pred == label[val, w]).sum().item()
                    other += ((pred != label[val, w]) & (pred == confused[val, w])).sum().item()
            history.append({"step": step, "loss": round(loss.item(), 4), "acc": right / (K * n_val),
                            "other": other / (K * n_val)})
    return history


OTHER = {"locate": "wrong answers that name the other medium object's cell (chance for the cell: 11%)",
         "spatial": "wrong answers that give the opposite relation, the two objects swapped (chance: 25%)"}


def render(result: dict) -> str:
    task = result["task"]
    n_questions = (2 if task == "locate" else 1) * result["val_images"]
    lines = ["# Two-hop probe: does restating the object let a fresh decoder find it?", "",
             f"`python experiments/probes/two_hop_probe.py --task {task} --checkpoint {result['checkpoint']} "
             f"--layers {result['layers']} --steps {result['steps']} --images {result['images']}` "
             f"({result['seconds']:.0f} s). A fresh {result['layers']}-layer tiny decoder + linear head on the "
             f"shipped base's frozen visual tokens, `{task}` only; held-out: {n_questions} questions on "
             f"{result['val_images']} images. `other` = {OTHER[task]}.", "",
             "| step | " + " | ".join(f"{f} acc | {f} other" for f in result["forms"]) + " |",
             "|---:|" + "---:|---:|" * len(result["forms"])]
    steps = [h["step"] for h in result["forms"][next(iter(result["forms"]))]]
    for k, step in enumerate(steps):
        cells = [f"{100 * h[k]['acc']:.1f} | {100 * h[k]['other']:.1f}" for h in result["forms"].values()]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", choices=tuple(TASK_FORMS), default="locate")
    ap.add_argument("--checkpoint", default="checkpoints/base")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--images", type=int, default=4000, help="scenes with two medium objects, val included")
    ap.add_argument("--val-images", type=int, default=500)
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--out", default=None, help="default experiments/results/two_hop_probe (locate), "
                                                 "two_hop_probe_spatial (spatial)")
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    start = time.time()
    model, _ = load_exported_base(args.checkpoint)
    images, qas = probe_items(args.task, args.images, args.seed, model.vision.image_size)
    visual = visual_tokens(model, images)
    forms = {form: train_readout(visual, qas, form, args.layers, args.steps, args.val_images)
             for form in TASK_FORMS[args.task]}
    result = {"task": args.task, "checkpoint": args.checkpoint, "layers": args.layers, "steps": args.steps,
              "images": args.images, "val_images": args.val_images, "seed": args.seed,
              "seconds": time.time() - start, "forms": forms}
    name = "two_hop_probe" + ("" if args.task == "locate" else f"_{args.task}")
    out = Path(args.out or ROOT / "experiments/results" / name)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
