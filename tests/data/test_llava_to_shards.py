import json

import pytest
import webdataset as wds
from PIL import Image

from src.data import llava_to_shards
from src.data.llava_to_shards import convert, main, strip_image_tag
from src.data.shards import QAExpander, collate, qa_dataset
from src.data.tokenizer import WordTokenizer


def _conv(*turns):
    return [{"from": role, "value": value} for role, value in zip(["human", "gpt"] * len(turns), turns)]


def _good(i, *turns):
    return {"id": f"good/{i}", "image": f"imgs/{i}.png", "conversations": _conv(*turns)}


@pytest.fixture
def llava(tmp_path):
    """A LLaVA-format JSON (7 good entries, 8 broken ones) and its image folder."""
    root = tmp_path / "images"
    (root / "imgs").mkdir(parents=True)
    for i in range(7):
        Image.new("RGB", (20 + i, 16), (10 * i, 50, 90)).save(root / "imgs" / f"{i}.png")
    Image.new("RGB", (24, 24), (200, 10, 10)).save(root / "imgs" / "j.jpg", quality=90)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "imgs" / "g.gif")
    (root / "imgs" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    good = [
        _good(0, "<image>\nwhat color is the box ?", "red"),
        _good(1, "how many dogs ?\n<image>", "2", "and cats ?", "3"),  # two turns, kept in order
        _good(2, "is it\n<image>\nbig ?", "yes"),
        _good(3, "<image>\nwhat is shown ?", "a tree"),
        {"id": 4, "image": "imgs/j.jpg", "conversations": _conv("<image>\nwhat color ?", "red")},
        {"id": 5, "image": "imgs/g.gif", "conversations": _conv("<image>\nwhat color ?", "black")},
        _good(6, "<image>\nlast one ?", "yes"),
    ]
    bad = [
        {"id": "b0", "image": "imgs/nope.png", "conversations": _conv("<image>\nq ?", "a")},  # missing_image
        {"id": "b1", "image": "imgs/corrupt.png", "conversations": _conv("<image>\nq ?", "a")},  # bad_image
        {"id": "b2", "image": "imgs/0.png", "conversations": []},  # empty_conversation
        {"id": "b3", "image": "imgs/0.png", "conversations": _conv("<image>\nq ?")},  # no_answer
        {"id": "b4", "image": "imgs/0.png", "conversations": _conv("<image>\n", "a")},  # empty_question
        {"id": "b5", "image": "imgs/0.png", "conversations": _conv("<image>\nq ?", "  ")},  # empty_answer
        {"id": "b6", "conversations": _conv("q ?", "a")},  # no_image (text only)
        {"id": "b7", "image": "imgs/0.png",
         "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},  # no_question
    ]
    entries = [good[0], bad[0], good[1], bad[1], bad[2], good[2], bad[3], good[3], bad[4], good[4], bad[5],
               bad[6], good[5], good[6], bad[7]]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(entries))
    return path, root


EXPECTED_QA = [
    [("what color is the box ?", "red")],
    [("how many dogs ?", "2"), ("and cats ?", "3")],
    [("is it big ?", "yes")],
    [("what is shown ?", "a tree")],
    [("what color ?", "red")],
    [("what color ?", "black")],
    [("last one ?", "yes")],
]
EXPECTED_SKIPS = {"missing_image": 1, "bad_image": 1, "empty_conversation": 1, "no_answer": 1,
                  "empty_question": 1, "empty_answer": 1, "no_image": 1, "no_question": 1}


def _raw(out, split="train"):
    urls = sorted(str(p) for p in out.glob(f"{split}-*.tar"))
    return urls, list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def test_strip_image_tag():
    assert strip_image_tag("<image>\nWhat is it?") == "What is it?"
    assert strip_image_tag("What is it?\n<image>") == "What is it?"
    assert strip_image_tag("What is\n<image>\nit?") == "What is it?"


def test_good_entries_land_in_readable_shards_and_bad_ones_are_counted(llava, tmp_path):
    json_path, root = llava
    out = tmp_path / "out"
    summary = convert(json_path, root, out, images_per_shard=3, task="vqa", difficulty="hard", progress=False)
    assert summary["complete"] and summary["entries"] == 15
    assert summary["samples"] == 7 and summary["qa"] == 8 and summary["shards"] == 3
    assert summary["skipped"] == EXPECTED_SKIPS
    urls, raw = _raw(out)
    assert [u.rsplit("/", 1)[1] for u in urls] == ["train-00000.tar", "train-00001.tar", "train-00002.tar"]
    metas = [json.loads(s["json"]) for s in raw]
    assert [[(q["question"], q["answer"]) for q in m["qa"]] for m in metas] == EXPECTED_QA  # input order
    assert all(q["task"] == "vqa" and q["difficulty"] == "hard" for m in metas for q in m["qa"])
    assert all(m["ordered"] for m in metas)
    assert [m["id"] for m in metas] == ["good/0", "good/1", "good/2", "good/3", "4", "5", "good/6"]
    assert [sorted(k for k in s if not k.startswith("__")) for s in raw][4:6] == [["jpg", "json"], ["json", "png"]]
    assert raw[4]["jpg"] == (root / "imgs" / "j.jpg").read_bytes()  # JPEG bytes kept; GIF re-encoded as PNG

    # our reader decodes every converted sample, with no skips
    words = {w for qa in EXPECTED_QA for q, a in qa for w in (q + " " + a).split()}
    tok = WordTokenizer(sorted(words))
    singles = list(qa_dataset(urls, QAExpander(tok, 32, 24)))
    assert len(singles) == 8 and not collate(singles, tok.pad_id)["skipped"]
    assert singles[0]["image"].shape == (3, 32, 32)
    assert tok.decode([t for t in singles[0]["labels"].tolist() if t != -100]) == "red"
    # multi-turn packing keeps a conversation's turns in order (the sample is `ordered`)
    packed = list(qa_dataset(urls, QAExpander(tok, 32, 48, turns=4)))
    two = next(p for p in packed if p["task"] == "multi")
    assert tok.decode(two["input_ids"].tolist()) == "how many dogs ? 2 and cats ? 3"
    assert two["input_ids"].tolist().index(tok.stoi["dogs"]) < two["input_ids"].tolist().index(tok.stoi["cats"])

    manifest = json.loads((out / "train.manifest.json").read_text())
    assert [s["entries"] for s in manifest["shards"]] == [[0, 6], [6, 13], [13, 15]]
    assert [s["samples"] for s in manifest["shards"]] == [3, 3, 1]


def _files(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix == ".tar"}


def test_interrupted_conversion_resumes_to_the_same_shards(llava, tmp_path):
    json_path, root = llava
    whole = tmp_path / "whole"
    convert(json_path, root, whole, images_per_shard=2, progress=False)
    reference = _files(whole)
    assert len(reference) == 4

    # stop after the first shard
    part = tmp_path / "part"
    first = convert(json_path, root, part, images_per_shard=2, max_shards=1, progress=False)
    assert not first["complete"] and first["shards"] == 1 and list(_files(part)) == ["train-00000.tar"]
    kept = (part / "train-00000.tar").stat().st_mtime_ns
    done = convert(json_path, root, part, images_per_shard=2, progress=False)
    assert (part / "train-00000.tar").stat().st_mtime_ns == kept  # finished shards are not rewritten
    assert _files(part) == reference
    assert done["skipped"] == EXPECTED_SKIPS and done["samples"] == 7 and done["complete"]
    assert convert(json_path, root, part, images_per_shard=2, progress=False) == done  # complete: a no-op


def test_crash_inside_a_shard_leaves_no_partial_shard(llava, tmp_path, monkeypatch):
    json_path, root = llava
    whole = tmp_path / "whole"
    convert(json_path, root, whole, images_per_shard=2, progress=False)

    real = llava_to_shards.prepare_entry
    calls = {"n": 0}

    def crash_on_the_ninth(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 9:  # inside the third shard
            raise KeyboardInterrupt
        return real(*args, **kw)

    out = tmp_path / "crash"
    monkeypatch.setattr(llava_to_shards, "prepare_entry", crash_on_the_ninth)
    with pytest.raises(KeyboardInterrupt):
        convert(json_path, root, out, images_per_shard=2, progress=False)
    assert list(_files(out)) == ["train-00000.tar", "train-00001.tar"]
    monkeypatch.setattr(llava_to_shards, "prepare_entry", real)
    summary = convert(json_path, root, out, images_per_shard=2, workers=2, progress=False)  # threads: same output
    assert _files(out) == _files(whole)
    assert summary["skipped"] == EXPECTED_SKIPS
    assert not list(out.glob("*.tmp"))


def test_other_settings_over_an_existing_conversion_are_named(llava, tmp_path):
    json_path, root = llava
    out = tmp_path / "out"
    convert(json_path, root, out, images_per_shard=2, max_shards=1, progress=False)
    with pytest.raises(ValueError, match=r"--images-per-shard: on disk 2, given 3"):
        convert(json_path, root, out, images_per_shard=3, progress=False)
    with pytest.raises(ValueError, match=r"--task: on disk 'llava', given 'ocr'"):
        convert(json_path, root, out, images_per_shard=2, task="ocr", progress=False)
    with pytest.raises(ValueError, match=r"--difficulty"):
        convert(json_path, root, out, difficulty="medium", progress=False)
    (out / "train.manifest.json").unlink()
    with pytest.raises(ValueError, match="no train.manifest.json"):
        convert(json_path, root, out, images_per_shard=2, progress=False)


def test_cli_prints_a_summary(llava, tmp_path, capsys):
    json_path, root = llava
    out = tmp_path / "out"
    rc = main(["--json", str(json_path), "--image-root", str(root), "--out", str(out), "--images-per-shard", "4",
               "--split", "val", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0 and "15 entries -> 7 samples (8 QA pairs) in 2 shards" in text
    assert "missing_image" in text and "skipped 8" in text
    assert sorted(p.name for p in out.glob("val-*.tar")) == ["val-00000.tar", "val-00001.tar"]
    assert main(["--json", str(json_path), "--image-root", str(tmp_path / "nope"), "--out", str(out)]) == 2


def _png_header(width, height):
    """A PNG whose header declares width x height and holds no pixel data: what a decompression bomb
    looks like before decoding."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_hostile_image_paths_and_bombs_are_counted_not_read(tmp_path, capsys):
    """Image paths leaving --image-root (absolute, `..`, a symlink out) are skipped without being
    read; an image whose header declares more than --max-pixels is skipped before decoding (ours at
    8000 x 8000, PIL's own limit at 20000 x 20000); each is counted and the good entry still lands."""
    root, outside = tmp_path / "images", tmp_path / "secret"
    root.mkdir()
    outside.mkdir()
    Image.new("RGB", (8, 8)).save(outside / "x.png")
    Image.new("RGB", (8, 8)).save(root / "ok.png")
    (root / "link.png").symlink_to(outside / "x.png")
    (root / "bomb.png").write_bytes(_png_header(8000, 8000))
    (root / "huge.png").write_bytes(_png_header(20000, 20000))
    tried = {"ok.png": None, str(outside / "x.png"): "image_outside_root", "../secret/x.png": "image_outside_root",
             "link.png": "image_outside_root", "bomb.png": "image_too_large", "huge.png": "image_too_large"}
    entries = [{"id": i, "image": image, "conversations": _conv("<image>\nq ?", "a")} for i, image in enumerate(tried)]
    path = tmp_path / "hostile.json"
    path.write_text(json.dumps(entries))
    reads = []
    real_read = llava_to_shards.read_image
    llava_to_shards.read_image = lambda p, *a: reads.append(p) or real_read(p, *a)
    try:
        summary = convert(path, root, tmp_path / "out", progress=False)
    finally:
        llava_to_shards.read_image = real_read
    assert summary["samples"] == 1
    assert summary["skipped"] == {"image_outside_root": 3, "image_too_large": 2}
    assert all(p.is_relative_to(root.resolve()) for p in reads)  # nothing outside the root was opened
    for image, reason in tried.items():
        print(f"{image!r:>40}: {reason or 'converted'}")
    # with a higher limit the 8000 x 8000 header is decoded, and its missing pixels make it a bad image
    summary = convert(path, root, tmp_path / "out2", progress=False, max_pixels=100_000_000)
    assert summary["skipped"]["image_too_large"] == 1 and summary["skipped"]["bad_image"] == 1
