import io
import json

import pytest
import webdataset as wds
from PIL import Image

from src.data.generator import GeneratorConfig, vocabulary
from src.data.shards import (QAExpander, SampleError, ShardError, collate, qa_dataset, write_generated_split)
from src.data.tokenizer import WordTokenizer

TOK = WordTokenizer(vocabulary())


def _png():
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _qa(question="what color is the background ?", answer="white"):
    return {"question": question, "answer": answer, "task": "background", "difficulty": "easy"}


def _write(path, samples):
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)
    return str(path)


def _read(urls, **kw):
    kw.setdefault("max_text_len", 24)
    return list(qa_dataset(urls, QAExpander(TOK, 32, **kw)))


@pytest.fixture
def bad_shard(tmp_path):
    good = json.dumps({"qa": [_qa(), _qa("how many red circles are there ?", "2")]}).encode()
    return _write(tmp_path / "bad-00000.tar", [
        {"__key__": "good", "png": _png(), "json": good},
        {"__key__": "badimg", "png": b"not a png at all", "json": json.dumps(_qa()).encode()},
        {"__key__": "nofield", "png": _png(), "json": json.dumps({"question": "q ?", "answer": "a"}).encode()},
        {"__key__": "latin1", "png": _png(), "json": '{"question": "caf\u00e9"}'.encode("latin-1")},
        {"__key__": "empty", "png": _png(), "json": json.dumps(_qa(question="   ")).encode()},
        {"__key__": "good2", "png": _png(), "json": json.dumps(_qa()).encode()},
    ])


def test_bad_samples_are_skipped_and_counted(bad_shard):
    out = _read([bad_shard])
    assert [s["key"] for s in out] == ["good", "good", "good2"]
    skipped = collate(out, TOK.pad_id)["skipped"]
    assert skipped == {"bad_image": 1, "missing_field": 1, "non_utf8": 1, "empty_question": 1}


@pytest.mark.parametrize("key", ["badimg", "nofield", "latin1", "empty"])
def test_strict_raises_naming_shard_and_key(tmp_path, bad_shard, key):
    data = {s["__key__"]: s for s in wds.WebDataset(bad_shard, shardshuffle=False, empty_check=False)}
    single = _write(tmp_path / f"{key}.tar", [{"__key__": key, "png": data[key]["png"], "json": data[key]["json"]}])
    with pytest.raises(SampleError, match=rf"{key}\.tar.*key {key}"):
        _read([single], strict=True)


def test_truncated_tar_raises_naming_the_shard(tmp_path):
    (path,) = write_generated_split(tmp_path, "train", 20, seed=0, images_per_shard=20)
    data = open(path, "rb").read()
    cut = tmp_path / "cut-00000.tar"
    cut.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(ShardError, match="cut-00000.tar"):
        _read([str(cut)])


def test_overlong_samples_truncate_or_skip(tmp_path):
    long_q = "where is the green circle relative to the orange square ?"  # 11 words
    path = _write(tmp_path / "long-00000.tar", [{"__key__": "k", "png": _png(), "json": json.dumps(_qa(long_q)).encode()}])
    (s,) = _read([path], max_text_len=8)
    assert len(s["input_ids"]) == 8 and s["skipped"] == {"truncated": 1}
    assert s["labels"].tolist().count(-100) == 6  # answer + eos still supervised
    assert _read([path], max_text_len=8, overlength="skip") == []


def test_generated_shards_roundtrip_and_collate(tmp_path):
    urls = write_generated_split(tmp_path, "val", 10, seed=5, images_per_shard=4)
    assert len(urls) == 3
    samples = _read(urls)
    assert len(samples) >= 50  # 5-6 questions per image
    batch = collate(samples[:8], TOK.pad_id)
    assert batch["images"].shape == (8, 3, 32, 32)
    T = batch["input_ids"].shape[1]
    assert batch["labels"].shape == (8, T)
    for s, ids in zip(samples[:8], batch["input_ids"]):
        answer = [t for t in s["labels"].tolist() if t != -100]
        assert answer[-1] == TOK.eos_id and len(answer) >= 2  # the answer, then <eos>
        assert ids[: len(s["input_ids"])].tolist() == s["input_ids"].tolist()


def test_missing_shards_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tar"):
        _read([str(tmp_path / "nope.tar")])


