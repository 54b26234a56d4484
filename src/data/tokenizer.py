"""Tokenizers behind one interface: our word tokenizer and Hugging Face `tokenizer.json` files.

`ChatTokenizer` is what the datamodule uses: `encode`/`decode`, `pad_id`, `eos_id`,
`vocab_size`, and the chat layout of a list of question/answer turns with the loss on the
answers only (`chat_turn` -> `build`, or `encode_chat` in one call; `prompt` for generation).
A sequence is

    start  turn_1  sep  turn_2  sep ...  turn_n        turn = head question tail answer end

where only `answer end` is supervised (`end` is `eos_id`, where generation stops). The image is
not a token: the model puts its visual tokens after the first `image_at` ids, which is 0 (before
all the text) or, for a template with `ChatTemplate.image`, inside the first turn after its head,
followed by `image_ids` (LLaVA-OneVision: `<|im_start|>user\n` <image> `\n` question ...).

- `WordTokenizer` (the embedded default, saved as JSON beside the shards):
  `<bos> q1 <sep> a1 <eos> q2 <sep> a2 <eos>` (start `<bos>`, tail `<sep>`, end `<eos>`).
- `HFTokenizer`: a Hugging Face `tokenizer.json` (through the `tokenizers` library) with a
  `ChatTemplate`, a few explicit strings (ChatML for Qwen2 / LLaVA-OneVision:
  `<|im_start|>user\\nQ<|im_end|>\\n<|im_start|>assistant\\nA<|im_end|>`), not a jinja engine.

`load_tokenizer(path)` picks the class from the file's content.
"""
from __future__ import annotations

import abc
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

SPECIALS = ["<pad>", "<bos>", "<eos>", "<sep>", "<unk>"]


@dataclass(frozen=True)
class ChatTurn:
    """One encoded question/answer turn: `head + question + tail` is the prompt (no loss),
    `answer` holds the answer's ids followed by the end token (loss)."""

    head: List[int]
    question: List[int]
    tail: List[int]
    answer: List[int]

    def __len__(self) -> int:
        return len(self.head) + len(self.question) + len(self.tail) + len(self.answer)

    def cut_question(self, n: int) -> "ChatTurn":
        """The same turn without the first `n` question tokens (its end, the subject, stays)."""
        assert 0 <= n < len(self.question), f"cannot cut {n} of {len(self.question)} question tokens"
        return replace(self, question=self.question[n:])


