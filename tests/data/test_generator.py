import numpy as np
import pytest

from src.data.generator import (AUX_TASKS, BACKGROUNDS, LARGE_COLOR, MEDIUM_COLORS, SMALL_COLORS, TASKS, GeneratorConfig,
                                SceneGenerator, relation, vocabulary)
from src.data.tokenizer import WordTokenizer


def test_generator_is_deterministic_for_a_seed():
    a, b, c = SceneGenerator(seed=3), SceneGenerator(seed=3), SceneGenerator(seed=4)
    ia, sa, qa = a.generate(17)
    ib, sb, qb = b.generate(17)
    assert ia.tobytes() == ib.tobytes() and sa == sb and qa == qb
    assert c.generate(17)[0].tobytes() != ia.tobytes()


def _pixel(image, box):
    x, y = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
    return tuple(np.asarray(image)[y, x])


def test_labels_match_the_drawn_scene():
    gen = SceneGenerator(seed=0)
    tok = WordTokenizer(vocabulary())
    for i in range(40):
        image, scene, qas = gen.generate(i)
        for obj in scene["small"]:  # every counted object is really drawn where the scene says
            assert _pixel(image, obj["box"]) == SMALL_COLORS[obj["color"]]
        for qa in qas:
            assert tok.unk_id not in tok.encode(qa["question"]) + tok.encode(qa["answer"])
            if qa["task"] == "count":
                color, shape = qa["question"].split()[2], qa["question"].split()[3][:-1]
                drawn = [o for o in scene["small"] if o["color"] == color and o["shape"] == shape]
                assert qa["answer"] == str(len(drawn))
            elif qa["task"] == "read":
                assert qa["answer"].replace(" ", "") == scene["text_box"]["text"]
            elif qa["task"] == "background":
                assert qa["answer"] == scene["background"]
                occupied = [scene["text_box"]["box"]] + [o["box"] for o in scene["small"]]
                occupied += [scene["large"]["box"]] if scene["large"] else []
                occupied += [scene["medium"][k]["box"] for k in "ab"] if scene["medium"] else []
                free = next((x, y) for y in range(128) for x in range(128) if not any(
                    b[0] - 2 <= x < b[2] + 2 and b[1] - 2 <= y < b[3] + 2 for b in occupied))
                assert tuple(np.asarray(image)[free[1], free[0]]) == BACKGROUNDS[scene["background"]]
            elif qa["task"] == "spatial":
                pair = scene["medium"]
                assert qa["answer"] == relation(pair["a"]["box"], pair["b"]["box"]) == pair["relation"]
                assert _pixel(image, pair["a"]["box"]) == MEDIUM_COLORS[pair["a"]["color"]]
            elif qa["task"] == "large":
                asked = qa["question"].split()[4]
                present = scene["large"] is not None and scene["large"]["shape"] == asked
                assert qa["answer"] == ("yes" if present else "no")


def test_large_shape_question_and_longer_text():
    """`large_question="shape"` asks the large object's shape (or "none") as the evaluated `large`
    question, and the training-only duplicate of it is dropped; `text_len` sets the box's digits."""
    gen = SceneGenerator(seed=3, config=GeneratorConfig(text_len=5, large_question="shape"), aux_questions=True)
    tok = WordTokenizer(vocabulary())
    answers = set()
    for i in range(30):
        image, scene, qa = gen.generate(i)
        (large,) = [q for q in qa if q["task"] == "large"]
        assert large["question"] == "what shape is the large object ?"
        assert large["answer"] == (scene["large"]["shape"] if scene["large"] else "none")
        answers.add(large["answer"])
        assert not any(q["task"] == "large_shape" for q in qa)
        (read,) = [q for q in qa if q["task"] == "read"]
        assert read["answer"].split() == list(scene["text_box"]["text"]) and len(scene["text_box"]["text"]) == 5
        assert len(scene["text_box"]["glyphs"]) == 5
        assert all(tok.unk_id not in tok.encode(q["question"]) + tok.encode(q["answer"]) for q in qa)
    assert answers == {"circle", "square", "triangle", "none"}
    with pytest.raises(ValueError, match="generator.large_question"):
        GeneratorConfig(large_question="color")


