import json

import pytest
import torch

from src.data.generator import vocabulary
from src.data.tokenizer import (ChatTemplate, ChatTokenizer, HFTokenizer, WordTokenizer, load_tokenizer)

tokenizers = pytest.importorskip("tokenizers")

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["what color is the box ?", "how many red circles are there ?", "red green blue yes no 0 1 2 3",
          "user assistant system", "You are a helpful assistant."] + [" ".join(vocabulary())]


def _bpe(vocab_size=400):
    """A tiny byte-level BPE with Qwen2's ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


@pytest.fixture
def hf_dir(tmp_path):
    d = tmp_path / "hf"
    d.mkdir()
    _bpe().save(str(d / "tokenizer.json"))
    return d


def _supervised(input_ids, labels):
    return [t for t in labels.tolist() if t != -100]


def test_load_tokenizer_picks_the_class_by_content(hf_dir, tmp_path):
    word = WordTokenizer(vocabulary())
    word.save(tmp_path / "word.json")
    assert isinstance(load_tokenizer(tmp_path / "word.json"), WordTokenizer)
    hf = load_tokenizer(hf_dir)  # a folder: its tokenizer.json
    assert isinstance(hf, HFTokenizer) and isinstance(hf, ChatTokenizer)
    assert isinstance(load_tokenizer(hf_dir / "tokenizer.json"), HFTokenizer)
    (tmp_path / "other.json").write_text(json.dumps({"vocab": ["a"]}))
    with pytest.raises(ValueError, match="other.json: neither"):
        load_tokenizer(tmp_path / "other.json")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")


def test_chatml_ids_and_labels_only_on_the_answers(hf_dir):
    tok = load_tokenizer(hf_dir)
    raw = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    im_start, im_end, eot = (raw.token_to_id(t) for t in SPECIAL[1:] + SPECIAL[:1])
    assert tok.eos_id == im_end and tok.pad_id == eot
    assert tok.vocab_size == raw.get_vocab_size() > 259

    pairs = [("what color is the box ?", "red"), ("how many red circles are there ?", "2")]
    input_ids, labels = tok.encode_chat(pairs)
    assert input_ids.shape == labels.shape and input_ids.dtype == labels.dtype == torch.long
    text = ("<|im_start|>user\nwhat color is the box ?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n"
            "<|im_start|>user\nhow many red circles are there ?<|im_end|>\n<|im_start|>assistant\n2<|im_end|>")
    assert tok.render(pairs, image="") == text
    full = raw.encode(text, add_special_tokens=False).ids
    assert input_ids.tolist() == full[:-1] and labels.tolist()[-1] == im_end  # shifted by one
    # piece-by-piece encoding equals encoding the whole rendered text
    assert input_ids.tolist() + [labels.tolist()[-1]] == full

    # loss exactly on each answer and its <|im_end|>
    kept = labels != -100
    assert _supervised(input_ids, labels) == raw.encode("red").ids + [im_end] + raw.encode("2").ids + [im_end]
    targets = torch.tensor(full[1:])
    assert torch.equal(labels[kept], targets[kept])
    first_answer = len(tok.prompt(pairs[0][0])) - 1  # the "\n" after "assistant"
    assert not kept[:first_answer].any() and kept[first_answer] and full[first_answer + 1] == raw.encode("red").ids[0]
    assert tok.decode(labels[kept].tolist()) == "red2"
    assert tok.pad_id not in input_ids.tolist()  # padding is told apart by value

    # round trip, and the generation prompt ends right where the answer starts
    assert tok.decode(tok.encode("how many red circles are there ?")) == "how many red circles are there ?"
    prompt = tok.prompt("how many red circles are there ?", history=pairs[:1])
    assert prompt == full[: len(prompt)] and full[len(prompt): len(prompt) + 1] == raw.encode("2").ids
    assert tok.decode(prompt).endswith("?\nassistant\n")  # special tokens are left out


def test_matches_transformers_apply_chat_template(hf_dir):
    transformers = pytest.importorskip("transformers")
    chatml = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"), chat_template=chatml)
    tok = load_tokenizer(hf_dir)
    pairs = [("what color is the box ?", "blue"), ("is there a large circle ?", "yes")]
    messages = [m for q, a in pairs for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    ids = ref.apply_chat_template(messages, tokenize=True, return_dict=False)
    input_ids, labels = tok.encode_chat(pairs)
    assert input_ids.tolist() + [labels[-1].item()] == list(ids)[:-1]  # theirs adds a last "\n"
    gen = ref.apply_chat_template(messages[:2] + messages[2:3], tokenize=True, add_generation_prompt=True,
                                  return_dict=False)
    assert tok.prompt(pairs[1][0], history=pairs[:1]) == list(gen)


def test_system_template_pad_from_config_and_named_errors(hf_dir):
    tok = load_tokenizer(hf_dir, chat_template="chatml_system")
    input_ids, labels = tok.encode_chat([("what color is the box ?", "red")])
    assert tok.decode(input_ids.tolist()).startswith("system\nYou are a helpful assistant.\nuser\n")
    assert tok.decode(_supervised(input_ids, labels)) == "red"

    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"pad_token": {"content": "<|im_start|>"}}))
    with pytest.raises(ValueError, match=r"pad_token '<\|im_start\|>'.*occurs in the chat template"):
        load_tokenizer(hf_dir)
    (hf_dir / "tokenizer_config.json").unlink()
    with pytest.raises(ValueError, match=r"chat_template.end='</s>' is not one token"):
        load_tokenizer(hf_dir, chat_template=ChatTemplate(end="</s>"))
    with pytest.raises(ValueError, match=r"chat_template must be one of"):
        load_tokenizer(hf_dir, chat_template="llama3")


def test_word_tokenizer_behaves_as_before_through_the_interface(tmp_path):
    tok = WordTokenizer(vocabulary())
    tok.save(tmp_path / "tokenizer.json")
    assert json.loads((tmp_path / "tokenizer.json").read_text()) == {"type": "word", "vocab": tok.itos}
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, WordTokenizer) and loaded.itos == tok.itos and loaded.vocab_size == tok.vocab_size
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.sep_id, tok.unk_id) == (0, 1, 2, 3, 4)
    q, a = tok.encode("what color is the background ?"), tok.encode("white")
    input_ids, labels = tok.encode_chat([("what color is the background ?", "white"),
                                         ("is there a large circle ?", "no")])
    q2, a2 = tok.encode("is there a large circle ?"), tok.encode("no")
    tokens = [tok.bos_id] + q + [tok.sep_id] + a + [tok.eos_id] + q2 + [tok.sep_id] + a2 + [tok.eos_id]
    assert input_ids.tolist() == tokens[:-1]
    expected = [-100] * len(tokens[1:])
    for start, n in ((len(q) + 1, len(a) + 1), (len(q) + len(a) + len(q2) + 3, len(a2) + 1)):
        expected[start: start + n] = tokens[start + 1: start + 1 + n]
    assert labels.tolist() == expected
    assert tok.prompt("is there a large circle ?") == [tok.bos_id] + q2 + [tok.sep_id]
    assert tok.decode(input_ids.tolist()) == "what color is the background ? white is there a large circle ? no"


def test_datamodule_reads_shards_with_a_hf_tokenizer(hf_dir, tmp_path):
    from src.data.datamodule import VQADataModule
    from src.data.shards import write_generated_split

    root = tmp_path / "root"
    write_generated_split(root, "val", 3, seed=1, images_per_shard=3)
    with pytest.raises(FileNotFoundError, match="data.tokenizer_path"):
        VQADataModule(root=str(root), generate=False, tokenizer_path=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="data.chat_template"):
        VQADataModule(root=str(root), generate=False, tokenizer_path=str(hf_dir), chat_template="jinja")
    dm = VQADataModule(root=str(root), generate=False, tokenizer_path=str(hf_dir), image_size=32, val_batch_size=4,
                       num_workers=0, max_text_len=48)
    dm.prepare_data()  # no root/tokenizer.json needed
    dm.setup("validate")
    assert isinstance(dm.tokenizer, HFTokenizer)
    batch = next(iter(dm.val_dataloader()))
    assert batch["images"].shape == (4, 3, 32, 32) and batch["input_ids"].shape == batch["labels"].shape
    assert not batch["skipped"]
    for ids, labels in zip(batch["input_ids"], batch["labels"]):
        n = int((ids != dm.tokenizer.pad_id).sum())
        answer = [t for t in labels[:n].tolist() if t != -100]
        assert answer[-1] == dm.tokenizer.eos_id and dm.tokenizer.decode(answer[:-1]).strip()
        assert dm.tokenizer.decode(ids[:n].tolist()).startswith("user\n")


def test_llava_ov_template_puts_the_image_inside_the_first_user_turn(hf_dir):
    """`<|im_start|>user\\n` <image> `\\nQ<|im_end|>\\n<|im_start|>assistant\\nA<|im_end|>`, the image in the
    first turn only: image_at is the ids before it, the rest encodes the text after it."""
    raw = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    enc = lambda text: raw.encode(text, add_special_tokens=False).ids  # noqa: E731
    for name, start in (("llava_ov", ""), ("llava_ov_system", "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")):
        tok = load_tokenizer(hf_dir, chat_template=name)
        pairs = [("what color is the box ?", "red"), ("how many red circles are there ?", "2")]
        text = tok.render(pairs)
        before, after = text.split("<image>")
        assert before == start + "<|im_start|>user\n" and after.startswith("\nwhat color is the box ?<|im_end|>\n")
        assert after.count("<|im_start|>user\n") == 1 and after.endswith("assistant\n2<|im_end|>")
        input_ids, labels = tok.encode_chat(pairs)
        full = enc(before) + enc(after)
        assert tok.image_at == len(enc(before)) > 0
        assert input_ids.tolist() + [labels.tolist()[-1]] == full
        assert tok.decode(_supervised(input_ids, labels)) == "red2"
        prompt = tok.prompt(pairs[1][0], history=pairs[:1])
        assert prompt == full[: len(prompt)] and tok.decode(prompt).endswith("?\nassistant\n")
        assert tok.prompt(pairs[0][0]) == enc(before) + enc(after.split("red<|im_end|>")[0])
    assert load_tokenizer(hf_dir).image_at == 0 and WordTokenizer(vocabulary()).image_at == 0  # the image first


def test_chat_layout_through_lightning_fit_validate_predict(hf_dir, tmp_path):
    """A VISOR model trained and evaluated on batches in the llava_ov layout: the batch says where the
    image goes, and the module's logits, FLOPs and predictions use it."""
    import lightning as L
    from src.data.datamodule import VQADataModule
    from src.flops import sample_flops
    from src.lit.batch import answer_logits
    from src.lit.visor_module import VisorLitModule
    from src.models import DecoderConfig, LayerPlan, VisionEncoder, VisorLVLM

    torch.manual_seed(0)
    plan = LayerPlan(n_layers=6, self_layers=[0, 3], optional_self=[3], cross_layers=[1, 4])
    lvlm = VisorLVLM(VisionEncoder("test_byobnet", 2, 32), DecoderConfig(preset="tiny", vocab_size=400), plan)
    module = VisorLitModule(lvlm, max_new_tokens=3, warmup_steps=1)
    dm = VQADataModule(root=str(tmp_path / "data"), train_images=4, val_images=2, images_per_shard=4, image_size=32,
                       batch_size=2, val_batch_size=4, num_workers=0, tokenizer_path=str(hf_dir),
                       chat_template="llava_ov", max_text_len=48)
    trainer = L.Trainer(max_steps=2, limit_val_batches=1, val_check_interval=2, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=dm)
    batch = next(iter(dm.val_dataloader()))
    A = dm.tokenizer.image_at
    assert batch["image_at"] == A > 0
    with torch.no_grad():
        ours = answer_logits(module.lvlm.eval(), batch)
        at = batch["labels"] != -100
        assert torch.equal(ours, module.lvlm(batch["images"], batch["input_ids"], logits_at=at, image_at=A))
        assert not torch.allclose(ours, module.lvlm(batch["images"], batch["input_ids"], logits_at=at))
    rows = [r for b in trainer.predict(module, datamodule=dm) for r in b]
    assert rows and all(r["question"].endswith("?") and "<|" not in r["question"] and r["prompt_tokens"] > A
                        for r in rows)
    r = rows[0]
    assert r["gflops"] == pytest.approx(sample_flops(module.lvlm, r["prompt_tokens"], r["budget"], image_at=A).llm / 1e9)
    assert r["gflops"] < sample_flops(module.lvlm, r["prompt_tokens"], r["budget"]).llm / 1e9
