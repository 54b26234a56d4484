"""The two-hop probe's pieces (experiments/two_hop_probe.py): what the head reads, and its labels."""
import pytest
import torch

from experiments.binding_probe import medium_pair_scenes
from experiments.two_hop_probe import CELLS, locate_items, sequence_ids, train_readout
from src.data.generator import GeneratorConfig, SceneGenerator, vocabulary
from src.data.tokenizer import WordTokenizer


def test_sequence_ids_end_where_the_head_reads():
    tok = WordTokenizer(vocabulary())
    q, a = "where is the green circle ?", "green circle bottom center"
    ids, label = sequence_ids(tok, q, a, "cell")
    assert ids == tok.prompt(q) and ids[-1] == tok.sep_id and CELLS[label] == "bottom center"
    ids, label = sequence_ids(tok, q, a, "object_cell")
    assert ids == tok.prompt(q) + tok.encode("green circle") and CELLS[label] == "bottom center"
    with pytest.raises(ValueError, match="form"):
        sequence_ids(tok, q, a, "object")


def test_locate_items_are_the_generators_questions():
    images, qas = locate_items(6, seed=4, image_size=128)
    assert len(images) == len(qas) == 6 and images[0].shape == (3, 128, 128)
    plain = SceneGenerator(4, GeneratorConfig(), aux_questions=True)
    expected = [[q for q in qa if q["task"] == "locate"] for _, _, qa in medium_pair_scenes(plain, 6)]
    for got, want in zip(qas, expected):
        assert [q["question"] for q in got] == [q["question"] for q in want]
        assert [" ".join(q["answer"].split()[2:]) for q in got] == [q["answer"] for q in want]


def test_train_readout_runs_and_scores_the_held_out_questions():
    _, qas = locate_items(12, seed=4, image_size=128)
    visual = torch.randn(12, 16, 128).half()
    for form in ("cell", "object_cell"):
        hist = train_readout(visual, qas, form, n_layers=1, steps=3, n_val=4, eval_every=2)
        assert [h["step"] for h in hist] == [2, 3]
        for h in hist:  # 8 held-out questions: scores are multiples of 1/8, `other` only among the wrong
            assert 0 <= h["other"] <= 1 - h["acc"] and (8 * h["acc"]).is_integer()
