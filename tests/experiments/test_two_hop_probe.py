"""The two-hop probe's pieces (experiments/probes/two_hop_probe.py): what the head reads, and its labels."""
import pytest
import torch

from experiments.probes.binding_probe import medium_pair_scenes
from experiments.probes.two_hop_probe import CELLS, probe_items, readout_targets, sequence_ids, train_readout
from src.data.generator import RELATIONS, GeneratorConfig, SceneGenerator, vocabulary
from src.data.tokenizer import WordTokenizer


def test_sequence_ids_end_where_the_head_reads():
    tok = WordTokenizer(vocabulary())
    q, a = "where is the green circle ?", "green circle bottom center"
    ids, label = sequence_ids(tok, q, a, "cell")
    assert ids == tok.prompt(q) and ids[-1] == tok.sep_id and CELLS[label] == "bottom center"
    ids, label = sequence_ids(tok, q, a, "object_cell")
    assert ids == tok.prompt(q) + tok.encode("green circle") and CELLS[label] == "bottom center"
    q, a = "where is the green circle relative to the purple square ?", "green circle above"
    ids, label = sequence_ids(tok, q, a, "relation")
    assert ids == tok.prompt(q) and RELATIONS[label] == "above"
    ids, label = sequence_ids(tok, q, a, "object_relation")
    assert ids == tok.prompt(q) + tok.encode("green circle") and RELATIONS[label] == "above"
    with pytest.raises(ValueError, match="form"):
        sequence_ids(tok, q, a, "object")


@pytest.mark.parametrize("task, per_image", [("locate", 2), ("spatial", 1)])
def test_probe_items_are_the_generators_questions(task, per_image):
    images, qas = probe_items(task, 6, seed=4, image_size=128)
    assert len(images) == len(qas) == 6 and images[0].shape == (3, 128, 128)
    plain = SceneGenerator(4, GeneratorConfig(), aux_questions=True)
    expected = [[q for q in qa if q["task"] == task] for _, _, qa in medium_pair_scenes(plain, 6)]
    for got, want in zip(qas, expected):
        assert len(got) == per_image
        assert [q["question"] for q in got] == [q["question"] for q in want]
        assert [" ".join(q["answer"].split()[2:]) for q in got] == [q["answer"] for q in want]
    with pytest.raises(ValueError, match="task"):
        probe_items("count", 1, seed=4, image_size=128)


def test_confused_answer_is_the_other_objects():
    """The mix-up `other` counts: locate's other object's cell, spatial's opposite relation."""
    _, qas = probe_items("locate", 5, seed=4, image_size=128)
    _, label, confused = readout_targets(qas, "object_cell")
    assert torch.equal(confused[:, 0], label[:, 1]) and torch.equal(confused[:, 1], label[:, 0])
    _, qas = probe_items("spatial", 5, seed=4, image_size=128)
    ids, label, confused = readout_targets(qas, "relation")
    assert ids.shape[:2] == label.shape == (5, 1)
    for q, k, c in zip(qas, label[:, 0].tolist(), confused[:, 0].tolist()):
        assert RELATIONS[k] == q[0]["answer"].split()[-1] and {RELATIONS[k], RELATIONS[c]} in (
            {"left", "right"}, {"above", "below"})


def test_train_readout_runs_and_scores_the_held_out_questions():
    visual = torch.randn(12, 16, 128).half()
    for task, forms, per_image in (("locate", ("cell", "object_cell"), 2), ("spatial", ("relation", "object_relation"), 1)):
        _, qas = probe_items(task, 12, seed=4, image_size=128)
        for form in forms:
            hist = train_readout(visual, qas, form, n_layers=1, steps=3, n_val=4, eval_every=2)
            assert [h["step"] for h in hist] == [2, 3]
            n = 4 * per_image  # held-out questions: scores are multiples of 1/n, `other` only among the wrong
            for h in hist:
                assert 0 <= h["other"] <= 1 - h["acc"] and (n * h["acc"]).is_integer()
