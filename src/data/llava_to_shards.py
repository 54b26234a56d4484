"""Convert LLaVA-format instruction data into our webdataset shards.

    python -m src.data.llava_to_shards --json llava_v1_5_mix665k.json --image-root data/llava/images \\
        --out data/llava [--images-per-shard 1000] [--task llava] [--difficulty easy] [--split train]
        [--workers 8] [--max-shards N] [--max-pixels 50000000]

Input: a JSON list of entries `{"id", "image": path relative to --image-root, "conversations":
[{"from": "human", "value": "<image>\\nQuestion"}, {"from": "gpt", "value": "Answer"}, ...]}`.
Output: `<out>/<split>-%05d.tar` in the format `src.data.shards` reads: per entry one sample,
`<key>.jpg` or `<key>.png` (JPEG and PNG bytes are kept as they are, other formats become PNG) and `<key>.json`
= `{"qa": [{"question", "answer", "task", "difficulty"}, ...], "ordered": true, "id", "image",
"index"}`, one QA per human/gpt pair in conversation order (`ordered`: multi-turn packing keeps
that order), the `<image>` placeholder removed from the questions. Keys are `<split>` + the
entry's index in the JSON list (zero-padded), so the output order is the input order.

Skipped entries are counted by reason (SKIP_REASONS) and summed up at the end; an entry's image
path may not leave --image-root, and an image larger than --max-pixels is refused before decoding. A conversation
with one malformed turn is skipped whole: dropping a turn would break the turns that refer to it.

Resuming: each shard is written to `<name>.tmp` and renamed when complete, then recorded in
`<out>/<split>.manifest.json` with the range of entries it consumed, its sample and skip counts
and its size. A rerun with the same settings keeps the recorded shards, continues after the
last one, and produces the same files as an uninterrupted run (tar member times are fixed).
Other settings over an existing manifest are an error naming the option.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import re
import sys
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TAR_MTIME = 0  # fixed member times: identical bytes on every run
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
SKIP_REASONS = {
    "bad_entry": "not an object with an `image` string and a `conversations` list",
    "no_image": "no `image` field (text-only entry)",
    "multi_image": "a list of images (one image per sample here)",
    "empty_conversation": "no turns",
    "bad_turn": "a turn that is not {from: human|gpt, value: string}",
    "no_question": "a gpt turn without a human turn before it",
    "no_answer": "a human turn without a gpt turn after it",
    "empty_question": "a question that is empty once `<image>` is removed",
    "empty_answer": "an empty answer",
    "missing_image": "the image file does not exist or cannot be read",
    "bad_image": "the image file does not decode",
    "image_outside_root": "an `image` path that leaves --image-root (absolute, `..`, a symlink out)",
    "image_too_large": "more pixels than --max-pixels, by its header (a decompression bomb is refused undecoded)",
}
OPTIONS = {"json_sha256": "--json (sha256 of its content)", "image_root": "--image-root",
           "images_per_shard": "--images-per-shard", "task": "--task", "difficulty": "--difficulty",
           "max_pixels": "--max-pixels"}
MAX_PIXELS = 50_000_000  # LLaVA-OneVision's largest AnyRes grid (2304 x 2304) is 5.3 M
_IMAGE_TAG = re.compile(r"\s*<image>\s*")


def strip_image_tag(text: str) -> str:
    """Remove LLaVA's `<image>` placeholder (and the whitespace around it) from a question."""
    return _IMAGE_TAG.sub(" ", text).strip()


def conversation_pairs(conversation: object) -> Tuple[List[Tuple[str, str]], Optional[str]]:
    """LLaVA `conversations` -> ([(question, answer), ...], None), or ([], skip reason)."""
    if not isinstance(conversation, list) or not conversation:
        return [], "empty_conversation"
    pairs: List[Tuple[str, str]] = []
    question: Optional[str] = None
    for turn in conversation:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in ROLES:
            return [], "bad_turn"
        if ROLES[turn["from"]] == "user":
            if question is not None:
                return [], "no_answer"
            question = strip_image_tag(turn["value"])
            if not question:
                return [], "empty_question"
        else:
            if question is None:
                return [], "no_question"
            answer = turn["value"].strip()
            if not answer:
                return [], "empty_answer"
            pairs.append((question, answer))
            question = None
    if question is not None:
        return [], "no_answer"
    return pairs, None


