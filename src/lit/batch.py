"""How both LightningModules run the LVLM on a batch (images, input_ids, labels)."""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch

from src.models.anyres import TiledImages
from src.models.lvlm import VisorLVLM


def image_sizes(batch: dict) -> List[Optional[Tuple[int, int]]]:
    """Each sample's original (height, width) when the images are AnyRes tiles (their token counts
    differ), else None per sample (one crop each): what `src.flops.sample_flops(image_hw=)` takes."""
    return sizes_of(batch["images"])


def sizes_of(images) -> List[Optional[Tuple[int, int]]]:
    """`image_sizes` of images (B, 3, S, S) or TiledImages themselves."""
    if isinstance(images, TiledImages):
        return [tuple(hw) for hw in images.sizes.tolist()]
    return [None] * images.shape[0]


def image_at(batch: dict) -> int:
    """Text tokens before the image in every sequence of the batch (`ChatTokenizer.image_at`, which
    `src.data.shards.collate` records; absent: 0, the image before all the text)."""
    return int(batch.get("image_at", 0))


def query_index(labels: torch.Tensor) -> torch.Tensor:
    """labels (B, T), -100 off the answers and already shifted (labels[t] is the target of position
    t) -> (B,) int64: the last prompt token, the position that predicts the first answer token
    (T-1 for a sample with no answer). With several turns in one sequence it is the first
    question's; fastv ranks the visual tokens by this token's attention."""
    assert labels.dim() == 2, f"labels must be (B, T), got {tuple(labels.shape)}"
    answer = labels != -100
    first = answer.to(torch.int8).argmax(dim=1)
    return torch.where(answer.any(dim=1), first, torch.full_like(first, labels.shape[1] - 1))


def answer_logits(lvlm: VisorLVLM, batch: dict, budget: Optional[Union[int, torch.Tensor]] = None) -> torch.Tensor:
    """-> logits (N, vocab) at the N answer positions (labels != -100, row-major) at `budget` (None:
    the largest; an index; (B,) indices): the LM head runs only where the loss and metrics read it."""
    labels = batch["labels"]
    return lvlm(batch["images"], batch["input_ids"], budget=budget, query_index=query_index(labels),
                logits_at=labels != -100, image_at=image_at(batch))
