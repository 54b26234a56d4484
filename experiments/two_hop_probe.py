"""Why a decoder trained from scratch never finds the medium object a question names: two hops.

experiments/binding_probe.py shows the shipped base answers `locate` ("where is the green circle ?")
with either medium object's cell, its attention blind to the asked colour, although the colour is
linearly readable from the visual tokens. This probe asks whether that is the *question form*:
in `<bos> where is the green circle ? <sep>` the cell is predicted at `<sep>`, which knows nothing
of "green" until an earlier layer moves the word there; only then can a later layer's query key on
the colour (two hops). At initialisation `<sep>` spreads its attention over ~256 visual tokens and
a few words, so the first hop gets almost no gradient until the second works, and the second none
until the first does.

It trains a fresh tiny decoder (the base's preset, `--layers` layers) plus a linear head from the
shipped base's frozen projected visual tokens (encoder + projector, the decoder's input) on
`locate` alone, in two answer forms of the generator (`GeneratorConfig.locate_answer`):

- `cell`: the head reads the cell at `<sep>` (two hops);
- `object_cell`: the answer restates the object first ("green circle top left", as
  `locate_answer="object_cell"` writes it) and the head reads the cell at the restated shape word,
  teacher-forced: that token's own embedding and the colour word right before it can key the
  attention (one hop, as a question-embedding query would).

Same scenes, seeds, steps and optimiser for both; reported: held-out accuracy and how many wrong
answers name the *other* medium object's cell, during training.

    python experiments/two_hop_probe.py [--checkpoint checkpoints/base] [--layers 2] [--steps 500]

Writes experiments/results/two_hop_probe.{md,json}.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.binding_probe import load_exported_base, medium_pair_scenes  # noqa: E402
from src.data.generator import COLS3, LOCATE_ANSWERS, ROWS3, GeneratorConfig, SceneGenerator, vocabulary  # noqa: E402
from src.data.scene_stream import _image_tensor  # noqa: E402
from src.data.tokenizer import WordTokenizer  # noqa: E402
from src.models import VisorLVLM  # noqa: E402
from src.models.decoder import Decoder, DecoderConfig  # noqa: E402
from src.models.plan import LayerPlan  # noqa: E402

CELLS = [f"{r} {c}" for r in ROWS3 for c in COLS3]  # the generator's 3 x 3 cells, raster order


def locate_items(n_images: int, seed: int, image_size: int) -> Tuple[List[torch.Tensor], List[List[dict]]]:
    """-> images (each (3, H, W)) of the first `n_images` scenes with two medium objects, and per
    image its two `locate` QAs as the generator writes them with `locate_answer="object_cell"`
    (question, answer "<colour> <shape> <row> <col>")."""
    gen = SceneGenerator(seed, GeneratorConfig(image_size=image_size, locate_answer="object_cell"),
                         aux_questions=True)
    images, qas = [], []
    for image, _, qa in medium_pair_scenes(gen, n_images):
        images.append(_image_tensor(image))
        qas.append([q for q in qa if q["task"] == "locate"])
    return images, qas


def sequence_ids(tok: WordTokenizer, question: str, answer: str, form: str) -> Tuple[List[int], int]:
    """A `locate` QA (answer in the `object_cell` form) -> (the ids the head reads the last of,
    the cell's class in CELLS). `cell`: the prompt (ends at <sep>); `object_cell`: the prompt and
    the restated object, teacher-forced (ends at its shape word)."""
    if form not in LOCATE_ANSWERS:
        raise ValueError(f"form must be one of {LOCATE_ANSWERS}, got {form!r}")
    words = answer.split()
    assert len(words) == 4, f"expected '<colour> <shape> <row> <col>', got {answer!r}"
    ids = tok.prompt(question)
    if form == "object_cell":
        ids = ids + tok.encode(" ".join(words[:2]))
    return ids, CELLS.index(" ".join(words[2:]))


@torch.no_grad()
def visual_tokens(model: VisorLVLM, images: List[torch.Tensor], batch: int = 100) -> torch.Tensor:
    """-> the decoder's visual input (N, V, d) in half precision (encoder + projector, frozen)."""
    out = [model.encode_images(torch.stack(images[i:i + batch]))[0].half()
           for i in tqdm(range(0, len(images), batch), desc="visual tokens", unit="batch")]
    return torch.cat(out)


def train_readout(visual: torch.Tensor, qas: List[List[dict]], form: str, n_layers: int, steps: int,
                  n_val: int, lr: float = 1e-3, batch: int = 64, eval_every: int = 100,
                  seed: int = 0) -> List[dict]:
    """visual (N, V, d): frozen decoder inputs; qas: the two `locate` QAs per image. Trains a fresh
    decoder (preset `tiny`, `n_layers`) + linear head on the first N - n_val images' questions
    -> [{step, acc, other}] on the last n_val images' questions (acc: right cell; other: wrong
    and the other medium object's cell)."""
    N, V, d = visual.shape
    assert len(qas) == N and 0 < n_val < N, f"{len(qas)} QA lists for {N} images, n_val {n_val}"
    tok = WordTokenizer(vocabulary())
    seqs = [[sequence_ids(tok, q["question"], q["answer"], form) for q in pair] for pair in qas]
    ids = torch.tensor([[s[0] for s in pair] for pair in seqs])  # (N, 2, T): questions are equal-length
    cell = torch.tensor([[s[1] for s in pair] for pair in seqs])  # (N, 2)
    torch.manual_seed(seed)
    config = DecoderConfig(preset="tiny", n_layers=n_layers)
    assert config.d_model == d, f"visual tokens have d={d}, the tiny decoder d_model={config.d_model}"
    decoder = Decoder(config, LayerPlan(n_layers=n_layers, all_self=True))
    head = nn.Linear(d, len(CELLS))
    params = list(decoder.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def logits(images: torch.Tensor, which: torch.Tensor) -> torch.Tensor:  # (B,), (B,) -> (B, 9)
        x = torch.cat([visual[images].float(), decoder.embed_tokens(ids[images, which])], dim=1)
        return head(decoder.forward_plain(x)[:, -1])

    val = torch.arange(N - n_val, N)
    history = []
    for step in tqdm(range(1, steps + 1), desc=f"two-hop probe ({form})", unit="step"):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, step / 50)
        images = torch.randint(N - n_val, (batch,))
        which = torch.randint(2, (batch,))
        loss = F.cross_entropy(logits(images, which), cell[images, which])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                right = other = 0
                for w in (0, 1):
                    pred = torch.cat([logits(val[i:i + 200], torch.full((len(val[i:i + 200]),), w))
                                      .argmax(-1) for i in range(0, n_val, 200)])
                    right += (pred == cell[val, w]).sum().item()
                    other += ((pred != cell[val, w]) & (pred == cell[val, 1 - w])).sum().item()
            history.append({"step": step, "loss": round(loss.item(), 4), "acc": right / (2 * n_val),
                            "other": other / (2 * n_val)})
    return history


def render(result: dict) -> str:
    lines = ["# Two-hop probe: does restating the object let a fresh decoder find it?", "",
             f"`python experiments/two_hop_probe.py --checkpoint {result['checkpoint']} --layers {result['layers']} "
             f"--steps {result['steps']} --images {result['images']}` ({result['seconds']:.0f} s). A fresh "
             f"{result['layers']}-layer tiny decoder + linear head on the shipped base's frozen visual tokens, "
             f"`locate` only; held-out: {2 * result['val_images']} questions on {result['val_images']} images. "
             "`other` = wrong answers that name the other medium object's cell (chance for the cell: 11%).", "",
             "| step | " + " | ".join(f"{f} acc | {f} other" for f in result["forms"]) + " |",
             "|---:|" + "---:|---:|" * len(result["forms"])]
    steps = [h["step"] for h in result["forms"][next(iter(result["forms"]))]]
    for k, step in enumerate(steps):
        cells = [f"{100 * h[k]['acc']:.1f} | {100 * h[k]['other']:.1f}" for h in result["forms"].values()]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default="checkpoints/base")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--images", type=int, default=4000, help="scenes with two medium objects, val included")
    ap.add_argument("--val-images", type=int, default=500)
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--out", default=str(ROOT / "experiments/results/two_hop_probe"))
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    start = time.time()
    model, _ = load_exported_base(args.checkpoint)
    images, qas = locate_items(args.images, args.seed, model.vision.image_size)
    visual = visual_tokens(model, images)
    forms = {form: train_readout(visual, qas, form, args.layers, args.steps, args.val_images)
             for form in LOCATE_ANSWERS}
    result = {"checkpoint": args.checkpoint, "layers": args.layers, "steps": args.steps, "images": args.images,
              "val_images": args.val_images, "seed": args.seed, "seconds": time.time() - start, "forms": forms}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    out.with_suffix(".md").write_text(render(result))
    print(render(result))


if __name__ == "__main__":
    main()
