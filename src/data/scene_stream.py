"""Generated scenes streamed straight from the generator (no shards): the data of the vision
encoder's pretraining (src/lit/encoder_pretrain.py).

The generator makes an image in about 0.1 ms, so batches are drawn on the fly from its own seeds,
kept apart from the QA data's: the QA shards use seeds `data.seed` (train) and `data.seed +
1_000_000` (val) with indices below 1_000_003, so the default seeds 3 and 4 here never repeat one
of their images. Batches: {"images": (B, 3, S, S) floats in [0, 1], "scenes": list of B scene dicts}.
"""
from __future__ import annotations

from typing import Iterator, List

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from src.data.generator import GeneratorConfig, SceneGenerator


def image_tensor(image) -> torch.Tensor:
    """A PIL RGB image (H x W) -> (3, H, W) float32 in [0, 1], as the training shards decode one."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)


def collate_scenes(items: List[tuple]) -> dict:
    return {"images": torch.stack([i for i, _ in items]), "scenes": [s for _, s in items]}


class SceneStream(IterableDataset):
    """Endless stream of (image, scene) for indices start, start + step, ... of `seed` (each
    dataloader worker takes its own residue class, so workers never repeat each other)."""

    def __init__(self, seed: int, image_size: int, start: int = 0) -> None:
        self.seed, self.image_size, self.start = seed, image_size, start

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        gen = SceneGenerator(self.seed, GeneratorConfig(image_size=self.image_size))
        index = self.start + worker
        while True:
            image, scene, _ = gen.generate(index)
            yield image_tensor(image), scene
            index += n_workers


class SceneSet(Dataset):
    """A fixed set of `n` scenes of `seed` (validation)."""

    def __init__(self, seed: int, image_size: int, n: int) -> None:
        self.gen = SceneGenerator(seed, GeneratorConfig(image_size=image_size))
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple:
        image, scene, _ = self.gen.generate(index)
        return image_tensor(image), scene


class SceneStreamDataModule(L.LightningDataModule):
    """Train: an endless generated stream (the trainer's `max_steps` bounds it); val: `val_images`
    fixed scenes."""

    def __init__(self, seed: int = 3, val_seed: int = 4, image_size: int = 128, batch_size: int = 64,
                 val_images: int = 512, num_workers: int = 0) -> None:
        super().__init__()
        for name, value in dict(image_size=image_size, batch_size=batch_size, val_images=val_images).items():
            if value < 1:
                raise ValueError(f"data.{name} must be >= 1, got {value}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        if seed == val_seed:
            raise ValueError(f"data.seed and data.val_seed must differ (both {seed}): validation would repeat training")
        GeneratorConfig(image_size=image_size)  # validates the size
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        # A resumed run continues the stream where it stopped instead of replaying its first images.
        start = 0
        if self.trainer is not None:
            start = self.trainer.global_step * h.batch_size
        return DataLoader(SceneStream(h.seed, h.image_size, start), batch_size=h.batch_size,
                          num_workers=h.num_workers, collate_fn=collate_scenes)

    def val_dataloader(self) -> DataLoader:
        h = self.hparams
        return DataLoader(SceneSet(h.val_seed, h.image_size, h.val_images), batch_size=h.batch_size,
                          num_workers=h.num_workers, collate_fn=collate_scenes)
