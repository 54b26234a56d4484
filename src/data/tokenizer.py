"""A word-level tokenizer for the generated domain, saved as JSON beside the shards."""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Sequence

SPECIALS = ["<pad>", "<bos>", "<eos>", "<sep>", "<unk>"]


class WordTokenizer:
    """Whitespace-split words -> ids. Unknown words map to <unk>.

    A prompt is `<bos> question <sep>`; the answer follows and ends with `<eos>`."""

    def __init__(self, words: Sequence[str]) -> None:
        self.itos: List[str] = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad_id, self.bos_id, self.eos_id, self.sep_id, self.unk_id = (self.stoi[s] for s in SPECIALS)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> List[int]:
        return [self.stoi.get(w, self.unk_id) for w in text.split()]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.itos[i] for i in ids if i not in (self.pad_id, self.bos_id, self.eos_id, self.sep_id))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"type": "word", "vocab": self.itos}, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "WordTokenizer":
        data = json.loads(Path(path).read_text())
        if data.get("type") != "word" or data["vocab"][: len(SPECIALS)] != SPECIALS:
            raise ValueError(f"{path}: not a VISOR word tokenizer file")
        return cls(data["vocab"][len(SPECIALS):])