def image_path(image_root: Path, image: str) -> Optional[Path]:
    """The file an entry's `image` names under image_root, or None when it would leave the root
    (an absolute path, `..`, a symlink pointing out): the JSON is data, not a list of files to read."""
    root = image_root.resolve()
    if Path(image).is_absolute():
        return None
    path = (root / image).resolve()  # follows symlinks
    return path if path.is_relative_to(root) else None


def read_image(path: Path, max_pixels: int = MAX_PIXELS) -> Tuple[Optional[Tuple[str, bytes]], Optional[str]]:
    """-> ((extension, bytes), None) for an image that fully decodes, else (None, skip reason).
    JPEG and PNG keep their bytes; other formats are re-encoded as PNG. The size in the header is
    checked before decoding: an image of more than `max_pixels` is refused undecoded."""
    try:
        data = path.read_bytes()
    except OSError:
        return None, "missing_image"
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.width * im.height > max_pixels:
                return None, "image_too_large"
            im.load()  # decode everything: a truncated file fails here, not in training
            if im.format in ("JPEG", "PNG"):
                return ("jpg" if im.format == "JPEG" else "png", data), None
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="PNG")
            return ("png", buf.getvalue()), None
    except Image.DecompressionBombError:  # PIL's own limit, should it be below max_pixels
        return None, "image_too_large"
    except Exception:  # PIL raises many types for corrupt data
        return None, "bad_image"


def prepare_entry(index: int, entry: object, image_root: Path, task: str, difficulty: str,
                  split: str, max_pixels: int = MAX_PIXELS) -> Tuple[Optional[dict], Optional[str]]:
    """One LLaVA entry -> (webdataset sample, None) or (None, skip reason)."""
    if not isinstance(entry, dict):
        return None, "bad_entry"
    image = entry.get("image")
    if image is None:
        return None, "no_image"
    if isinstance(image, list):
        return None, "multi_image"
    if not isinstance(image, str) or not image:
        return None, "bad_entry"
    pairs, reason = conversation_pairs(entry.get("conversations"))
    if reason is not None:
        return None, reason
    path = image_path(image_root, image)
    if path is None:
        return None, "image_outside_root"
    encoded, reason = read_image(path, max_pixels)
    if encoded is None:
        return None, reason
    ext, data = encoded
    meta = {"qa": [{"question": q, "answer": a, "task": task, "difficulty": difficulty} for q, a in pairs],
            "ordered": True, "id": str(entry.get("id", "")), "image": image, "index": index}
    return {"__key__": f"{split}{index:09d}", ext: data, "json": json.dumps(meta).encode("utf-8")}, None


