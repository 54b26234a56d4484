"""Dense per-token targets from a generated scene description, for pretraining the vision encoder.

A LLaVA-style LVLM starts from a vision encoder pretrained elsewhere (CLIP, SigLIP); its tokens
already say what is where. The embedded default has no such encoder to download, so the project
pretrains its own on the generator's scenes (src/lit/encoder_pretrain.py), supervised by these
maps: for every token of the encoder's h x w grid, which objects are in it (multi-hot). The large
and medium objects mark every token they cover (as a CLIP patch on part of an object says what
the object is); small objects and digits mark the token holding their centre, so that one
object marks one token (what counting needs), and digits are split by which half of the token's
cell their centre falls in, so that two digits in one cell keep their order (what reading needs).
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import torch

from src.data.generator import MEDIUM_COLORS, SHAPES, SMALL_COLORS, SMALL_SHAPES, box_center

DIGITS = tuple(str(d) for d in range(10))


def _channels() -> List[str]:
    names = [f"large/{s}" for s in SHAPES] + ["large/cover"]
    names += [f"medium/{c}" for c in MEDIUM_COLORS] + [f"medium/{s}" for s in SHAPES]
    names += [f"small/{c}_{s}" for c in SMALL_COLORS for s in SMALL_SHAPES]
    names += ["text/box"] + [f"digit_left/{d}" for d in DIGITS] + [f"digit_right/{d}" for d in DIGITS]
    return names


CHANNELS: Tuple[str, ...] = tuple(_channels())
INDEX: Dict[str, int] = {name: i for i, name in enumerate(CHANNELS)}
GROUPS: Tuple[str, ...] = tuple(dict.fromkeys(name.split("/")[0] for name in CHANNELS))
GROUP_CHANNELS: Dict[str, List[int]] = {g: [i for i, n in enumerate(CHANNELS) if n.split("/")[0] == g] for g in GROUPS}


def token_cell(x: float, y: float, stride: Tuple[float, float], grid: Tuple[int, int]) -> Tuple[int, int]:
    """The (row, col) of the token whose cell holds pixel (x, y)."""
    row = min(int(y // stride[0]), grid[0] - 1)
    col = min(int(x // stride[1]), grid[1] - 1)
    return row, col


def covered_cells(box, stride: Tuple[float, float]) -> Tuple[slice, slice]:
    """(row slice, column slice) of the tokens whose cell centre lies in `box` (x0, y0, x1, y1):
    rows r with box[1] <= (r + 0.5) * sy < box[3], likewise columns (empty when none does)."""
    r0, r1 = (max(0, math.ceil(box[k] / stride[0] - 0.5)) for k in (1, 3))
    c0, c1 = (max(0, math.ceil(box[k] / stride[1] - 0.5)) for k in (0, 2))
    return slice(r0, r1), slice(c0, c1)


def dense_targets(scene: dict, grid: Tuple[int, int], image_size: int) -> torch.Tensor:
    """scene (as `SceneGenerator.generate` returns it) -> multi-hot targets (len(CHANNELS), h, w).

    A token (r, c) covers pixels [r * sy, (r + 1) * sy) x [c * sx, (c + 1) * sx) with
    s = image_size / grid. The large and medium objects' channels (and `text/box`) mark every
    token whose cell centre lies inside the object's box, as a CLIP patch on part of an object
    says what the object is: with the large shape marked at its centre token only, a decoder that
    found the large object (its cover) still had to find that one token to tell the shape, and a
    base trained on it never did (it answered from presence alone). The small objects (6 px, can
    cover no cell centre) and the digits mark the token holding their centre."""
    h, w = grid
    if h < 1 or w < 1 or image_size < max(h, w):
        raise ValueError(f"grid {grid} does not fit an image of {image_size} px")
    stride = (image_size / h, image_size / w)
    out = torch.zeros(len(CHANNELS), h, w)

    def mark(name: str, box) -> None:
        out[(INDEX[name], *token_cell(*box_center(box), stride, grid))] = 1.0

    def cover(name: str, box) -> None:
        out[(INDEX[name], *covered_cells(box, stride))] = 1.0

    large = scene.get("large")
    if large is not None:
        cover(f"large/{large['shape']}", large["box"])
        cover("large/cover", large["box"])
    pair = scene.get("medium")
    if pair is not None:
        for obj in (pair["a"], pair["b"]):
            cover(f"medium/{obj['color']}", obj["box"])
            cover(f"medium/{obj['shape']}", obj["box"])
    for obj in scene.get("small", []):
        mark(f"small/{obj['color']}_{obj['shape']}", obj["box"])
    text_box = scene["text_box"]
    cover("text/box", text_box["box"])
    for ch, box in zip(text_box["text"], text_box["glyphs"]):
        x, y = box_center(box)
        r, c = token_cell(x, y, stride, grid)
        side = "left" if x - c * stride[1] < stride[1] / 2 else "right"
        out[INDEX[f"digit_{side}/{ch}"], r, c] = 1.0
    return out
