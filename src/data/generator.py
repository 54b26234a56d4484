"""Deterministic generator of fine-grained visual QA scenes (the embedded default data).

Every image is one scene; the generator returns the image and the scene description it drew,
and the questions are answered from that description (so labels are right by construction and
tests can check them). One scene holds:

- a background colour                          -> `background` (easy)
- maybe one large shape (32-40 px)             -> `large`      (easy): "is there a large circle ?"
                                                  (`large_question="shape"`: "what shape is the
                                                  large object ?", answer the shape or "none")
- two medium objects (12 px), unique colours   -> `spatial`    (easy): "where is A relative to B ?"
- a small box in a corner with `text_len` digits (default 2) -> `read` (hard): glyphs 5-6 px wide
- 0-3 small objects (6 px) of each of red/blue x circle/square -> `count` (hard)

Training-only auxiliary questions (`aux_questions=True`; the base's training split, as LLaVA's
alignment stage trains on descriptions before instructions) ask for one fact at a time that the
evaluated tasks combine: the large object's shape (`large_shape`), where a medium object lies on
a 3 x 3 grid (`locate`), and which digits the box holds in increasing order (`digits`). They come
after the evaluated questions and draw nothing at random, so the images and the evaluated
questions of a seed are the same with or without them.

Answer forms: `locate_answer="object_cell"`, `spatial_answer="object_relation"` and
`count_answer="kind_count"` restate the named object or counted kind before the answer ("green
circle top left", "green circle left", "red circles 2"), so the answer is predicted at the
object's own word (one attention hop instead of two; docs/findings.md, "Why restate").

`hard` means the answer needs detail finer than 2x2 pooling of a stride-8 token grid keeps
(16 px cells): two digits share one pooled cell, as do neighbouring small objects of different
colour-shape kinds (so pooling mixes their features: the binding problem).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from PIL import Image, ImageDraw, ImageFont

BACKGROUNDS: Dict[str, Tuple[int, int, int]] = {
    "white": (240, 240, 240), "gray": (128, 128, 128), "black": (25, 25, 25), "brown": (110, 75, 45)}
LARGE_COLOR = (225, 195, 35)  # yellow
MEDIUM_COLORS: Dict[str, Tuple[int, int, int]] = {
    "green": (40, 170, 60), "purple": (150, 60, 190), "orange": (245, 135, 20)}
SMALL_COLORS: Dict[str, Tuple[int, int, int]] = {"red": (230, 30, 30), "blue": (40, 90, 235)}
SHAPES = ("circle", "square", "triangle")
SMALL_SHAPES = ("circle", "square")
RELATIONS = ("left", "right", "above", "below")
CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")

TASKS = ("background", "large", "spatial", "read", "count")
AUX_TASKS = ("large_shape", "locate", "digits")  # training-only (see the module docstring)
DIFFICULTY = {"background": "easy", "large": "easy", "spatial": "easy", "read": "hard", "count": "hard",
              "large_shape": "easy", "locate": "easy", "digits": "hard"}
LARGE_SHAPE_QUESTION = "what shape is the large object ?"
LARGE_QUESTIONS = ("presence", "shape")  # what the evaluated `large` question asks
LOCATE_ANSWERS = ("cell", "object_cell")  # what the training-only `locate` answer says
SPATIAL_ANSWERS = ("relation", "object_relation")  # what the evaluated `spatial` answer says
COUNT_ANSWERS = ("count", "kind_count")  # what the evaluated `count` answer says
ROWS3, COLS3 = ("top", "middle", "bottom"), ("left", "center", "right")

Box = Tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive-exclusive)


@dataclass
class GeneratorConfig:
    image_size: int = 128
    small_size: int = 6
    medium_size: int = 12
    large_size: Tuple[int, int] = (32, 40)
    max_count: int = 3
    text_len: int = 2
    font_size: int = 10
    count_questions: int = 2
    min_relation_offset: int = 20
    large_question: str = "presence"  # or "shape" (see the module docstring)
    locate_answer: str = "cell"  # or "object_cell" (see the module docstring)
    spatial_answer: str = "relation"  # or "object_relation" (see the module docstring)
    count_answer: str = "count"  # or "kind_count" (see the module docstring)

    def __post_init__(self) -> None:
        if self.image_size < 64:
            raise ValueError(f"generator.image_size must be >= 64, got {self.image_size}")
        if not 0 < self.max_count <= 9:
            raise ValueError(f"generator.max_count must be in 1..9, got {self.max_count}")
        if not 1 <= self.text_len <= 6:
            raise ValueError(f"generator.text_len must be in 1..6, got {self.text_len}")
        if self.large_question not in LARGE_QUESTIONS:
            raise ValueError(f"generator.large_question must be one of {LARGE_QUESTIONS}, got {self.large_question!r}")
        if self.locate_answer not in LOCATE_ANSWERS:
            raise ValueError(f"generator.locate_answer must be one of {LOCATE_ANSWERS}, got {self.locate_answer!r}")
        if self.spatial_answer not in SPATIAL_ANSWERS:
            raise ValueError(f"generator.spatial_answer must be one of {SPATIAL_ANSWERS}, got {self.spatial_answer!r}")
        if self.count_answer not in COUNT_ANSWERS:
            raise ValueError(f"generator.count_answer must be one of {COUNT_ANSWERS}, got {self.count_answer!r}")


def vocabulary() -> List[str]:
    """Every word the generator's questions and answers use (the domain tokenizer's vocabulary)."""
    words = ["what", "color", "is", "the", "background", "?", "there", "a", "large", "where", "relative",
             "to", "written", "in", "box", "how", "many", "are", "yes", "no"]
    words += list(BACKGROUNDS) + list(MEDIUM_COLORS) + list(SMALL_COLORS)
    words += list(SHAPES) + [s + "s" for s in SHAPES] + list(RELATIONS)
    words += [str(d) for d in range(10)]
    # the training-only questions' words, appended so that the earlier ids stay
    words += ["shape", "object", "none", "which", "digits"] + list(ROWS3) + list(COLS3)
    return list(dict.fromkeys(words))


class _Canvas:
    """Occupancy bookkeeping so that objects never overlap (labels stay exact)."""

    def __init__(self, size: int, margin: int = 1) -> None:
        self.size, self.margin, self.boxes = size, margin, []

    def free(self, b: Box) -> bool:
        if b[0] < 0 or b[1] < 0 or b[2] > self.size or b[3] > self.size:
            return False
        m = self.margin
        return all(b[2] + m <= o[0] or o[2] + m <= b[0] or b[3] + m <= o[1] or o[3] + m <= b[1] for o in self.boxes)

    def place(self, rng: random.Random, w: int, h: int, tries: int = 200, inset: int = 1) -> Optional[Box]:
        for _ in range(tries):
            x, y = rng.randint(inset, self.size - w - inset), rng.randint(inset, self.size - h - inset)
            b = (x, y, x + w, y + h)
            if self.free(b):
                self.boxes.append(b)
                return b
        return None


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, b: Box, color: Tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = b[0], b[1], b[2] - 1, b[3] - 1
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=color)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=color)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=color)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def box_center(b: Box) -> Tuple[float, float]:
    """The centre (x, y) of a box."""
    return (b[0] + b[2]) / 2, (b[1] + b[3]) / 2


def relation(a: Box, b: Box) -> str:
    """Where a is relative to b, along the dominant axis."""
    (ax, ay), (bx, by) = box_center(a), box_center(b)
    dx, dy = ax - bx, ay - by
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


class SceneGenerator:
    """`generate(index)` is a pure function of (seed, index): shards can be written in any order."""

    def __init__(self, seed: int = 0, config: Optional[GeneratorConfig] = None, aux_questions: bool = False) -> None:
        self.seed = seed
        self.config = config or GeneratorConfig()
        self.aux_questions = aux_questions
        self.font = ImageFont.load_default(size=self.config.font_size)

    def generate(self, index: int) -> Tuple[Image.Image, dict, List[dict]]:
        """-> (RGB image, scene description, list of QA dicts)."""
        c = self.config
        rng = random.Random(self.seed * 1_000_003 + index)
        size = c.image_size
        bg = rng.choice(list(BACKGROUNDS))
        image = Image.new("RGB", (size, size), BACKGROUNDS[bg])
        draw = ImageDraw.Draw(image)
        canvas = _Canvas(size)
        scene: dict = {"background": bg}

        # Text box in a corner: white box, black border, digits in black.
        text = "".join(rng.choice("0123456789") for _ in range(c.text_len))
        tb = draw.textbbox((0, 0), text, font=self.font)
        bw, bh = tb[2] - tb[0] + 6, tb[3] - tb[1] + 6
        corner = rng.choice(CORNERS)
        x0 = 2 if "left" in corner else size - bw - 2
        y0 = 2 if "top" in corner else size - bh - 2
        box = (x0, y0, x0 + bw, y0 + bh)
        canvas.boxes.append(box)
        draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=(255, 255, 255), outline=(0, 0, 0))
        origin = (x0 + 3 - tb[0], y0 + 3 - tb[1])
        draw.text(origin, text, fill=(0, 0, 0), font=self.font)
        scene["text_box"] = {"corner": corner, "text": text, "box": box, "glyphs": self._glyph_boxes(draw, origin, text)}

        # Maybe a large shape.
        scene["large"] = None
        if rng.random() < 2 / 3:
            s = rng.randint(*c.large_size)
            b = canvas.place(rng, s, s)
            if b is not None:
                shape = rng.choice(SHAPES)
                _draw_shape(draw, shape, b, LARGE_COLOR)
                scene["large"] = {"shape": shape, "box": b}

        # Two medium objects with a clear spatial relation.
        scene["medium"] = self._place_pair(rng, canvas, draw)

        # Small objects to count.
        small = []
        for color in SMALL_COLORS:
            for shape in SMALL_SHAPES:
                for _ in range(rng.randint(0, c.max_count)):
                    b = canvas.place(rng, c.small_size, c.small_size)
                    if b is not None:  # a crowded scene may fit fewer: labels count what was drawn
                        _draw_shape(draw, shape, b, SMALL_COLORS[color])
                        small.append({"color": color, "shape": shape, "box": b})
        scene["small"] = small
        return image, scene, self.questions(rng, scene)

    def _glyph_boxes(self, draw: ImageDraw.ImageDraw, origin: Tuple[float, float], text: str) -> List[Box]:
        """The inked box of each character of `text` drawn at `origin` (what dense encoder targets
        locate: src/data/dense_targets.py)."""
        boxes = []
        for i, ch in enumerate(text):
            x = origin[0] + self.font.getlength(text[:i])
            b = draw.textbbox((x, origin[1]), ch, font=self.font)
            boxes.append(tuple(int(round(v)) for v in b))
        return boxes

    def _place_pair(self, rng: random.Random, canvas: _Canvas, draw: ImageDraw.ImageDraw) -> Optional[dict]:
        c = self.config
        m = c.medium_size
        colors = rng.sample(list(MEDIUM_COLORS), 2)
        shapes = [rng.choice(SHAPES), rng.choice(SHAPES)]
        for _ in range(50):
            a = canvas.place(rng, m, m)
            if a is None:
                return None
            rel = rng.choice(RELATIONS)
            main = rng.randint(c.min_relation_offset, c.image_size // 2)
            side = rng.randint(-main // 3, main // 3)
            dx, dy = {"left": (main, side), "right": (-main, side), "above": (side, main), "below": (side, -main)}[rel]
            b = (a[0] + dx, a[1] + dy, a[2] + dx, a[3] + dy)  # b placed so that a is `rel` of b
            if canvas.free(b):
                canvas.boxes.append(b)
                assert relation(a, b) == rel
                _draw_shape(draw, shapes[0], a, MEDIUM_COLORS[colors[0]])
                _draw_shape(draw, shapes[1], b, MEDIUM_COLORS[colors[1]])
                return {"a": {"color": colors[0], "shape": shapes[0], "box": a},
                        "b": {"color": colors[1], "shape": shapes[1], "box": b}, "relation": rel}
            canvas.boxes.remove(a)
        return None

    def questions(self, rng: random.Random, scene: dict) -> List[dict]:
        """All QA pairs for a scene, answered from the scene description."""
        qa = [_qa("background", "what color is the background ?", scene["background"])]
        large = scene["large"]
        if self.config.large_question == "shape":
            qa.append(_qa("large", LARGE_SHAPE_QUESTION, large["shape"] if large else "none"))
        else:
            if large is not None and rng.random() < 0.75:
                asked = large["shape"]
            else:
                asked = rng.choice([s for s in SHAPES if large is None or s != large["shape"]])
            qa.append(_qa("large", f"is there a large {asked} ?", "yes" if large and large["shape"] == asked else "no"))
        pair = scene["medium"]
        if pair is not None:
            a, b = pair["a"], pair["b"]
            answer = pair["relation"]
            if self.config.spatial_answer == "object_relation":
                answer = f"{_words(a)} {answer}"
            qa.append(_qa("spatial", f"where is the {_words(a)} relative to the {_words(b)} ?",
                          answer))
        qa.append(_qa("read", "what is written in the box ?", " ".join(scene["text_box"]["text"])))
        kinds = [(c, s) for c in SMALL_COLORS for s in SMALL_SHAPES]
        for color, shape in rng.sample(kinds, min(self.config.count_questions, len(kinds))):
            n = sum(1 for o in scene["small"] if o["color"] == color and o["shape"] == shape)
            answer = f"{color} {shape}s {n}" if self.config.count_answer == "kind_count" else str(n)
            qa.append(_qa("count", f"how many {color} {shape}s are there ?", answer))
        if self.aux_questions:
            qa += self.aux(scene)
        return qa

    def aux(self, scene: dict) -> List[dict]:
        """The training-only questions: the large object's shape, each medium object's cell of a
        3 x 3 grid (by its centre), the box's digits sorted."""
        large = scene["large"]
        qa = []
        if self.config.large_question != "shape":  # else the evaluated `large` question is this one
            qa.append(_qa("large_shape", LARGE_SHAPE_QUESTION, large["shape"] if large else "none"))
        third = self.config.image_size / 3
        pair = scene["medium"]
        for obj in (pair["a"], pair["b"]) if pair else ():
            x, y = box_center(obj["box"])
            where = f"{ROWS3[min(2, int(y // third))]} {COLS3[min(2, int(x // third))]}"
            if self.config.locate_answer == "object_cell":
                where = f"{_words(obj)} {where}"
            qa.append(_qa("locate", f"where is the {_words(obj)} ?", where))
        qa.append(_qa("digits", "which digits are in the box ?", " ".join(sorted(scene["text_box"]["text"]))))
        return qa


def _words(obj: dict) -> str:
    """How questions, and the restated answers, name a medium object: "<colour> <shape>"."""
    return f"{obj['color']} {obj['shape']}"


def _qa(task: str, question: str, answer: str) -> dict:
    return {"question": question, "answer": answer, "task": task, "difficulty": DIFFICULTY[task]}
