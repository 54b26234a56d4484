"""Does a base LVLM find the medium object a question names? A probe of `spatial`'s failure.

The shipped base answers `spatial` ("where is the green circle relative to the purple square ?")
about half right, where chance is a quarter. This probe asks why, on freshly generated scenes (the
generator's own descriptions, so every label and every object's tokens are known):

- **answers**: greedy answers to `spatial` and to `locate` ("where is the green circle ?", the
  3 x 3 cell; a training-only question of the base's recipe). For `spatial`, whether the predicted
  relation is on the right axis (left/right vs above/below); for `locate`, how many wrong answers
  name the *other* medium object's cell.
- **colour in the tokens**: a linear probe for the medium object's colour (3 classes) from the
  projected visual token at the object's centre (the decoder's input), trained on half the
  objects and scored on the rest: is the colour there to be found?
- **attention**: for every layer and head, the attention mass of the last prompt token of
  `locate` on the asked object's tokens and on the other object's tokens (tokens whose cell
  centre lies in the object's box, as src/data/dense_targets.py marks them). A head that finds
  the named object puts more mass on the asked one; `selectivity` = (asked - other) / (asked + other).
  Each scene is asked about both objects, so a head whose attention ignores the question has
  selectivity exactly 0.

Only every-layer-`self` models (the base): the attention is recomputed from the decoder's own
projections over the [visual; text] sequence, and the recomputed final hidden states are checked
against the decoder's forward.

    python experiments/probes/binding_probe.py [--checkpoint checkpoints/base] [--images 200]

Writes experiments/results/binding_probe.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Iterator, List, Tuple

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from src.data.dense_targets import covered_cells, token_cell  # noqa: E402
from src.data.generator import MEDIUM_COLORS, GeneratorConfig, SceneGenerator, box_center, vocabulary  # noqa: E402
from src.data.scene_stream import image_tensor  # noqa: E402
from src.data.tokenizer import WordTokenizer  # noqa: E402
from src.lit.checkpoint_io import load_base_checkpoint  # noqa: E402
from src.models import VisionEncoder, VisorLVLM  # noqa: E402
from src.models.decoder import DecoderConfig  # noqa: E402
from src.models.plan import LayerPlan  # noqa: E402
from src.models.rope import apply_rope, rope_cos_sin  # noqa: E402

RELATION_AXIS = {"left": "horizontal", "right": "horizontal", "above": "vertical", "below": "vertical"}


def load_exported_base(path: str | Path) -> Tuple[VisorLVLM, dict]:
    """An exported checkpoint folder (model.safetensors + manifest.json) of an every-layer-`self`
    model -> (the model in eval mode, its manifest)."""
    path = Path(path)
    manifest = json.loads((path / "manifest.json").read_text())
    arch = manifest["architecture"]
    if any(kind != "self" for kind in arch["plan"]):
        raise ValueError(f"{path}: binding_probe needs an every-layer-`self` model, the plan is {arch['plan']}")
    vision_args = dict(arch["vision"])
    weights = vision_args.get("weights_path")
    if weights and not Path(weights).is_absolute():
        vision_args["weights_path"] = str(ROOT / weights)
    model = VisorLVLM(VisionEncoder(**vision_args), DecoderConfig(**arch["decoder"]),
                      LayerPlan(n_layers=len(arch["plan"]), all_self=True), pos_conv=arch.get("pos_conv", False))
    load_base_checkpoint(model, path)
    return model.eval(), manifest


def _stride(grid: Tuple[int, int], image_size: int) -> Tuple[float, float]:
    return image_size / grid[0], image_size / grid[1]


def medium_pair_scenes(gen: SceneGenerator, n: int) -> Iterator[Tuple[Image.Image, dict, List[dict]]]:
    """The generator's first `n` scenes that hold two medium objects, as `generate` returns them:
    (image, scene, qa)."""
    i = found = 0
    while found < n:
        image, scene, qa = gen.generate(i)
        i += 1
        if scene["medium"] is not None:
            found += 1
            yield image, scene, qa


def object_tokens(box, grid: Tuple[int, int], image_size: int) -> List[int]:
    """Token indices (raster order) whose cell centre lies in `box` (the encoder's `cover` targets);
    the centre's token when none does."""
    rows, cols = covered_cells(box, _stride(grid, image_size))
    inside = [r * grid[1] + c for r in range(grid[0])[rows] for c in range(grid[1])[cols]]
    return inside or [center_token(box, grid, image_size)]


def center_token(box, grid: Tuple[int, int], image_size: int) -> int:
    """The token (raster index) holding the centre of `box`."""
    r, c = token_cell(*box_center(box), _stride(grid, image_size), grid)
    return r * grid[1] + c


@torch.no_grad()
def last_token_attention(model: VisorLVLM, images: torch.Tensor, prompt_ids: torch.Tensor) -> torch.Tensor:
    """images (B, 3, H, W), prompt_ids (B, P) (equal-length prompts, no padding) -> attention
    probabilities of the last prompt token (n_layers, B, n_heads, V + P), recomputed layer by
    layer from the decoder's projections (RoPE positions 0..V+P-1, as the base runs)."""
    assert prompt_ids.dim() == 2 and prompt_ids.shape[0] == images.shape[0], (
        f"prompt_ids must be (B={images.shape[0]}, P), got {tuple(prompt_ids.shape)}")
    dec = model.decoder
    visual = model.encode_images(images).tokens  # (B, V, d)
    x = torch.cat([visual, dec.embed_tokens(prompt_ids)], dim=1)  # (B, S, d)
    B, S, _ = x.shape
    cos, sin = rope_cos_sin(torch.arange(S), dec.config.head_dim, dec.config.rope_theta, x.dtype)
    out = []
    reference = dec.forward_plain(x)
    for layer in dec.layers:
        a = layer.attn
        h = layer.input_norm(x)
        q = a.q_proj(h[:, -1:]).view(B, 1, a.n_heads, a.head_dim).transpose(1, 2)  # (B, H, 1, hd)
        k = a.k_proj(h).view(B, S, a.n_kv_heads, a.head_dim).transpose(1, 2)  # (B, Hkv, S, hd)
        q = apply_rope(q, cos[-1:], sin[-1:])
        k = apply_rope(k, cos, sin).repeat_interleave(a.n_heads // a.n_kv_heads, dim=1)  # (B, H, S, hd)
        logits = (q @ k.transpose(-1, -2)).squeeze(2) / math.sqrt(a.head_dim)  # (B, H, S)
        out.append(logits.softmax(-1))
        x = layer(x, cos, sin)
    torch.testing.assert_close(dec.norm(x), reference, rtol=1e-4, atol=1e-4)
    return torch.stack(out)  # (L, B, H, S)


def colour_probe(tokens: torch.Tensor, labels: torch.Tensor, steps: int = 300) -> float:
    """tokens (N, d), labels (N,) in 0..2 -> held-out accuracy of a linear probe (first half trains,
    features standardised with the training half's statistics)."""
    n = tokens.shape[0] // 2
    mu, sd = tokens[:n].mean(0), tokens[:n].std(0) + 1e-5
    x = (tokens - mu) / sd
    torch.manual_seed(0)
    probe = torch.nn.Linear(x.shape[1], len(MEDIUM_COLORS))
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        loss = F.cross_entropy(probe(x[:n]), labels[:n])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (probe(x[n:]).argmax(-1) == labels[n:]).float().mean().item()


def _generate(model: VisorLVLM, tok: WordTokenizer, images: torch.Tensor, questions: List[str]) -> List[str]:
    ids = torch.tensor([tok.prompt(q) for q in questions])  # equal lengths for one question form
    out = model.generate(images, ids, max_new_tokens=4, eos_id=tok.eos_id, pad_id=tok.pad_id)
    return [tok.decode(row[: int(n)].tolist()).strip() for row, n in zip(out.tokens, out.lengths)]


def probe(checkpoint: str, n_images: int, seed: int, batch: int = 25) -> dict:
    """-> the measurements the module docstring lists, on `n_images` scenes with two medium objects."""
    model, manifest = load_exported_base(checkpoint)
    data = manifest.get("data") or {}  # the base's data settings (an export without them: the defaults)
    if data.get("tokenizer_path"):
        raise ValueError(f"{checkpoint}: trained with tokenizer {data['tokenizer_path']}; the probe asks in the "
                         "generated data's word tokenizer")
    for field, plain in (("locate_answer", "cell"), ("spatial_answer", "relation")):
        if data.get(field, plain) != plain:
            raise ValueError(f"{checkpoint}: trained with data.{field}={data[field]!r}; the probe reads answers "
                             f"and attention at the prompt's last token (the `{plain}` form)")
    tok = WordTokenizer(vocabulary())  # what the generated data set writes beside its shards
    defaults = GeneratorConfig(image_size=model.vision.image_size)
    gen = SceneGenerator(seed, GeneratorConfig(image_size=data.get("image_size", defaults.image_size),
                                               text_len=data.get("text_len", defaults.text_len),
                                               large_question=data.get("large_question", defaults.large_question)),
                         aux_questions=True)  # + `locate`, asked about a then b
    grid, size = model.vision.grid, model.vision.image_size
    colours = list(MEDIUM_COLORS)
    stats = {"spatial": 0, "spatial_right": 0, "spatial_axis": 0, "locate": 0, "locate_right": 0,
             "locate_other": 0}
    mass = None  # (L, H, 2): asked, other
    tokens, labels = [], []
    scenes = []  # (image, the medium pair, {task: [(question, answer), ...]}) from the generator
    for image, scene, qa in medium_pair_scenes(gen, n_images):
        asked = {t: [(q["question"], q["answer"]) for q in qa if q["task"] == t] for t in ("spatial", "locate")}
        scenes.append((image_tensor(image), scene["medium"], asked))
    for start in tqdm(range(0, n_images, batch), desc="binding probe", unit="batch"):
        chunk = scenes[start:start + batch]
        images = torch.stack([img for img, _, _ in chunk])
        pairs = [p for _, p, _ in chunk]
        qas = [qa for _, _, qa in chunk]
        with torch.no_grad():
            visual = model.encode_images(images).tokens
        for j, p in enumerate(pairs):
            for obj in (p["a"], p["b"]):
                tokens.append(visual[j, center_token(obj["box"], grid, size)])
                labels.append(colours.index(obj["color"]))
        answers = _generate(model, tok, images, [qa["spatial"][0][0] for qa in qas])
        for qa, ans in zip(qas, answers):
            truth = qa["spatial"][0][1]
            stats["spatial"] += 1
            stats["spatial_right"] += ans == truth
            stats["spatial_axis"] += RELATION_AXIS.get(ans) == RELATION_AXIS[truth]
        for k, (asked, other) in enumerate((("a", "b"), ("b", "a"))):
            questions = [qa["locate"][k][0] for qa in qas]
            answers = _generate(model, tok, images, questions)
            for qa, ans in zip(qas, answers):
                cell, other_cell = qa["locate"][k][1], qa["locate"][1 - k][1]
                stats["locate"] += 1
                stats["locate_right"] += ans == cell
                stats["locate_other"] += ans != cell and ans == other_cell
            att = last_token_attention(model, images, torch.tensor([tok.prompt(q) for q in questions]))
            on = torch.stack([torch.stack([att[:, j, :, object_tokens(p[w]["box"], grid, size)].sum(-1)
                                           for w in (asked, other)], dim=-1) for j, p in enumerate(pairs)])
            mass = on.sum(0) if mass is None else mass + on.sum(0)  # (L, H, 2)
    mass = mass / stats["locate"]
    return {
        "checkpoint": checkpoint, "images": n_images, "seed": seed,
        "spatial_acc": stats["spatial_right"] / stats["spatial"],
        "spatial_axis_acc": stats["spatial_axis"] / stats["spatial"],
        "locate_acc": stats["locate_right"] / stats["locate"],
        "locate_wrong_is_other_cell": stats["locate_other"] / max(1, stats["locate"] - stats["locate_right"]),
        "colour_probe_acc": colour_probe(torch.stack(tokens), torch.tensor(labels)),
        "attention": [[{"asked": round(a, 4), "other": round(o, 4),
                        "selectivity": round((a - o) / max(a + o, 1e-9), 4)} for a, o in layer.tolist()]
                      for layer in mass],
    }


def write_report(result: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "binding_probe.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "# Binding probe: does the base find the medium object a question names?",
        "",
        f"`python experiments/probes/binding_probe.py --checkpoint {result['checkpoint']} --images {result['images']} "
        f"--seed {result['seed']}` (fresh scenes; see the script's docstring).",
        "",
        f"- `spatial` accuracy {100 * result['spatial_acc']:.1f} (chance 25), relation on the right axis "
        f"{100 * result['spatial_axis_acc']:.1f}",
        f"- `locate` accuracy {100 * result['locate_acc']:.1f}; wrong answers naming the other medium object's "
        f"cell: {100 * result['locate_wrong_is_other_cell']:.1f}%",
        f"- medium colour from the projected visual token (linear probe, held out): "
        f"{100 * result['colour_probe_acc']:.1f}",
        "",
        "Attention of the last prompt token of `locate` (mass on the asked object / on the other; "
        "selectivity = (asked - other) / (asked + other)):",
        "",
        "| layer | " + " | ".join(f"head {h}" for h in range(len(result["attention"][0]))) + " |",
        "|---|" + "---|" * len(result["attention"][0]),
    ]
    for i, layer in enumerate(result["attention"]):
        lines.append(f"| {i} | " + " | ".join(f"{h['asked']:.3f} / {h['other']:.3f} ({h['selectivity']:+.2f})"
                                             for h in layer) + " |")
    path = out_dir / "binding_probe.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="checkpoints/base")
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--seed", type=int, default=2_000_000, help="scene seed (not the data set's train/val seeds)")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    args = ap.parse_args(argv)
    if args.images < 2:
        ap.error("--images must be >= 2")
    result = probe(args.checkpoint, args.images, args.seed)
    print(write_report(result, Path(args.out)).read_text())
    return result


if __name__ == "__main__":
    main()