def test_skipped_samples_are_reported_at_epoch_end(tmp_path, bad_shard, caplog):
    import shutil

    import lightning as L

    from src.data.datamodule import VQADataModule
    from src.lit.visor_module import VisorLitModule
    from src.models.decoder import DecoderConfig
    from src.models.lvlm import VisorLVLM
    from src.models.plan import LayerPlan
    from src.models.vision import VisionEncoder

    root = tmp_path / "root"
    root.mkdir()
    for split in ("train", "val"):
        shutil.copy(bad_shard, root / f"{split}-00000.tar")
    TOK.save(root / "tokenizer.json")
    dm = VQADataModule(root=str(root), generate=False, image_size=32, batch_size=2, val_batch_size=2,
                       num_workers=0, shuffle_buffer=0)
    lvlm = VisorLVLM(VisionEncoder("test_byobnet", 2, 32), DecoderConfig(n_layers=2, d_model=32, n_heads=2,
                     n_kv_heads=1, intermediate_size=32), LayerPlan(2, all_self=True), pos_conv=False)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with caplog.at_level("WARNING"):
        trainer.fit(VisorLitModule(lvlm), datamodule=dm)
    m = trainer.callback_metrics
    for split in ("train", "val"):
        assert float(m[f"data/{split}_skipped/bad_image"]) == 1.0
        assert float(m[f"data/{split}_skipped/non_utf8"]) == 1.0
    assert "skipped or altered samples" in caplog.text and "empty_question" in caplog.text


def test_multi_turn_packs_every_question_of_an_image(tmp_path):
    urls = write_generated_split(tmp_path, "train", 6, seed=2, images_per_shard=6)
    singles = _read(urls)
    packed = _read(urls, turns=6, max_text_len=96)
    assert len(packed) == 6 and all(s["task"] == "multi" for s in packed)
    for p in packed:
        ids, labels = p["input_ids"].tolist(), p["labels"].tolist()
        assert ids[0] == TOK.bos_id and ids.count(TOK.sep_id) == len([s for s in singles if s["key"] == p["key"]])
        # every supervised position predicts an answer token or <eos>, right after <sep> or another answer token
        for i, lab in enumerate(labels):
            if lab != -100:
                assert lab == ids[i + 1] if i + 1 < len(ids) else lab == TOK.eos_id
                assert ids[i] not in (TOK.bos_id, TOK.eos_id) and (ids[i] == TOK.sep_id or labels[i - 1] != -100)
        # the same supervised tokens as the single-turn samples of that image, in some order
        answers = sorted(t for s in singles if s["key"] == p["key"] for t in s["labels"].tolist() if t != -100)
        assert sorted(t for t in labels if t != -100) == answers
    firsts = {TOK.decode(p["input_ids"][1:4].tolist()) for p in packed}
    assert len(firsts) > 1  # the turn order is shuffled per image


def test_multi_turn_packs_greedily_within_the_length_and_loses_nothing(tmp_path):
    urls = write_generated_split(tmp_path, "train", 3, seed=2, images_per_shard=3)
    singles = _read(urls)
    packed = _read(urls, turns=6, max_text_len=30)
    assert all(len(p["input_ids"]) <= 30 for p in packed)
    assert len(packed) > 3  # an image's questions spill into a second sequence ...
    assert sum(p["input_ids"].tolist().count(TOK.sep_id) for p in packed) == len(singles)  # ... none dropped
    assert not collate(packed, TOK.pad_id)["skipped"]


def test_shards_made_with_other_settings_are_not_reused(tmp_path):
    from src.data.shards import ensure_default_dataset

    ensure_default_dataset(tmp_path, 4, 2, seed=0, images_per_shard=2)
    ensure_default_dataset(tmp_path, 4, 2, seed=0, images_per_shard=2)  # same settings: reused
    with pytest.raises(ValueError, match=r"data.seed: on disk 0, configured 1"):
        ensure_default_dataset(tmp_path, 4, 2, seed=1, images_per_shard=2)
    with pytest.raises(ValueError, match=r"data.val_images"):
        ensure_default_dataset(tmp_path, 4, 3, seed=0, images_per_shard=2)
    with pytest.raises(ValueError, match=r"data.train_aux_questions: on disk None, configured True"):
        ensure_default_dataset(tmp_path, 4, 2, seed=0, images_per_shard=2, train_aux_questions=True)
    with pytest.raises(ValueError, match=r"data.generator: on disk .*'text_len': 2.*'text_len': 5"):
        ensure_default_dataset(tmp_path, 4, 2, seed=0, images_per_shard=2, config=GeneratorConfig(text_len=5))
    (tmp_path / "meta.json").unlink()
    with pytest.raises(ValueError, match="no meta.json"):
        ensure_default_dataset(tmp_path, 4, 2, seed=0, images_per_shard=2)