def _prepared(entries: Sequence[object], start: int, workers: int,
              **kw) -> Iterator[Tuple[int, Optional[dict], Optional[str]]]:
    """(index, sample, reason) for entries[start:], in order; `workers` threads read images ahead."""
    if workers <= 0:
        for i in range(start, len(entries)):
            yield (i, *prepare_entry(i, entries[i], **kw))
        return
    indices = iter(range(start, len(entries)))
    with ThreadPoolExecutor(workers) as pool:
        window: deque = deque()
        for i in indices:
            window.append((i, pool.submit(prepare_entry, i, entries[i], **kw)))
            if len(window) >= 4 * workers:
                break
        while window:
            i, future = window.popleft()
            nxt = next(indices, None)
            if nxt is not None:
                window.append((nxt, pool.submit(prepare_entry, nxt, entries[nxt], **kw)))
            yield (i, *future.result())


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _load_manifest(path: Path, out: Path, split: str, settings: dict) -> dict:
    """The manifest to continue from (a new one if none); shards missing on disk or of another size
    are dropped from the record with every shard after them (they are written again)."""
    if not path.exists():
        if any(out.glob(f"{split}-*.tar")):
            raise ValueError(f"--out {out} holds {split} shards but no {path.name} saying how they were made; "
                             "delete them or choose another --out")
        return {"format": FORMAT_VERSION, "settings": settings, "shards": [], "tail": None, "complete": False}
    manifest = json.loads(path.read_text())
    have = manifest.get("settings", {})
    diff = [f"{OPTIONS[k]}: on disk {have.get(k)!r}, given {v!r}" for k, v in settings.items() if have.get(k) != v]
    if manifest.get("format") != FORMAT_VERSION:
        diff.append(f"manifest format: on disk {manifest.get('format')!r}, this converter writes {FORMAT_VERSION}")
    if diff:
        raise ValueError(f"--out {out} holds a conversion made with other settings (" + "; ".join(diff)
                         + "); delete that folder or choose another --out")
    for n, shard in enumerate(manifest["shards"]):
        file = out / shard["name"]
        if not file.exists() or file.stat().st_size != shard["bytes"]:
            log.warning("%s is missing or differs from %s: rewriting from it on", file, path.name)
            manifest["shards"] = manifest["shards"][:n]
            manifest["tail"], manifest["complete"] = None, False
            break
    return manifest


def summarize(manifest: dict, n_entries: int) -> dict:
    """Totals over the whole conversion so far (all runs)."""
    skipped: Counter = Counter()
    for record in manifest["shards"] + ([manifest["tail"]] if manifest["tail"] else []):
        skipped.update(record["skipped"])
    shards = manifest["shards"]
    done = (manifest["tail"] or (shards[-1] if shards else {"entries": [0, 0]}))["entries"][1]
    return {"entries": n_entries, "done": done, "complete": manifest["complete"], "shards": len(shards),
            "samples": sum(s["samples"] for s in shards), "qa": sum(s["qa"] for s in shards),
            "skipped": dict(sorted(skipped.items()))}


