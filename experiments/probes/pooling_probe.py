"""Does 2x2 pooling of the visual tokens destroy what reading needs? A probe without the LLM.

The foundation issue wants hard tasks that 2x2 pooling hurts clearly more than easy ones; on
base v3 (two-digit boxes), fine-tuning with pooled tokens costs `read` nothing
(experiments/results/base_v3/headline.md).
This probe asks where that comes from. For generated scenes it takes the 4 x 4 tokens (32 x 32 px)
of the corner that holds the text box, from one token source:

- `targets`: the dense per-token targets the encoder is pretrained on (src/data/dense_targets.py),
  i.e. an ideal encoder that says exactly what its pretraining asks, nothing more;
- `encoder`: the shipped encoder's features (checkpoints/encoder, what the base sees);
- `predictions`: what the shipped encoder predicts of the targets per token (sigmoid of a linear
  head fitted on its features to the dense targets of other scenes, as its pretraining head was:
  the export keeps the encoder, not that head), i.e. tokens that say what the pretraining asked
  and little more (the screen for an encoder whose tokens are its per-cell predictions),

either as they are (16 tokens) or 2 x 2 average pooled (4 tokens), and trains a small MLP to
read the two digits in order (input: the tokens and the corner). Accuracy (both digits right) on
held-out scenes, full against pooled, says how much of the digits' order survives pooling in each
source. A source whose pooled accuracy stays at its full accuracy packs sub-cell detail into its
channels, so token reduction by pooling cannot hurt a model reading it.

    python experiments/probes/pooling_probe.py [--train 4000] [--test 1000] [--sources targets,encoder,predictions]

Writes experiments/results/pooling_probe.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from experiments.tables.committed_rows import weights_fingerprint  # noqa: E402
from src.data.dense_targets import dense_targets  # noqa: E402
from src.data.generator import CORNERS, GeneratorConfig, SceneGenerator  # noqa: E402
from src.data.scene_stream import image_tensor  # noqa: E402

CROP = 4  # tokens per side of the corner crop (32 px at stride 8: the box is at most ~24 px)


def corner_crop(tokens: torch.Tensor, corner: str, crop: int = CROP) -> torch.Tensor:
    """tokens (C, h, w) -> the crop x crop tokens at `corner` (C, crop, crop)."""
    assert tokens.dim() == 3, f"tokens must be (C, h, w), got {tuple(tokens.shape)}"
    h, w = tokens.shape[1:]
    rows = slice(0, crop) if "top" in corner else slice(h - crop, h)
    cols = slice(0, crop) if "left" in corner else slice(w - crop, w)
    return tokens[:, rows, cols]


def probe_input(crop: torch.Tensor, corner: str, pool: bool) -> torch.Tensor:
    """crop (C, k, k) -> flat probe input: the (2x2-pooled when `pool`) tokens and a one-hot corner."""
    if pool:
        crop = F.avg_pool2d(crop.unsqueeze(0), 2).squeeze(0)
    onehot = torch.zeros(len(CORNERS))
    onehot[CORNERS.index(corner)] = 1.0
    return torch.cat([crop.flatten(), onehot])


def crop_size(scene_list: List[dict], stride: int, image_size: int) -> int:
    """The smallest even number of tokens per side whose corner crop holds every scene's text box
    (at least CROP; longer strings need more)."""
    def extent(scene: dict) -> int:
        box, corner = scene["text_box"]["box"], scene["text_box"]["corner"]
        width = box[2] if "left" in corner else image_size - box[0]
        height = box[3] if "top" in corner else image_size - box[1]
        return max(width, height)

    tokens = -(-max(extent(s) for s in scene_list) // stride)
    return max(CROP, tokens + tokens % 2)


def order_lost(scene: dict, grid: Tuple[int, int], image_size: int, crop: int = CROP) -> bool:
    """Whether the 2x2-pooled dense targets of the box corner are the same with the string reversed
    (for two digits: swapped, so no reader of the pooled targets can tell their order); False for a
    palindrome. Longer strings span several pooled cells, so reversing them rarely goes unseen."""
    text = scene["text_box"]["text"]
    if text == text[::-1]:
        return False
    swapped = dict(scene, text_box=dict(scene["text_box"], text=text[::-1]))
    corner = scene["text_box"]["corner"]
    a, b = (F.avg_pool2d(corner_crop(dense_targets(s, grid, image_size), corner, crop).unsqueeze(0), 2)
            for s in (scene, swapped))
    return torch.equal(a, b)


def scenes(seed: int, n: int, start: int = 0, text_len: int = 2):
    gen = SceneGenerator(seed=seed, config=GeneratorConfig(text_len=text_len))
    for i in range(start, start + n):
        image, scene, _ = gen.generate(i)
        yield image, scene


def token_maps(source: str, items: List[tuple], grid: Tuple[int, int], image_size: int,
               batch_size: int = 128, text_len: int = 2) -> List[torch.Tensor]:
    """One (C, h, w) token map per (image, scene) from `source` (one of SOURCES)."""
    if source == "targets":
        return [dense_targets(scene, grid, image_size) for _, scene in items]
    if source not in ("encoder", "predictions"):
        raise ValueError(f"--sources: unknown source {source!r} (known: {', '.join(SOURCES)})")
    encoder = shipped_encoder()
    maps = _encoder_maps(encoder, items, batch_size)
    if source == "encoder":
        return maps
    fit_items = list(scenes(seed=HEAD_SEED, n=HEAD_SCENES, text_len=text_len))
    head = fit_target_head(_encoder_maps(encoder, fit_items, batch_size),
                           [dense_targets(s, grid, image_size) for _, s in fit_items])
    with torch.no_grad():
        return [torch.sigmoid(torch.einsum("kc,chw->khw", head.weight, m) + head.bias.view(-1, 1, 1)) for m in maps]


SOURCES = ("targets", "encoder", "predictions")
HEAD_SEED, HEAD_SCENES = 12, 1000  # the scenes the `predictions` head is fitted on (not the probe's)


def _encoder_maps(encoder, items: List[tuple], batch_size: int) -> List[torch.Tensor]:
    """The encoder's features (before the position embedding) of each image, as (C, h, w) maps."""
    out = []
    with torch.no_grad():
        for k in range(0, len(items), batch_size):
            images = torch.stack([image_tensor(im) for im, _ in items[k:k + batch_size]])
            feats = encoder.features(images)  # (B, V, C)
            out += list(feats.transpose(1, 2).reshape(len(images), -1, *encoder.grid))
    return out


