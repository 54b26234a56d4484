"""The binding probe's pieces (experiments/probes/binding_probe.py): which tokens an object covers, and that
the attention it reports is the attention the model computes."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from experiments.probes.binding_probe import center_token, last_token_attention, load_exported_base, object_tokens, probe


def test_object_tokens_are_the_cells_whose_centre_the_box_holds():
    assert object_tokens((0, 0, 16, 16), (16, 16), 128) == [0, 1, 16, 17]
    assert object_tokens((9, 17, 23, 24), (16, 16), 128) == [33, 34]
    assert object_tokens((1, 1, 3, 3), (16, 16), 128) == [center_token((1, 1, 3, 3), (16, 16), 128)] == [0]
    assert center_token((120, 120, 128, 128), (16, 16), 128) == 255


def test_last_token_attention_is_what_the_layers_attend_with(base_export):
    model, _ = load_exported_base(base_export)
    torch.manual_seed(1)
    images, prompt = torch.rand(2, 3, 128, 128), torch.randint(5, 60, (2, 7))
    att = last_token_attention(model, images, prompt)  # also checks its layer-by-layer pass against forward
    L, H, S = len(model.decoder.layers), model.decoder.config.n_heads, model.num_visual_tokens + 7
    assert att.shape == (L, 2, H, S)
    torch.testing.assert_close(att.sum(-1), torch.ones(L, 2, H))
    # The first layer's attention output at the last position, rebuilt from these probabilities,
    # equals the layer's own attention sublayer.
    dec, layer = model.decoder, model.decoder.layers[0]
    with torch.no_grad():
        visual = model.encode_images(images).tokens
        h = layer.input_norm(torch.cat([visual, dec.embed_tokens(prompt)], 1))
        from src.models.rope import rope_cos_sin
        cos, sin = rope_cos_sin(torch.arange(S), dec.config.head_dim, dec.config.rope_theta, h.dtype)
        want = layer.attn(h, cos, sin)[:, -1]  # (B, d)
        v = layer.attn.v_proj(h).view(2, S, layer.attn.n_kv_heads, -1).transpose(1, 2)
        v = v.repeat_interleave(H // layer.attn.n_kv_heads, dim=1)  # (B, H, S, hd)
        got = layer.attn.o_proj((att[0].unsqueeze(2) @ v).squeeze(2).reshape(2, -1))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_probe_reports_answers_colour_and_attention(base_export):
    result = probe(base_export, n_images=4, seed=3, batch=2)
    for key in ("spatial_acc", "spatial_axis_acc", "locate_acc", "locate_wrong_is_other_cell", "colour_probe_acc"):
        assert 0.0 <= result[key] <= 1.0, key
    assert result["spatial_axis_acc"] >= result["spatial_acc"]
    assert len(result["attention"]) == 6 and all(len(layer) == 4 for layer in result["attention"])
    for layer in result["attention"]:
        for head in layer:
            assert 0 <= head["asked"] <= 1 and 0 <= head["other"] <= 1 and -1 <= head["selectivity"] <= 1


@pytest.mark.parametrize("field, value", [("locate_answer", "object_cell"), ("spatial_answer", "object_relation")])
def test_probe_refuses_a_base_trained_on_restated_answers(base_export, field, value):
    """The probe reads answers at the prompt's last token: a base whose answers restate the object
    first would be scored on the wrong token, so it is refused by name."""
    manifest_path = Path(base_export) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    restated = Path(base_export).parent / f"restated_{field}"
    shutil.copytree(base_export, restated)
    (restated / "manifest.json").write_text(json.dumps({**manifest, "data": {field: value}}))
    with pytest.raises(ValueError, match=f"data.{field}"):
        probe(str(restated), n_images=2, seed=3)
