"""Webdataset shards: writing the generated data set, and reading any shard set robustly.

A sample is `<key>.png` (or `.jpg`) + `<key>.json`; the JSON holds either one QA (`question`,
`answer`, `task`, `difficulty`) or a list of them under `qa` (several questions about one image;
`"ordered": true` marks the turns of one conversation, which multi-turn packing keeps in order).
Bad samples are skipped and counted by reason (or raise naming shard and key with
`strict=True`); a truncated or corrupt tar raises `ShardError` naming the shard.
"""
from __future__ import annotations

import io
import json
import logging
import os
import random
import re
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm

from src.data.generator import GeneratorConfig, SceneGenerator, vocabulary
from src.data.tokenizer import ChatTokenizer, ChatTurn, WordTokenizer
from src.models.anyres import AnyRes, TiledImages

QA_FIELDS = ("question", "answer", "task", "difficulty")
log = logging.getLogger(__name__)


class ShardError(RuntimeError):
    """A shard that cannot be read (truncated, corrupt)."""


class SampleError(ValueError):
    """A bad sample under strict=True; names shard and key."""


def write_generated_split(root: str | Path, split: str, n_images: int, seed: int, images_per_shard: int = 1000,
                          config: Optional[GeneratorConfig] = None, aux_questions: bool = False) -> List[str]:
    """Generate `n_images` scenes with `seed` into `root/split-%05d.tar` (with the generator's
    training-only questions when `aux_questions`). Returns the shard paths.

    Writes to a temporary name and renames, so an interrupted run never leaves a half shard."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    gen = SceneGenerator(seed, config, aux_questions=aux_questions)
    paths = []
    n_shards = (n_images + images_per_shard - 1) // images_per_shard
    with tqdm(total=n_images, desc=f"generating {split}", unit="img") as bar:
        for s in range(n_shards):
            path = root / f"{split}-{s:05d}.tar"
            paths.append(str(path))
            lo, hi = s * images_per_shard, min(n_images, (s + 1) * images_per_shard)
            if path.exists():
                bar.update(hi - lo)
                continue
            tmp = path.with_suffix(".tar.tmp")
            with wds.TarWriter(str(tmp)) as sink:
                for i in range(lo, hi):
                    image, scene, qa = gen.generate(i)
                    buf = io.BytesIO()
                    image.save(buf, format="PNG")
                    meta = {"qa": qa, "scene": scene, "seed": seed, "index": i}
                    sink.write({"__key__": f"{split}{i:07d}", "png": buf.getvalue(), "json": json.dumps(meta).encode()})
                    bar.update(1)
            os.replace(tmp, path)
    return paths


def _as_stored(value):
    """`value` as it reads back from meta.json (tuples become lists)."""
    return json.loads(json.dumps(value))


def ensure_default_dataset(root: str | Path, train_images: int, val_images: int, seed: int,
                           images_per_shard: int = 1000, train_aux_questions: bool = False,
                           config: Optional[GeneratorConfig] = None) -> None:
    """Generate the embedded default (train, val, tokenizer.json) where missing, with the
    generator's `config` (default: `GeneratorConfig()`); the train split also holds the generator's
    training-only questions when `train_aux_questions`.

    `root/meta.json` records how the shards were made; shards made with other settings are never
    reused silently (a changed seed or size is an error naming the fields)."""
    root = Path(root)
    config = config or GeneratorConfig()
    want = {"seed": seed, "train_images": train_images, "val_images": val_images,
            "images_per_shard": images_per_shard, "generator": asdict(config)}
    if train_aux_questions:  # recorded only when on: folders made before the option still match
        want["train_aux_questions"] = True
    want = _as_stored(want)  # compare as stored (tuples become lists)
    meta_path = root / "meta.json"
    if meta_path.exists():
        have = json.loads(meta_path.read_text())
        if "generator" in have:  # a generator field added since those shards were made had its default then
            have["generator"] = {**_as_stored(asdict(GeneratorConfig())), **have["generator"]}
        diff = {k: (have.get(k), want.get(k)) for k in {**have, **want} if have.get(k) != want.get(k)}
        if diff:
            raise ValueError(f"data.root={root} holds shards generated with other settings "
                             + ", ".join(f"data.{k}: on disk {a!r}, configured {b!r}" for k, (a, b) in diff.items())
                             + "; delete that folder or choose another data.root")
    elif any(root.glob("*.tar")):
        raise ValueError(f"data.root={root} holds shards but no meta.json saying how they were made; "
                         "delete that folder or choose another data.root")
    write_generated_split(root, "train", train_images, seed, images_per_shard, config, aux_questions=train_aux_questions)
    write_generated_split(root, "val", val_images, seed + 1_000_000, images_per_shard, config)
    WordTokenizer(vocabulary()).save(root / "tokenizer.json")
    meta_path.write_text(json.dumps(want, indent=1))


def _tar_error(exn: Exception) -> bool:
    """webdataset handler: a broken tar is fatal and names its shard."""
    if isinstance(exn, ShardError):
        raise exn
    text = " ".join(str(a) for a in exn.args)
    found = re.search(r"name='([^']+)'", text) or re.search(r"(\S+\.tar)\b", text)
    url = found.group(1) if found else "<unknown shard>"
    reason = str(exn.args[0]).split(" @ ")[0] if exn.args else type(exn).__name__
    raise ShardError(f"cannot read shard {url}: {type(exn).__name__}: {reason}") from exn


class QAExpander:
    """Decodes raw webdataset samples into (image, QA) samples; bad ones are skipped and counted.

    `turns=1` yields one sample per question (how validation scores). `turns=k>1` packs up to k
    questions about the same image into one multi-turn sequence, as LLaVA trains on
    conversations: `<bos> q1 <sep> a1 <eos> q2 <sep> a2 <eos> ...`, loss on every answer, turn
    order shuffled per image (seeded by its key) so each task also appears first, unless the
    sample is `ordered` (a conversation: its turns stay in order). The visual tokens are paid
    for once per k answers. The layout is the tokenizer's (`ChatTokenizer.build`): the above for
    our word tokenizer, its chat template for a Hugging Face one.

    `tasks` (None: all) keeps only the questions of those tasks (a training curriculum or a
    per-task probe); the others are left out by choice, not counted as bad.

    `anyres` (the model's AnyRes settings): images keep their stored size and become a base crop
    plus tiles (`image` (1 + tiles, 3, S, S), `image_hw` the original (H, W)); else each is resized
    to image_size x image_size.

    Each yielded sample carries `skipped`: the reasons counted since the previous yield, so
    counts travel with the batches across DataLoader workers and none are lost."""

    def __init__(self, tokenizer: ChatTokenizer, image_size: int, max_text_len: int,
                 overlength: str = "truncate", strict: bool = False, turns: int = 1,
                 tasks: Optional[List[str]] = None, anyres: Optional[AnyRes] = None) -> None:
        if overlength not in ("truncate", "skip"):
            raise ValueError(f"data.overlength must be 'truncate' or 'skip', got {overlength!r}")
        if max_text_len < 4:
            raise ValueError(f"data.max_text_len must be >= 4, got {max_text_len}")
        if turns < 1:
            raise ValueError(f"data.train_turns must be >= 1, got {turns}")
        if tasks is not None and not tasks:
            raise ValueError("data.train_tasks must name at least one task (or be null for all)")
        self.tasks = None if tasks is None else frozenset(tasks)
        self.tok, self.image_size, self.max_text_len = tokenizer, image_size, max_text_len
        self.overlength, self.strict, self.turns = overlength, strict, turns
        self.anyres = anyres

    def _bad(self, counts: Counter, reason: str, sample: dict) -> None:
        if self.strict:
            raise SampleError(f"{reason} in shard {sample.get('__url__')} key {sample.get('__key__')}")
        counts[reason] += 1

    def __call__(self, source: Iterator[dict]) -> Iterator[dict]:
        counts: Counter = Counter()
        for raw in source:
            try:
                meta = json.loads(raw["json"].decode("utf-8"))
            except KeyError:
                self._bad(counts, "missing_json", raw)
                continue
            except UnicodeDecodeError:
                self._bad(counts, "non_utf8", raw)
                continue
            except json.JSONDecodeError:
                self._bad(counts, "bad_json", raw)
                continue
            qas = meta.get("qa", [meta]) if isinstance(meta, dict) else None
            if not isinstance(qas, list):
                self._bad(counts, "bad_json", raw)
                continue
            image = self._decode_image(raw, counts)
            if image is None:
                continue
            hw = None
            if self.anyres is not None:  # the image at its own size -> its base crop and tiles
                hw = tuple(image.shape[1:])
                image = self.anyres.crops(image)  # (1 + tiles, 3, S, S) in [0, 1]
            if self.tasks is not None:
                # a malformed QA goes on to be counted as bad; a well-formed one of another task is left out
                qas = [qa for qa in qas if not isinstance(qa, dict) or not isinstance(qa.get("task"), str)
                       or qa["task"] in self.tasks]
                if not qas:
                    continue
            encoded = [e for e in (self._encode_qa(qa, raw, counts) for qa in qas) if e is not None]
            if self.turns > 1 and meta.get("ordered") is not True:
                random.Random(raw.get("__key__", "")).shuffle(encoded)
            for pack in self._packs(encoded):
                sample = self._sequence(pack, raw, counts)
                if sample is None:
                    continue
                sample["image"] = image
                if self.anyres is not None:
                    sample["image_hw"] = hw
                sample["skipped"] = dict(counts)
                counts.clear()
                yield sample
        if counts:  # nothing left to carry them: say so rather than lose them
            log.warning("bad samples after the last good one of this reader: %s", dict(counts))

    def _decode_image(self, raw: dict, counts: Counter) -> Optional[torch.Tensor]:
        data = raw.get("png", raw.get("jpg", raw.get("jpeg")))
        if data is None:
            self._bad(counts, "missing_image", raw)
            return None
        try:
            im = Image.open(io.BytesIO(data))
            im = im.convert("RGB")
        except Exception:  # PIL raises many types for corrupt data
            self._bad(counts, "bad_image", raw)
            return None
        if self.anyres is None and im.size != (self.image_size, self.image_size):
            im = im.resize((self.image_size, self.image_size), Image.BICUBIC)
        x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.size[1], im.size[0], 3)
        x = x.permute(2, 0, 1)  # (3, H, W) uint8
        return x if self.anyres is not None else x.float().div_(255.0)  # AnyRes tiles the uint8 image

    def _encode_qa(self, qa: dict, raw: dict, counts: Counter) -> Optional[Tuple[ChatTurn, dict]]:
        """-> (encoded turn, qa) or None for a bad QA (counted)."""
        if not isinstance(qa, dict) or any(not isinstance(qa.get(f), str) for f in QA_FIELDS):
            self._bad(counts, "missing_field", raw)
            return None
        if not qa["question"].strip():
            self._bad(counts, "empty_question", raw)
            return None
        return self.tok.chat_turn(qa["question"], qa["answer"]), qa

    def _length(self, turns: List[Tuple[ChatTurn, dict]]) -> int:
        """Input length of a packed sequence (for ours: <bos>, then q <sep> a <eos> per turn, less the last <eos>)."""
        return self.tok.sequence_length([t for t, _ in turns])

    def _packs(self, encoded: list) -> Iterator[list]:
        """Greedy packing: up to `turns` questions per sequence while it fits; nothing is dropped."""
        pack: list = []
        for turn in encoded:
            if pack and (len(pack) == self.turns or self._length(pack + [turn]) > self.max_text_len):
                yield pack
                pack = []
            pack.append(turn)
        if pack:
            yield pack

    def _sequence(self, turns: List[Tuple[ChatTurn, dict]], raw: dict, counts: Counter) -> Optional[dict]:
        """Build input_ids/labels (T,) (loss on answers and their end token only). Only a lone turn
        can be too long: its question's start is cut (`truncate`, its subject stays) or it is
        skipped (`skip`); both are counted."""
        turn, qa = turns[0]
        excess = self._length(turns) - self.max_text_len
        if excess > 0:
            if self.overlength == "skip" or excess > len(turn.question) - 1:
                self._bad(counts, "too_long", raw)
                return None
            counts["truncated"] += 1
            turns = [(turn.cut_question(excess), qa)]
        # a label is kept where the token it predicts is an answer token or an answer's end
        input_ids, labels = self.tok.build([t for t, _ in turns])  # (T,), (T,)
        first = turns[0][1]
        multi = len(turns) > 1
        return {"input_ids": input_ids, "labels": labels, "task": "multi" if multi else first["task"],
                "difficulty": "multi" if multi else first["difficulty"], "key": raw.get("__key__", "")}


def collate(samples: List[dict], pad_id: int, image_at: int = 0) -> Dict[str, object]:
    """Right-pad a list of QA samples into a batch; sums the skip counts. image_at: the tokenizer's
    ids before the image in every sequence (`ChatTokenizer.image_at`), carried as batch["image_at"]."""
    T = max(len(s["input_ids"]) for s in samples)
    B = len(samples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for i, s in enumerate(samples):
        input_ids[i, : len(s["input_ids"])] = s["input_ids"]
        labels[i, : len(s["labels"])] = s["labels"]
    skipped: Counter = Counter()
    for s in samples:
        skipped.update(s["skipped"])
    if "image_hw" in samples[0]:  # AnyRes: crops (B, N, 3, S, S) zero-padded, original sizes (B, 2)
        images = TiledImages.stack([s["image"] for s in samples], [s["image_hw"] for s in samples])
    else:
        images = torch.stack([s["image"] for s in samples])  # (B, 3, S, S)
    return {"images": images,
            "input_ids": input_ids, "labels": labels,  # (B, T)
            "task": [s["task"] for s in samples], "difficulty": [s["difficulty"] for s in samples],
            "key": [s["key"] for s in samples], "skipped": dict(skipped), "image_at": image_at}


SPLITS = ("shards", "samples")


def reader_index() -> Tuple[int, int]:
    """(this reader's index, the number of readers) over all ranks x DataLoader workers: rank-major,
    from torch.distributed (or RANK / WORLD_SIZE) and the worker info (webdataset's own reading)."""
    rank, world, worker, workers = wds.utils.pytorch_worker_info()
    return rank * workers + worker, world * workers


def every_nth_sample(src: Iterator[dict]) -> Iterator[dict]:
    """The samples of `src` at positions this reader owns (position mod readers): every sample to
    exactly one reader, however few shards there are."""
    index, readers = reader_index()
    for position, sample in enumerate(src):
        if position % readers == index:
            yield sample


def qa_dataset(urls: List[str], expander: QAExpander, shuffle: int = 0, seed: int = 0,
               split: str = "shards", workers: int = 1) -> wds.WebDataset:
    """Shard list -> iterable of QA samples, shared out among ranks and DataLoader workers.

    split: 'shards' (each reader reads its own shards; with fewer shards than readers some would read
    nothing, so it falls back to 'samples') or 'samples' (each reads every shard and keeps every
    n-th image: evaluation, where no image may be dropped or read twice). workers: the DataLoader's
    worker processes (0 or 1: one reader per rank).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    missing = [u for u in urls if not Path(u).exists()]
    if missing:
        raise FileNotFoundError(f"missing shards: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    _, world, _, _ = wds.utils.pytorch_worker_info()
    by_shards = split == "shards" and len(urls) >= world * max(1, workers)
    everything = lambda src: src  # noqa: E731  (each reader sees every shard; every_nth_sample splits)
    ds = wds.WebDataset(urls, shardshuffle=len(urls) if shuffle else False, seed=seed, handler=_tar_error,
                        nodesplitter=wds.split_by_node if by_shards else everything,
                        workersplitter=wds.split_by_worker if by_shards else everything, empty_check=False)
    if not by_shards:
        ds = ds.compose(every_nth_sample)
    ds = ds.compose(expander)
    if shuffle:
        ds = ds.shuffle(shuffle, initial=shuffle // 2, seed=seed)
    return ds
