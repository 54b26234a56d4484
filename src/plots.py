"""Charts for TensorBoard images and result PNGs (matplotlib, headless Agg backend).

`xy_chart` draws lines (an accuracy-vs-GFLOPs curve over budgets) and labelled single points (a
policy's operating point, token-reduction baselines).
"""
from __future__ import annotations

import io
from typing import Dict, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

Point = Tuple[float, float]


def xy_chart(lines: Dict[str, Sequence[Point]], points: Optional[Dict[str, Point]] = None, title: str = "",
             xlabel: str = "", ylabel: str = "", size: Tuple[float, float] = (7.2, 4.8)) -> Image.Image:
    """Lines (name -> points, drawn in x order with markers) and labelled points -> RGB image."""
    points = points or {}
    if not any(lines.values()) and not points:
        raise ValueError("xy_chart: nothing to draw")
    fig, ax = plt.subplots(figsize=size, dpi=100)
    k = 0
    for name, pts in lines.items():
        if not pts:
            continue
        pts = sorted(pts)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=name, color=f"C{k}")
        k += 1
    for name, (x, y) in points.items():
        ax.scatter([x], [y], marker="s", s=60, label=name, zorder=3, color=f"C{k}")
        k += 1
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _to_image(fig)


def _to_image(fig) -> Image.Image:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def to_tensorboard(img: Image.Image) -> np.ndarray:
    """HWC uint8 array for SummaryWriter.add_image(..., dataformats='HWC')."""
    return np.asarray(img.convert("RGB"))


def pareto_front(points: Sequence[Point]) -> list:
    """The points no other point beats on both axes (lower x = cheaper, higher y = better), in x order."""
    front, best = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def pareto_chart(points: Dict[str, Point], title: str = "", xlabel: str = "", ylabel: str = "",
                 size: Tuple[float, float] = (8.0, 5.2)) -> Image.Image:
    """Labelled points (name -> (cost, quality)) with their Pareto front drawn as a step line -> RGB image."""
    if not points:
        raise ValueError("pareto_chart: nothing to draw")
    fig, ax = plt.subplots(figsize=size, dpi=100)
    front = pareto_front(list(points.values()))
    on_front = set(front)
    for name, (x, y) in points.items():
        ax.scatter([x], [y], s=40, color="C3" if (x, y) in on_front else "C0", zorder=3)
        ax.annotate(name, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.step([x for x, _ in front], [y for _, y in front], where="post", color="C3", alpha=0.6, label="Pareto front")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _to_image(fig)