def test_text_len_sets_the_generated_read_box(tmp_path):
    """data.text_len reaches the generated shards: every `read` answer has that many digits."""
    from src.data.datamodule import VQADataModule

    dm = VQADataModule(root=str(tmp_path), train_images=3, val_images=2, images_per_shard=3, text_len=5)
    dm.prepare_data()
    assert json.loads((tmp_path / "meta.json").read_text())["generator"]["text_len"] == 5
    answers = [qa["answer"] for url in sorted(tmp_path.glob("*.tar")) for sample in wds.WebDataset(str(url))
               for qa in json.loads(sample["json"])["qa"] if qa["task"] == "read"]
    assert len(answers) == 5 and all(len(a.split()) == 5 for a in answers)
    for bad in (0, 7):
        with pytest.raises(ValueError, match="data.text_len"):
            VQADataModule(root=str(tmp_path), text_len=bad)
    with pytest.raises(ValueError, match="data.large_question"):
        VQADataModule(root=str(tmp_path), large_question="size")
    with pytest.raises(ValueError, match="data.locate_answer"):
        VQADataModule(root=str(tmp_path), locate_answer="object")
    with pytest.raises(ValueError, match="data.spatial_answer"):
        VQADataModule(root=str(tmp_path), spatial_answer="object")
    with pytest.raises(ValueError, match="data.count_answer"):
        VQADataModule(root=str(tmp_path), count_answer="kind")


def test_train_tasks_keeps_only_those_tasks(tmp_path):
    count = {**_qa("how many red circles are there ?", "2"), "task": "count", "difficulty": "hard"}
    shard = _write(tmp_path / "mixed-00000.tar", [
        {"__key__": "nofield", "png": _png(), "json": json.dumps({"question": "q ?", "answer": "a"}).encode()},
        {"__key__": "a", "png": _png(), "json": json.dumps({"qa": [_qa(), count]}).encode()},
        {"__key__": "b", "png": _png(), "json": json.dumps({"qa": [_qa()]}).encode()},
    ])
    out = _read([shard], tasks=["count"])
    assert [(s["key"], s["task"]) for s in out] == [("a", "count")]
    assert [s["task"] for s in _read([shard], tasks=["background", "count"])] == ["background", "count", "background"]
    # a malformed sample is still counted as bad, not filtered away as another task
    assert collate(_read([shard], tasks=["background"]), TOK.pad_id)["skipped"] == {"missing_field": 1}
    with pytest.raises(ValueError, match="data.train_tasks"):
        QAExpander(TOK, 32, 24, tasks=[])


def test_the_run_seed_orders_training_but_not_the_data(tmp_path, monkeypatch):
    """data.shuffle_seed (default: the run's seed_everything) changes the training order, not the
    generated images; validation order never changes."""
    from src.data.datamodule import VQADataModule

    def order(split="train", **kw):
        dm = VQADataModule(root=str(tmp_path), train_images=40, val_images=4, images_per_shard=10, num_workers=0,
                           shuffle_buffer=20, batch_size=8, val_batch_size=8, **kw)
        dm.prepare_data()
        dm.setup()
        loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
        return [k for batch in loader for k in batch["key"]]

    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    by_data_seed = order()
    assert by_data_seed == order(shuffle_seed=0)  # no run seed: data.seed orders it, as before
    other = order(shuffle_seed=1)
    assert other != by_data_seed and sorted(other) == sorted(by_data_seed)  # same samples, new order
    monkeypatch.setenv("PL_GLOBAL_SEED", "1")
    assert order() == other
    assert order(shuffle_seed=0) == by_data_seed  # an explicit shuffle_seed wins
    assert order("val") == order("val", shuffle_seed=3)
    with pytest.raises(ValueError, match="data.shuffle_seed"):
        VQADataModule(root=str(tmp_path), shuffle_seed=-1)


@pytest.mark.parametrize("n_shards,world,workers,split", [(3, 2, 2, "shards"), (4, 2, 2, "shards"), (1, 2, 1, "samples"),
                                                           (3, 2, 2, "samples"), (5, 1, 3, "samples")])
def test_ranks_and_workers_read_every_image_once(tmp_path, monkeypatch, n_shards, world, workers, split):
    """Every (rank, worker) reader of a split, as webdataset names them (RANK / WORLD_SIZE / WORKER /
    NUM_WORKERS): together they see each image exactly once, and none is left with nothing (3 shards
    for 4 readers fall back to splitting the images, one shard for two ranks too)."""
    urls = [_write(tmp_path / f"s-{i:05d}.tar", [{"__key__": f"s{i}_{j}", "png": _png(), "json": json.dumps(_qa()).encode()}
                                                for j in range(5)]) for i in range(n_shards)]
    seen = []
    for rank in range(world):
        for worker in range(workers):
            for name, value in {"RANK": rank, "WORLD_SIZE": world, "WORKER": worker, "NUM_WORKERS": workers}.items():
                monkeypatch.setenv(name, str(value))
            keys = [s["key"] for s in qa_dataset(urls, QAExpander(TOK, 32, 24), split=split, workers=workers)]
            assert keys, (rank, worker)
            seen += keys
    assert sorted(seen) == sorted(f"s{i}_{j}" for i in range(n_shards) for j in range(5))