def fit_target_head(features: List[torch.Tensor], targets: List[torch.Tensor], steps: int = 300,
                    pos_weight: float = 4.0) -> nn.Linear:
    """A linear head C -> K per token, fitted with the encoder pretraining's loss (BCE with
    configs/encoder.yaml's pos_weight) on (C, h, w) feature maps against (K, h, w) target maps."""
    x = torch.stack(features).flatten(2).transpose(1, 2).flatten(0, 1)  # (N*V, C)
    y = torch.stack(targets).flatten(2).transpose(1, 2).flatten(0, 1)  # (N*V, K)
    torch.manual_seed(0)
    head = nn.Linear(x.shape[1], y.shape[1])
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    weight = torch.full((y.shape[1],), pos_weight)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(head(x), y, pos_weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head


def shipped_encoder():
    from src.models.vision import VisionEncoder
    manifest = json.loads((ROOT / "checkpoints" / "encoder" / "manifest.json").read_text())
    encoder = VisionEncoder(**manifest["vision"], weights_path=str(ROOT / "checkpoints" / "encoder"))
    return encoder.eval()


def train_probe(x: torch.Tensor, y: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                text_len: int, epochs: int = 60, hidden: int = 256, seed: int = 0) -> float:
    """MLP x (N, D) -> text_len digits (y: (N, text_len) in 0..9); exact-match accuracy on the test set."""
    torch.manual_seed(seed)
    mean, std = x.mean(0), x.std(0) + 1e-6
    x, x_test = (x - mean) / std, (x_test - mean) / std
    mlp = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                        nn.Linear(hidden, 10 * text_len))
    opt = torch.optim.AdamW(mlp.parameters(), lr=1e-3, weight_decay=1e-2)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(128):
            loss = F.cross_entropy(mlp(x[idx]).view(-1, 10), y[idx].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        pred = mlp(x_test).view(len(x_test), text_len, 10).argmax(-1)
    return (pred == y_test).all(1).float().mean().item()


def run(sources: List[str], n_train: int, n_test: int, seed: int = 11, text_len: int = 2) -> Dict[str, dict]:
    from tqdm import tqdm
    image_size = SceneGenerator().config.image_size
    grid = (image_size // 8, image_size // 8)  # the shipped encoder's stride-8 grid
    items = list(tqdm(scenes(seed, n_train + n_test, text_len=text_len), total=n_train + n_test, desc="scenes",
                      unit="img"))
    labels = torch.tensor([[int(ch) for ch in s["text_box"]["text"]] for _, s in items])
    corners = [s["text_box"]["corner"] for _, s in items]
    crop = crop_size([s for _, s in items], image_size // grid[0], image_size)
    results = {"order_lost_by_pooling_targets":
               sum(order_lost(s, grid, image_size, crop) for _, s in items) / len(items), "crop": crop}
    for source in sources:
        maps = token_maps(source, items, grid, image_size, text_len=text_len)
        assert maps[0].shape[1:] == grid, f"{source}: token grid {tuple(maps[0].shape[1:])}, expected {grid}"
        row = {"channels": maps[0].shape[0]}
        for pool in (False, True):
            x = torch.stack([probe_input(corner_crop(m, c, crop), c, pool) for m, c in zip(maps, corners)])
            acc = train_probe(x[:n_train], labels[:n_train], x[n_train:], labels[n_train:], labels.shape[1])
            row["pooled" if pool else "full"] = acc
            print(f"{source:8s} {'pooled 2x2' if pool else 'full':10s} read accuracy {100 * acc:.1f}%", flush=True)
        results[source] = row
    return results


def write(results: Dict[str, dict], n_train: int, n_test: int, out_dir: Path, text_len: int = 2) -> str:
    """Writes pooling_probe.{md,json} (pooling_probe_text<N>.* for other string lengths); sources of
    the existing JSON not measured now are kept when they were measured with the same scene counts
    and the same shipped encoder."""
    encoder = weights_fingerprint(ROOT / "checkpoints" / "encoder" / "model.safetensors")
    name = "pooling_probe" if text_len == 2 else f"pooling_probe_text{text_len}"
    previous = out_dir / f"{name}.json"
    if previous.exists():
        old = json.loads(previous.read_text())
        if (old.get("n_train"), old.get("n_test"), old.get("encoder_weights")) == (n_train, n_test, encoder):
            results = {**{k: v for k, v in old.items() if isinstance(v, dict)}, **results}
    crop = results["crop"]
    lines = [f"Probe: an MLP reads the box's {text_len} digits (in order) from the {crop}x{crop} corner tokens, "
             f"as they are "
             f"or 2x2 average pooled ({n_train} training scenes, {n_test} held out; exact match, %). "
             f"The 2x2-pooled dense targets cannot tell the string from its reverse in "
             f"{100 * results['order_lost_by_pooling_targets']:.1f}% of scenes.", "",
             "| source | channels | full | 2x2 pooled | lost to pooling |", "|---|---|---|---|---|"]
    for source, row in results.items():
        if isinstance(row, dict):
            lines.append(f"| {source} | {row['channels']} | {100 * row['full']:.1f} | {100 * row['pooled']:.1f} | "
                         f"{100 * (row['full'] - row['pooled']):.1f} |")
    text = "\n".join(lines) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.md").write_text(text)
    (out_dir / f"{name}.json").write_text(
        json.dumps(dict(results, n_train=n_train, n_test=n_test, encoder_weights=encoder), indent=1))
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=4000, help="training scenes")
    ap.add_argument("--test", type=int, default=1000, help="held-out scenes")
    ap.add_argument("--sources", default=",".join(SOURCES), help=f"comma-separated: {', '.join(SOURCES)}")
    ap.add_argument("--text-len", type=int, default=2, help="digits in the box (generator.text_len, 1-6)")
    args = ap.parse_args()
    if args.train < 1 or args.test < 1:
        sys.exit("--train and --test must be >= 1")
    try:
        GeneratorConfig(text_len=args.text_len)  # the generator's own check
    except ValueError as e:
        sys.exit(f"--text-len: {e}")
    results = run([s for s in args.sources.split(",") if s], args.train, args.test, text_len=args.text_len)
    print(write(results, args.train, args.test, ROOT / "experiments" / "results", args.text_len))


if __name__ == "__main__":
    main()