def test_count_answers_cover_the_range():
    gen = SceneGenerator(seed=1)
    answers = {qa["answer"] for i in range(60) for qa in gen.generate(i)[2] if qa["task"] == "count"}
    assert answers == {"0", "1", "2", "3"}


def test_aux_questions_are_right_and_change_nothing_else():
    plain, aux = SceneGenerator(seed=5), SceneGenerator(seed=5, aux_questions=True)
    tok = WordTokenizer(vocabulary())
    seen = set()
    for i in range(40):
        (ip, sp, qp), (ia, sa, qa) = plain.generate(i), aux.generate(i)
        assert ip.tobytes() == ia.tobytes() and sp == sa
        assert qa[:len(qp)] == qp and {q["task"] for q in qp} <= set(TASKS)  # the evaluated ones are untouched
        for q in qa[len(qp):]:
            seen.add(q["task"])
            assert tok.unk_id not in tok.encode(q["question"]) + tok.encode(q["answer"])
            if q["task"] == "large_shape":
                assert q["answer"] == (sa["large"]["shape"] if sa["large"] else "none")
                if sa["large"]:  # the shape's centre pixel is the large colour: it was drawn there
                    assert _pixel(ia, sa["large"]["box"]) == LARGE_COLOR
            elif q["task"] == "digits":
                assert q["answer"].split() == sorted(sa["text_box"]["text"])
            else:
                color, shape = q["question"].split()[3:5]
                (obj,) = [o for o in (sa["medium"]["a"], sa["medium"]["b"]) if (o["color"], o["shape"]) == (color, shape)]
                cx, cy = (obj["box"][0] + obj["box"][2]) / 2, (obj["box"][1] + obj["box"][3]) / 2
                row, col = q["answer"].split()
                assert ("top", "middle", "bottom")[min(2, int(cy * 3 // 128))] == row
                assert ("left", "center", "right")[min(2, int(cx * 3 // 128))] == col
    assert seen == set(AUX_TASKS)


@pytest.mark.parametrize("option, value, task, named", [("locate_answer", "object_cell", "locate", slice(3, 5)),
                                                         ("spatial_answer", "object_relation", "spatial", slice(3, 5)),
                                                         ("count_answer", "kind_count", "count", slice(2, 4))])
def test_restating_answer_names_the_object_first_and_changes_nothing_else(option, value, task, named):
    """`locate_answer="object_cell"` / `spatial_answer="object_relation"` / `count_answer=
    "kind_count"` answer `locate` / `spatial` / `count` with the (first) asked object's or kind's
    words (`named`: where the question names it) and then the default answer; images, scenes and
    every other question stay those of the default."""
    plain = SceneGenerator(seed=7, aux_questions=True)
    restated = SceneGenerator(seed=7, config=GeneratorConfig(**{option: value}), aux_questions=True)
    n_restated = 0
    for i in range(20):
        (ip, sp, qp), (ir, sr, qr) = plain.generate(i), restated.generate(i)
        assert ip.tobytes() == ir.tobytes() and sp == sr and len(qp) == len(qr)
        for a, b in zip(qp, qr):
            assert a["question"] == b["question"] and a["task"] == b["task"]
            if a["task"] == task:
                n_restated += 1
                color, shape = a["question"].split()[named]  # "where is the <colour> <shape> ...", "how many <colour> <shape>s ..."
                assert b["answer"] == f"{color} {shape} {a['answer']}"
            else:
                assert a["answer"] == b["answer"]
    assert n_restated >= 10
    with pytest.raises(ValueError, match=f"generator.{option}"):
        GeneratorConfig(**{option: "object"})