def convert(json_path: str | Path, image_root: str | Path, out: str | Path, images_per_shard: int = 1000,
            task: str = "llava", difficulty: str = "easy", split: str = "train", workers: int = 0,
            max_shards: Optional[int] = None, progress: bool = True, max_pixels: int = MAX_PIXELS) -> dict:
    """Convert (or continue converting) `json_path` into `out/<split>-%05d.tar`; returns the summary
    (`summarize`). `max_shards` stops after writing that many shards in this call (the rest
    follows on a rerun)."""
    if images_per_shard < 1:
        raise ValueError(f"--images-per-shard must be >= 1, got {images_per_shard}")
    if difficulty not in ("easy", "hard"):
        raise ValueError(f"--difficulty must be 'easy' or 'hard', got {difficulty!r}")
    if not task or task.split() != [task]:
        raise ValueError(f"--task must be one word, got {task!r}")
    if not re.fullmatch(r"[A-Za-z0-9_]+", split):
        raise ValueError(f"--split must be letters, digits or _, got {split!r}")
    if workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")
    if max_shards is not None and max_shards < 1:
        raise ValueError(f"--max-shards must be >= 1, got {max_shards}")
    if max_pixels < 1:
        raise ValueError(f"--max-pixels must be >= 1, got {max_pixels}")
    json_path, image_root, out = Path(json_path), Path(image_root), Path(out)
    if not json_path.is_file():
        raise FileNotFoundError(f"--json {json_path} does not exist")
    if not image_root.is_dir():
        raise FileNotFoundError(f"--image-root {image_root} is not a folder")
    raw = json_path.read_bytes()
    entries = json.loads(raw)
    if not isinstance(entries, list):
        raise ValueError(f"--json {json_path} holds a {type(entries).__name__}, not a list of entries")
    settings = {"json_sha256": hashlib.sha256(raw).hexdigest(), "image_root": str(image_root.resolve()),
                "images_per_shard": images_per_shard, "task": task, "difficulty": difficulty,
                "max_pixels": max_pixels}
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / f"{split}.manifest.json"
    manifest = _load_manifest(manifest_path, out, split, settings)
    if manifest["complete"]:
        return summarize(manifest, len(entries))
    _write_json(manifest_path, manifest)  # from now on, shards under `out` are accounted for

    start = manifest["shards"][-1]["entries"][1] if manifest["shards"] else 0
    written = 0
    samples: List[dict] = []
    skipped: Counter = Counter()
    lo = start

    def finish(hi: int) -> None:
        """Write the pending samples as the next shard (entries lo..hi-1) and record it."""
        nonlocal lo, samples, skipped, written
        path = out / f"{split}-{len(manifest['shards']):05d}.tar"
        tmp = path.with_name(path.name + ".tmp")
        with wds.TarWriter(str(tmp), encoder=False, mtime=TAR_MTIME) as sink:
            for sample in samples:
                sink.write(sample)
        os.replace(tmp, path)
        n_qa = sum(len(json.loads(s["json"])["qa"]) for s in samples)
        manifest["shards"].append({"name": path.name, "entries": [lo, hi], "samples": len(samples), "qa": n_qa,
                                   "skipped": dict(sorted(skipped.items())), "bytes": path.stat().st_size})
        _write_json(manifest_path, manifest)
        lo, samples, skipped, written = hi, [], Counter(), written + 1

    bar = tqdm(total=len(entries), initial=start, unit="entry", desc=f"converting {json_path.name}",
               disable=not progress)
    stopped = False
    with bar:
        for index, sample, reason in _prepared(entries, start, workers, image_root=image_root, task=task,
                                               difficulty=difficulty, split=split, max_pixels=max_pixels):
            bar.update(1)
            if sample is None:
                skipped[reason] += 1
            else:
                samples.append(sample)
            if len(samples) == images_per_shard:
                finish(index + 1)
                bar.set_postfix(shards=len(manifest["shards"]))
                if max_shards is not None and written >= max_shards:
                    stopped = True
                    break
    if not stopped:
        if samples:
            finish(len(entries))
        elif lo < len(entries):  # skipped entries after the last shard: counted, no shard
            manifest["tail"] = {"entries": [lo, len(entries)], "skipped": dict(sorted(skipped.items()))}
        manifest["complete"] = True
        _write_json(manifest_path, manifest)
    return summarize(manifest, len(entries))


def format_summary(summary: dict, out: str | Path) -> str:
    skipped = summary["skipped"]
    state = "done" if summary["complete"] else f"stopped after entry {summary['done']} (rerun to continue)"
    lines = [f"{state}: {summary['entries']} entries -> {summary['samples']} samples ({summary['qa']} QA pairs) "
             f"in {summary['shards']} shards under {out}",
             f"skipped {sum(skipped.values())}" + (":" if skipped else "")]
    lines += [f"  {reason:<20} {n:>9}  {SKIP_REASONS.get(reason, '')}" for reason, n in skipped.items()]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m src.data.llava_to_shards", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", required=True, help="LLaVA-format JSON: a list of entries")
    p.add_argument("--image-root", required=True, help="folder the entries' `image` paths are relative to")
    p.add_argument("--out", required=True, help="output folder for <split>-%%05d.tar and <split>.manifest.json")
    p.add_argument("--images-per-shard", type=int, default=1000)
    p.add_argument("--task", default="llava", help="task name stored with every QA (per-task metrics)")
    p.add_argument("--difficulty", default="easy", choices=["easy", "hard"])
    p.add_argument("--split", default="train", help="shard name prefix; the datamodule reads train-* and val-*")
    p.add_argument("--workers", type=int, default=0, help="threads reading and checking images (0: none)")
    p.add_argument("--max-shards", type=int, default=None, help="stop after writing this many shards")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help="images with more pixels (by their header) are skipped undecoded")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        summary = convert(a.json, a.image_root, a.out, a.images_per_shard, a.task, a.difficulty, a.split,
                          a.workers, a.max_shards, progress=not a.no_progress, max_pixels=a.max_pixels)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary, a.out))
    if summary["complete"] and summary["samples"] == 0:
        print("error: no entry could be converted", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
