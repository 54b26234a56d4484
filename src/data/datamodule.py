"""LightningDataModule for webdataset QA shards; generates the embedded default on first use."""
from __future__ import annotations

import functools
import glob
import os
from pathlib import Path
from typing import List, Optional

import lightning as L
from torch.utils.data import DataLoader

from src.data.generator import GeneratorConfig
from src.data.shards import QAExpander, collate, ensure_default_dataset, qa_dataset
from src.data.tokenizer import ChatTokenizer, WordTokenizer, load_tokenizer
from src.data.tokenizer import chat_template as resolve_chat_template
from src.models.anyres import AnyRes


class VQADataModule(L.LightningDataModule):
    """Shards `root/train-*.tar`, `root/val-*.tar` and `root/tokenizer.json`.

    With `generate: true` (the embedded default) missing shards are generated from `seed`.
    `shuffle_seed` orders the training stream (shard order and shuffle buffer); None (the default)
    takes the run's seed (`seed_everything`, which Lightning exports as PL_GLOBAL_SEED), or `seed`
    when the run sets none. So a run's seed changes what it trains on in which order, while the
    data set itself stays the one `seed` made.
    `train_turns` > 1 packs that many questions about one image into each training sequence
    (multi-turn, as LLaVA); validation is always one question per sequence. `train_tasks` (default
    all) trains on those tasks' questions only; validation still scores every task.
    `train_aux_questions` adds the generator's training-only questions (`AUX_TASKS`: the large
    object's shape, a medium object's 3 x 3 cell, the box's digits sorted) to the generated train
    split (the base's recipe).
    `text_len`: how many digits the generated `read` box holds (1-6; the generator's `text_len`).
    Longer strings put more digits in each 2x2-pooled cell, so pooling costs `read` more
    (experiments/results/pooling_probe_text*.md). `large_question`: what the generated `large`
    question asks, `presence` ("is there a large circle ?") or `shape` ("what shape is the large
    object ?"); see src/data/generator.py. `locate_answer`: what the training-only `locate` answer
    says, `cell` ("top left") or `object_cell` ("green circle top left"); `spatial_answer`: what the
    evaluated `spatial` answer says, `relation` ("left") or `object_relation` ("green circle left");
    `count_answer`: what the evaluated `count` answer says, `count` ("2") or `kind_count` ("red
    circles 2"); see src/data/generator.py.
    `tokenizer_path` (default `root/tokenizer.json`): our word tokenizer file or a Hugging Face
    tokenizer.json (or its folder), laid out in `chat_template` (a name in
    `src.data.tokenizer.CHAT_TEMPLATES`; Hugging Face tokenizers only).
    `predict_shards`: what `predict` reads, a folder of `*.tar` shards or a glob (default: the val
    split), one question per sequence as validation.
    `render_size`: the side the generator draws its images at (default 128); `anyres`: images go
    in at their stored size as LLaVA-OneVision's AnyRes tiles (`TiledImages`: a base crop and the
    tiles of the best grid, 2-7 thousand visual tokens per image at render_size 768-1536 with
    384 px crops), by the model's own AnyRes settings (`model.lvlm.init_args.anyres`).
    Images come out as floats in [0, 1], (B, 3, image_size, image_size), or TiledImages."""

    def __init__(
        self,
        root: str = "data/default",
        generate: bool = True,
        train_images: int = 20000,
        val_images: int = 500,
        images_per_shard: int = 1000,
        seed: int = 0,
        shuffle_seed: Optional[int] = None,
        image_size: int = 128,
        batch_size: int = 32,
        val_batch_size: int = 64,
        num_workers: int = 1,
        max_text_len: int = 24,
        overlength: str = "truncate",
        strict: bool = False,
        shuffle_buffer: int = 2000,
        train_turns: int = 1,
        train_tasks: Optional[List[str]] = None,
        train_aux_questions: bool = False,
        text_len: int = 2,
        large_question: str = "presence",
        locate_answer: str = "cell",
        spatial_answer: str = "relation",
        count_answer: str = "count",
        tokenizer_path: Optional[str] = None,
        chat_template: str = "chatml",
        predict_shards: Optional[str] = None,
        render_size: Optional[int] = None,
        anyres: bool = False,
    ) -> None:
        super().__init__()
        positive = dict(train_images=train_images, val_images=val_images, images_per_shard=images_per_shard,
                        image_size=image_size, batch_size=batch_size, val_batch_size=val_batch_size)
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"data.{name} must be >= 1, got {value}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        try:  # the generator checks its own fields; ours carry the same names under data.
            rendering = {} if render_size is None else {"image_size": render_size}
            self.generator_config = GeneratorConfig(text_len=text_len, large_question=large_question,
                                                    locate_answer=locate_answer, spatial_answer=spatial_answer,
                                                    count_answer=count_answer, **rendering)
        except ValueError as e:
            raise ValueError(str(e).replace("generator.image_size", "data.render_size", 1)
                             .replace("generator.", "data.", 1)) from None
        if shuffle_seed is not None and shuffle_seed < 0:
            raise ValueError(f"data.shuffle_seed must be >= 0 or null, got {shuffle_seed}")
        if shuffle_buffer < 0:
            raise ValueError(f"data.shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if tokenizer_path is not None and not Path(tokenizer_path).exists():
            raise FileNotFoundError(f"data.tokenizer_path={tokenizer_path} does not exist")
        resolve_chat_template(chat_template, field="data.chat_template")  # validates the name
        self.save_hyperparameters()
        self.root = Path(root)
        QAExpander(WordTokenizer([]), image_size, max_text_len, overlength, strict, train_turns,
                   train_tasks)  # validates
        self.tokenizer: Optional[ChatTokenizer] = None

    def prepare_data(self) -> None:
        h = self.hparams
        if h.generate:
            ensure_default_dataset(self.root, h.train_images, h.val_images, h.seed, h.images_per_shard,
                                   h.train_aux_questions, self.generator_config)
        elif h.tokenizer_path is None and not (self.root / "tokenizer.json").exists():
            raise FileNotFoundError(f"data.root={self.root} has no tokenizer.json (and data.generate is false)")

    def setup(self, stage: Optional[str] = None) -> None:
        h = self.hparams
        path = h.tokenizer_path if h.tokenizer_path is not None else self.root / "tokenizer.json"
        self.tokenizer = load_tokenizer(path, chat_template=h.chat_template)
        anyres = self._model_anyres() if h.anyres else None
        self.expanders = {split: QAExpander(self.tokenizer, h.image_size, h.max_text_len, h.overlength, h.strict,
                                            turns=h.train_turns if split == "train" else 1,
                                            tasks=h.train_tasks if split == "train" else None, anyres=anyres)
                          for split in ("train", "val")}

    def _model_anyres(self) -> AnyRes:
        """The AnyRes settings of the model being trained: one statement of them, the model's."""
        module = getattr(self.trainer, "lightning_module", None) if self.trainer is not None else None
        anyres = getattr(getattr(module, "lvlm", None), "anyres", None)
        if anyres is None:
            raise ValueError("data.anyres=true needs a model built with AnyRes settings "
                             "(model.lvlm.init_args.anyres, e.g. {tile: 384, patch: 14, max_tiles: 9})")
        return anyres

    def shards(self, split: str) -> List[str]:
        urls = sorted(glob.glob(str(self.root / f"{split}-*.tar")))
        if not urls:
            raise FileNotFoundError(f"no {split} shards under data.root={self.root}")
        return urls

    def training_order_seed(self) -> int:
        """The seed of the training stream's order: `shuffle_seed`, else the run's, else `seed`."""
        h = self.hparams
        if h.shuffle_seed is not None:
            return h.shuffle_seed
        run_seed = os.environ.get("PL_GLOBAL_SEED")
        return int(run_seed) if run_seed is not None else h.seed

    def _loader(self, split: str, batch_size: int, shuffle: int) -> DataLoader:
        # training: each rank / worker its own shards; evaluation: every image exactly once across them
        ds = qa_dataset(self.shards(split), self.expanders[split], shuffle=shuffle, seed=self.training_order_seed(),
                        split="shards" if split == "train" else "samples", workers=self.hparams.num_workers)
        return self._batches(ds, batch_size)

    def _batches(self, ds, batch_size: int) -> DataLoader:
        """Batches of `ds` padded by `collate`, which records where the tokenizer puts the image."""
        assert self.tokenizer is not None, "call setup() first"
        return DataLoader(ds, batch_size=batch_size, num_workers=self.hparams.num_workers,
                          collate_fn=functools.partial(collate, pad_id=self.tokenizer.pad_id,
                                                       image_at=self.tokenizer.image_at),
                          persistent_workers=self.hparams.num_workers > 0)

    def train_dataloader(self):
        """The training stream; on a resume mid-epoch, from the batch after the last one trained (the
        stream's order is a function of the seed alone, the same every epoch)."""
        loader = self._loader("train", self.hparams.batch_size, self.hparams.shuffle_buffer)
        done = self._batches_trained_this_epoch()
        return SkipFirstBatches(loader, done) if done else loader

    def _batches_trained_this_epoch(self) -> int:
        """On a fit restored from a checkpoint: the batches of its epoch already trained, else 0."""
        fit_loop = getattr(self.trainer, "fit_loop", None) if self.trainer is not None else None
        if fit_loop is None or not fit_loop.restarting:
            return 0
        # `processed`: the batches whose step ran (a checkpoint saved at a step's end counts it as
        # processed before it is `completed`)
        return int(fit_loop.epoch_loop.batch_progress.current.processed)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.hparams.val_batch_size, 0)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """`predict_shards` (a folder of .tar shards or a glob), else the val split; in order, one
        question per sequence."""
        h = self.hparams
        if h.predict_shards is None:
            return self._loader("val", h.val_batch_size, 0)
        assert self.tokenizer is not None, "call setup() first"
        where = Path(h.predict_shards)
        urls = sorted(glob.glob(str(where / "*.tar") if where.is_dir() else h.predict_shards))
        if not urls:
            raise FileNotFoundError(f"data.predict_shards={h.predict_shards} names no .tar shards "
                                    "(give a folder of shards or a glob such as 'dir/test-*.tar')")
        return self._batches(qa_dataset(urls, self.expanders["val"], shuffle=0, seed=h.seed, split="samples",
                                        workers=h.num_workers), h.val_batch_size)


class SkipFirstBatches:
    """`loader` whose first pass leaves out its first `n` batches (read and dropped: the stream has no
    index to seek by); later passes (epochs) are whole."""

    def __init__(self, loader: DataLoader, n: int) -> None:
        self.loader, self.n = loader, n

    def __iter__(self):
        batches, skip = iter(self.loader), self.n
        self.n = 0
        for _ in range(skip):
            if next(batches, None) is None:
                return
        yield from batches