class ChatTokenizer(abc.ABC):
    """The interface both tokenizers implement. Subclasses set `start_ids`, `sep_ids` (lists of
    ids) and implement `encode`, `decode`, `vocab_size`, `pad_id`, `eos_id`, `chat_turn`."""

    start_ids: List[int]  # once, before the first turn (BOS, a system prompt)
    sep_ids: List[int]  # between two turns (no loss)
    image_at: int = 0  # ids before the image in every sequence (see the module docstring)
    image_ids: List[int] = []  # right after the image, before the first question (no loss)
    pad_id: int  # never inside a built sequence: padding can be told from tokens by value
    eos_id: int  # ends every answer (supervised); generation stops here

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """1 + the largest id this tokenizer can produce."""

    @abc.abstractmethod
    def encode(self, text: str) -> List[int]:
        """Plain text -> ids (no special tokens added)."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """ids -> text, special tokens (pad, eos, template markers) left out."""

    @abc.abstractmethod
    def chat_turn(self, question: str, answer: str) -> ChatTurn:
        """Encode one question/answer turn in this tokenizer's chat layout."""

    def sequence_length(self, turns: Sequence[ChatTurn]) -> int:
        """Length T of `build(turns)`'s input_ids (tokens less the last, as inputs are shifted)."""
        assert turns, "at least one turn"
        return (len(self.start_ids) + len(self.image_ids) + sum(len(t) for t in turns)
                + (len(turns) - 1) * len(self.sep_ids) - 1)

    def build(self, turns: Sequence[ChatTurn]) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> (input_ids (T,) int64, labels (T,) int64), T = sequence_length(turns).

        labels[t] is the token at t + 1 where that token is an answer token or an answer's end
        token, else -100: the loss falls on the answers only."""
        assert turns, "at least one turn"
        tokens, supervised = list(self.start_ids), [False] * len(self.start_ids)
        for i, turn in enumerate(turns):
            prompt = (self.sep_ids + turn.head if i else turn.head + self.image_ids) + turn.question + turn.tail
            tokens += prompt + turn.answer
            supervised += [False] * len(prompt) + [True] * len(turn.answer)
        input_ids = torch.tensor(tokens[:-1], dtype=torch.long)  # (T,)
        labels = torch.tensor(tokens[1:], dtype=torch.long)  # (T,)
        labels[~torch.tensor(supervised[1:], dtype=torch.bool)] = -100
        assert input_ids.shape == labels.shape == (self.sequence_length(turns),)
        return input_ids, labels

    def encode_chat(self, pairs: Sequence[Tuple[str, str]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """[(question, answer), ...] -> (input_ids (T,), labels (T,)) as `build`."""
        return self.build([self.chat_turn(q, a) for q, a in pairs])

    def prompt(self, question: str, history: Sequence[Tuple[str, str]] = ()) -> List[int]:
        """Ids to generate the answer to `question` from, after the answered turns `history`;
        generation should stop at `eos_id`."""
        tokens = list(self.start_ids)
        for i, (q, a) in enumerate(history):
            t = self.chat_turn(q, a)
            tokens += t.head + (self.image_ids if i == 0 else []) + t.question + t.tail + t.answer + self.sep_ids
        t = self.chat_turn(question, "")
        return tokens + t.head + ([] if history else self.image_ids) + t.question + t.tail


class WordTokenizer(ChatTokenizer):
    """Whitespace-split words -> ids. Unknown words map to <unk>.

    A prompt is `<bos> question <sep>`; the answer follows and ends with `<eos>`."""

    def __init__(self, words: Sequence[str]) -> None:
        self.itos: List[str] = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad_id, self.bos_id, self.eos_id, self.sep_id, self.unk_id = (self.stoi[s] for s in SPECIALS)
        self.start_ids, self.sep_ids = [self.bos_id], []

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> List[int]:
        return [self.stoi.get(w, self.unk_id) for w in text.split()]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.itos[i] for i in ids if i not in (self.pad_id, self.bos_id, self.eos_id, self.sep_id))

    def chat_turn(self, question: str, answer: str) -> ChatTurn:
        return ChatTurn([], self.encode(question), [self.sep_id], self.encode(answer) + [self.eos_id])

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"type": "word", "vocab": self.itos}, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "WordTokenizer":
        data = json.loads(Path(path).read_text())
        return cls.from_dict(data, path)

    @classmethod
    def from_dict(cls, data: dict, path: str | Path = "<dict>") -> "WordTokenizer":
        if not isinstance(data, dict) or data.get("type") != "word" or data["vocab"][: len(SPECIALS)] != SPECIALS:
            raise ValueError(f"{path}: not a VISOR word tokenizer file")
        return cls(data["vocab"][len(SPECIALS):])


@dataclass(frozen=True)
class ChatTemplate:
    """A chat layout as plain strings (see the module docstring): `start` once, then per turn
    `user` question `assistant` answer `end`, turns joined by `sep`. `end` must be one token
    of the vocabulary; it becomes `eos_id`. `image`: None puts the image before all the text;
    a string puts it inside the first turn, after `user`, this string following it."""

    start: str = ""
    user: str = "<|im_start|>user\n"
    assistant: str = "<|im_end|>\n<|im_start|>assistant\n"
    end: str = "<|im_end|>"
    sep: str = "\n"
    image: Optional[str] = None


_SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
CHAT_TEMPLATES: Dict[str, ChatTemplate] = {
    # Qwen2's ChatML, no system turn, the image before all the text.
    "chatml": ChatTemplate(),
    # ChatML with the system turn LLaVA-NeXT/OneVision training used, the image before all the text.
    "chatml_system": ChatTemplate(start=_SYSTEM),
    # LLaVA-OneVision's layout: the image inside the first user turn, `<|im_start|>user\n<image>\nQ`
    # (DEFAULT_IMAGE_TOKEN + "\n" before the first question, as LLaVA-NeXT's training data and
    # transformers' LlavaOnevisionProcessor chat template render it), no system turn ...
    "llava_ov": ChatTemplate(image="\n"),
    # ... and with the system turn of LLaVA-NeXT's `qwen_1_5` conversation template.
    "llava_ov_system": ChatTemplate(start=_SYSTEM, image="\n"),
}


def chat_template(name: Union[str, ChatTemplate], field: str = "chat_template") -> ChatTemplate:
    """A template by preset name (or the template itself); an unknown name is an error naming `field`."""
    if isinstance(name, ChatTemplate):
        return name
    if name not in CHAT_TEMPLATES:
        raise ValueError(f"{field} must be one of {sorted(CHAT_TEMPLATES)}, got {name!r}")
    return CHAT_TEMPLATES[name]


class HFTokenizer(ChatTokenizer):
    """A Hugging Face `tokenizer.json` (loaded with the `tokenizers` library) in a `ChatTemplate`.

    Each piece (template strings, question, answer) is encoded on its own, without the
    post-processor's special tokens (a BOS belongs in `template.start`). The answer's end token
    is `eos_id`. The pad token is `pad_token`, else `tokenizer_config.json`'s `pad_token` beside
    the file, else `<|endoftext|>`; it must not occur in the template (padding is found by value).
    Text that spells a special token (`<|im_end|>`) is read as that token."""

    def __init__(self, tokenizer, template: Union[str, ChatTemplate] = "chatml", pad_token: Optional[str] = None,
                 name: str = "<tokenizer>") -> None:
        self.tok = tokenizer
        self.name = name
        self.template = chat_template(template)
        t = self.template
        self.eos_id = self._token_id(t.end, "chat_template.end")
        pad_token = pad_token if pad_token is not None else "<|endoftext|>"
        self.pad_id = self._token_id(pad_token, "pad_token")
        self.start_ids, self.sep_ids = self._encode(t.start), self._encode(t.sep)
        self._head, self._tail = self._encode(t.user), self._encode(t.assistant)
        if t.image is not None:
            self.image_at, self.image_ids = len(self.start_ids) + len(self._head), self._encode(t.image)
        fixed = set(self.start_ids + self.sep_ids + self._head + self._tail + self.image_ids + [self.eos_id])
        if self.pad_id in fixed:
            raise ValueError(f"{name}: pad_token {pad_token!r} (id {self.pad_id}) occurs in the chat template; "
                             "choose another pad_token")

    def _encode(self, text: str) -> List[int]:
        return self.tok.encode(text, add_special_tokens=False).ids if text else []

    def _token_id(self, token: str, field: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise ValueError(f"{self.name}: {field}={token!r} is not one token of this tokenizer")
        return i

    @property
    def vocab_size(self) -> int:
        return max(self.tok.get_vocab(with_added_tokens=True).values()) + 1

    def encode(self, text: str) -> List[int]:
        return self._encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def chat_turn(self, question: str, answer: str) -> ChatTurn:
        return ChatTurn(list(self._head), self._encode(question), list(self._tail),
                        self._encode(answer) + [self.eos_id])

    def render(self, pairs: Sequence[Tuple[str, str]], image: str = "<image>") -> str:
        """The chat as text (for reading and checks; `encode_chat` encodes it piece by piece), with
        `image` where the visual tokens go."""
        t = self.template
        turns = [f"{t.user}{image + t.image if i == 0 and t.image is not None else ''}{q}{t.assistant}{a}{t.end}"
                 for i, (q, a) in enumerate(pairs)]
        return (t.start if t.image is not None else image + t.start) + t.sep.join(turns)

    @classmethod
    def from_file(cls, path: str | Path, template: Union[str, ChatTemplate] = "chatml",
                  pad_token: Optional[str] = None) -> "HFTokenizer":
        """`path`: a tokenizer.json. pad_token default: tokenizer_config.json beside it, else `<|endoftext|>`."""
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # not a hard dependency of the embedded default
            raise ImportError("reading a Hugging Face tokenizer.json needs the `tokenizers` package") from e
        path = Path(path)
        if pad_token is None:
            pad_token = _config_token(path.parent / "tokenizer_config.json", "pad_token")
        return cls(Tokenizer.from_file(str(path)), template, pad_token, name=str(path))


def _config_token(path: Path, key: str) -> Optional[str]:
    """A special token's text from a tokenizer_config.json (a string or {"content": ...}), or None."""
    if not path.exists():
        return None
    value = json.loads(path.read_text()).get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer(path: str | Path, chat_template: Union[str, ChatTemplate] = "chatml",
                   pad_token: Optional[str] = None) -> ChatTokenizer:
    """A tokenizer file (or a folder holding `tokenizer.json`) -> `WordTokenizer` for our format
    (`{"type": "word", ...}`), `HFTokenizer` for a Hugging Face tokenizer.json (`{"model": {...}}`).
    `chat_template` and `pad_token` apply to Hugging Face files only."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer file {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a JSON tokenizer file ({e})") from e
    if isinstance(data, dict) and data.get("type") == "word":
        return WordTokenizer.from_dict(data, path)
    if isinstance(data, dict) and isinstance(data.get("model"), dict) and "type" in data["model"]:
        return HFTokenizer.from_file(path, chat_template, pad_token)
    raise ValueError(f"{path}: neither a VISOR word tokenizer ({{\"type\": \"word\"}}) nor a Hugging Face "
                     "tokenizer.json ({\"model\": {\"type\": ...}})")
