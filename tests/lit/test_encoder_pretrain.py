"""Dense encoder targets from scene descriptions, and the encoder pretraining stage (CLI + export)."""
from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from src.cli import main as cli_main
from src.data.dense_targets import CHANNELS, INDEX, dense_targets
from src.data.generator import SceneGenerator
from src.data.scene_stream import SceneStream
from src.models.vision import VisionEncoder

GRID, SIZE, STRIDE = (16, 16), 128, 8


def _scenes(n=150, seed=5):
    gen = SceneGenerator(seed)
    return [gen.generate(i) for i in range(n)]


def test_each_small_object_marks_the_token_holding_its_centre():
    for _, scene, _ in _scenes():
        t = dense_targets(scene, GRID, SIZE)
        assert t.shape == (len(CHANNELS), 16, 16)
        for kind in {(o["color"], o["shape"]) for o in scene["small"]}:
            objs = [o for o in scene["small"] if (o["color"], o["shape"]) == kind]
            cells = {(int((o["box"][1] + o["box"][3]) / 2 // STRIDE), int((o["box"][0] + o["box"][2]) / 2 // STRIDE))
                     for o in objs}
            marked = {tuple(rc) for rc in t[INDEX[f"small/{kind[0]}_{kind[1]}"]].nonzero().tolist()}
            assert marked == cells
        kinds_drawn = {f"small/{o['color']}_{o['shape']}" for o in scene["small"]}
        for name in CHANNELS:
            if name.startswith("small/") and name not in kinds_drawn:
                assert t[INDEX[name]].sum() == 0


def _cells_centred_in(box) -> torch.Tensor:
    """(16, 16): 1 where the token cell's centre lies inside `box` (the cover rule, written out)."""
    want = torch.zeros(16, 16)
    for r, c in itertools.product(range(16), range(16)):
        cx, cy = (c + 0.5) * STRIDE, (r + 0.5) * STRIDE
        want[r, c] = float(box[0] <= cx < box[2] and box[1] <= cy < box[3])
    return want


def test_cover_marks_exactly_the_cells_whose_centre_is_inside_the_box():
    rng = random.Random(0)
    for _ in range(200):
        x0, y0 = rng.randint(0, 120), rng.randint(0, 120)
        box = (x0, y0, min(128, x0 + rng.randint(1, 40)), min(128, y0 + rng.randint(1, 40)))
        scene = {"text_box": {"box": box, "text": "", "glyphs": []}, "large": None, "medium": None, "small": []}
        got = dense_targets(scene, GRID, SIZE)[INDEX["text/box"]]
        assert torch.equal(got, _cells_centred_in(box)), box


def test_large_and_medium_objects_mark_every_token_they_cover():
    for _, scene, _ in _scenes(60):
        t = dense_targets(scene, GRID, SIZE)
        large, pair = scene["large"], scene["medium"]
        for shape in ("circle", "square", "triangle"):
            want = t[INDEX["large/cover"]] if large and large["shape"] == shape else torch.zeros(16, 16)
            assert torch.equal(t[INDEX[f"large/{shape}"]], want)
        if large:
            assert t[INDEX["large/cover"]].sum() >= 9  # a 32-40 px shape covers at least 3 x 3 cell centres
        if pair:
            for obj in (pair["a"], pair["b"]):
                cells = _cells_centred_in(obj["box"])
                assert cells.sum() >= 1 and torch.all(t[INDEX[f"medium/{obj['color']}"]][cells > 0] == 1)
                assert torch.all(t[INDEX[f"medium/{obj['shape']}"]][cells > 0] == 1)


def test_digits_keep_their_order_and_glyph_boxes_hold_ink():
    for image, scene, _ in _scenes():
        tb = scene["text_box"]
        t = dense_targets(scene, GRID, SIZE)
        digit_channels = [i for i, n in enumerate(CHANNELS) if n.startswith("digit_")]
        # Every digit of the string is marked once (two digits never share a half cell).
        assert t[digit_channels].sum() == len(tb["text"])
        marks = []  # (row, col, half, digit) in reading order must spell the text
        for i in digit_channels:
            side, digit = CHANNELS[i].split("/")
            for r, c in t[i].nonzero().tolist():
                marks.append((r, c, side == "digit_right", digit))
        assert "".join(m[3] for m in sorted(marks)) == tb["text"]
        pixels = np.asarray(image).astype(int)
        for box in tb["glyphs"]:
            patch = pixels[box[1]:box[3], box[0]:box[2]]
            assert patch.size and patch.min() < 128  # the glyph box contains dark ink


def test_scene_stream_workers_take_disjoint_indices(monkeypatch):
    seen = []
    for worker in range(2):
        info = type("Info", (), {"id": worker, "num_workers": 2})()
        monkeypatch.setattr("src.data.scene_stream.get_worker_info", lambda info=info: info)
        stream = iter(SceneStream(seed=3, image_size=128, start=10))
        seen.append([next(stream)[1] for _ in range(3)])
    gen = SceneGenerator(3)
    assert seen[0] == [gen.generate(i)[1] for i in (10, 12, 14)]
    assert seen[1] == [gen.generate(i)[1] for i in (11, 13, 15)]


def test_encoder_pretraining_cli_exports_weights_the_encoder_loads(tmp_path):
    export = tmp_path / "export"
    cli_main(["fit", "--config", "configs/encoder.yaml", "--trainer.fast_dev_run", "2",
              "--model.init_args.export_dir", str(export), "--data.init_args.val_images", "8",
              "--data.init_args.batch_size", "4", "--trainer.default_root_dir", str(tmp_path),
              "--trainer.logger", "false", "--trainer.callbacks", "null"])
    assert (export / "manifest.json").exists()
    enc = VisionEncoder("lcnet_075", 2, 128, pos_embed="sincos", feature_norm=True,
                        weights_path=str(export / "model.safetensors")).eval()
    fresh = VisionEncoder("lcnet_075", 2, 128, pos_embed="sincos", feature_norm=True).eval()
    images = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        assert not torch.allclose(enc(images), fresh(images))  # the trained weights, not an init
    enc2 = VisionEncoder("lcnet_075", 2, 128, pos_embed="sincos", feature_norm=True, weights_path=str(export)).eval()
    with torch.no_grad():
        assert torch.equal(enc(images), enc2(images))
    with pytest.raises(ValueError, match="vision.weights_path.*feature_norm"):
        VisionEncoder("lcnet_075", 2, 128, pos_embed="sincos", feature_norm=False, weights_path=str(export))
    with pytest.raises(FileNotFoundError, match="vision.weights_path"):
        VisionEncoder("lcnet_075", 2, 128, weights_path=str(tmp_path / "nothing.safetensors"))
