"""LLaVA-OneVision (transformers `LlavaOnevisionForConditionalGeneration`) as a VisorLVLM.

Mapping (explicit weight maps, all or nothing; see src/models/hf_import.py):

  SigLIP vision tower (HF)                  -> vision.vit (timm VisionTransformer, SiglipVisionEncoder),
                                               q/k/v fused into timm's qkv, cut after
                                               `vision_feature_layer` (later layers, post_layernorm
                                               and head are documented drops)
  multi_modal_projector.linear_1/act/linear_2 -> projector.fc1 / GELU / fc2
  image_newline                             -> image_newline (appended after the image's tokens)
  language_model (Qwen2) + lm_head          -> decoder (Qwen2 map)
  (new) cross sublayers, positional conv    -> copied from the host attention (cross_init=host),
                                               zero-initialised conv (identity)

Two image paths, as LLaVA-OV: AnyRes (`TiledImages`, src/models/anyres.py: a base crop plus the
tiles of the best `image_grid_pinpoints` canvas, an image_newline after each row of the unpadded
tile features, downsampled beyond `vision_aspect_ratio`'s anyres_max_N), which its processor uses
for a lone image; and one crop per image (plain (B, 3, S, S) images, its multi-image path): the
image resized to the tower's size, its V = (S // patch) ** 2 tokens, then one image_newline token,
so the LLM sees V + 1 visual tokens. Checkpoints in the current
transformers layout (`model.language_model.*`, `model.vision_tower.*`) and the legacy llava-hf
layout (`language_model.model.*`, `vision_tower.vision_model.*`, `image_newline`) are both read.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from src.models.anyres import AnyRes, default_pinpoints
from src.models.decoder import DecoderConfig
from src.models.hf_import import (
    HFCheckpoint,
    RenamedCheckpoint,
    WeightRule,
    _concat0,
    apply_rules,
    expand_rules,
    check_tied_head,
    decoder_config_from_hf,
    decoder_rules_full,
)
from src.models.lvlm import VisorLVLM
from src.models.plan import LayerPlan
from src.models.siglip import SiglipVisionEncoder
from src.models.token_reduction import TokenReducer

# SigLIP activations in HF naming -> timm naming
_VISION_ACTS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
# LlavaOnevisionConfig's own defaults for a vision_config that leaves a field out (SigLIP-so400m, 26 layers).
_VISION_DEFAULTS = dict(hidden_size=1152, intermediate_size=4304, patch_size=14, image_size=384,
                        num_hidden_layers=26, num_attention_heads=16, layer_norm_eps=1e-6,
                        hidden_act="gelu_pytorch_tanh", num_channels=3)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def llava_ov_settings(cfg: dict, where: str = "config.json") -> dict:
    """Our constructor arguments from a LLaVA-OneVision config.json dict:
    {"vision": SiglipVisionEncoder kwargs, "decoder": DecoderConfig, "family": str,
     "vision_layers": layers in the HF tower, "tied": bool, "image_token_index": int,
     "anyres": AnyRes kwargs}.
    Raises ValueError naming the field for anything not supported."""
    if cfg.get("model_type") != "llava_onevision":
        raise ValueError(f"{where}.model_type={cfg.get('model_type')!r}: expected 'llava_onevision'")
    vc = {**_VISION_DEFAULTS, **(cfg.get("vision_config") or {})}
    vw = f"{where}.vision_config"
    if vc.get("model_type", "siglip_vision_model") != "siglip_vision_model":
        raise ValueError(f"{vw}.model_type={vc['model_type']!r} is not supported (SigLIP only)")
    if vc["hidden_act"] not in _VISION_ACTS:
        raise ValueError(f"{vw}.hidden_act={vc['hidden_act']!r} is not supported; supported: {list(_VISION_ACTS)}")
    if vc["num_channels"] != 3:
        raise ValueError(f"{vw}.num_channels={vc['num_channels']} is not supported (RGB only)")
    n_vis = int(vc["num_hidden_layers"])
    layer = cfg.get("vision_feature_layer", -1)
    if not isinstance(layer, int):
        raise ValueError(f"{where}.vision_feature_layer={layer!r}: several feature layers (concatenated) are not "
                         "supported; give one layer index")
    depth = layer if layer >= 0 else n_vis + 1 + layer  # HF hidden_states[0] is the embedding output
    if not 1 <= depth <= n_vis:
        raise ValueError(f"{where}.vision_feature_layer={layer} must select one of the {n_vis} encoder layers' "
                         f"outputs (1..{n_vis} or -1..-{n_vis})")
    strategy = cfg.get("vision_feature_select_strategy", "full")
    if strategy != "full":
        raise ValueError(f"{where}.vision_feature_select_strategy={strategy!r} is not supported: 'default' drops the "
                         "first token as a CLS token, and SigLIP has none; only 'full' is")
    act = cfg.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"{where}.projector_hidden_act={act!r} is not supported (our projector uses exact GELU)")
    if not cfg.get("multimodal_projector_bias", True):
        raise ValueError(f"{where}.multimodal_projector_bias=false is not supported (our projector has biases)")
    text = dict(cfg.get("text_config") or {})
    if not text:
        raise ValueError(f"{where}.text_config is missing")
    text.setdefault("model_type", "qwen2")
    # As LlavaOnevisionConfig: the top-level flag, or the text config's, ties the embeddings.
    text["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
    decoder = decoder_config_from_hf(text, where=f"{where}.text_config")
    image_size, patch = int(vc["image_size"]), int(vc["patch_size"])
    vision = dict(image_size=image_size, patch_size=patch, width=int(vc["hidden_size"]), depth=depth,
                  n_heads=int(vc["num_attention_heads"]), mlp_dim=int(vc["intermediate_size"]),
                  norm_eps=float(vc["layer_norm_eps"]), act=_VISION_ACTS[vc["hidden_act"]])
    aspect = cfg.get("vision_aspect_ratio", "anyres_max_9")
    match = re.fullmatch(r"anyres_max_(\d+)", str(aspect))
    if match is None:
        raise ValueError(f"{where}.vision_aspect_ratio={aspect!r} is not supported; expected 'anyres_max_<N>'")
    pinpoints = cfg.get("image_grid_pinpoints") or default_pinpoints(image_size)
    anyres = dict(tile=image_size, patch=patch, max_tiles=int(match.group(1)), pinpoints=pinpoints)
    try:
        AnyRes(**anyres)
    except ValueError as e:
        raise ValueError(f"{where}.image_grid_pinpoints: {e}") from None
    return {"vision": vision, "decoder": decoder, "family": text["model_type"], "vision_layers": n_vis,
            "tied": decoder.tie_embeddings, "image_token_index": cfg.get("image_token_index", 151646),
            "anyres": anyres}


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------

_LEGACY_PREFIXES = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


def current_layout_name(name: str) -> str:
    """A tensor name in the current transformers layout (legacy llava-hf names rewritten)."""
    for old, new in _LEGACY_PREFIXES:
        if name.startswith(old):
            name = new + name[len(old):]
            break
    if name == "image_newline":
        name = "model.image_newline"
    if name.startswith("model.vision_tower.vision_model."):
        name = "model.vision_tower." + name[len("model.vision_tower.vision_model."):]
    return name


def _pos_embed(ts):
    return ts[0].unsqueeze(0)  # HF position_embedding (V, C) -> timm pos_embed (1, V, C)


def vision_rules(depth: int) -> List[WeightRule]:
    """SigLIP (HF, under model.vision_tower.) -> our vision.vit (timm), first `depth` layers."""
    c = WeightRule.copy
    per_layer = [
        c("blocks.{i}.norm1.weight", "encoder.layers.{i}.layer_norm1.weight"),
        c("blocks.{i}.norm1.bias", "encoder.layers.{i}.layer_norm1.bias"),
        WeightRule("blocks.{i}.attn.qkv.weight", tuple(f"encoder.layers.{{i}}.self_attn.{p}_proj.weight" for p in "qkv"),
                   _concat0),
        WeightRule("blocks.{i}.attn.qkv.bias", tuple(f"encoder.layers.{{i}}.self_attn.{p}_proj.bias" for p in "qkv"),
                   _concat0),
        c("blocks.{i}.attn.proj.weight", "encoder.layers.{i}.self_attn.out_proj.weight"),
        c("blocks.{i}.attn.proj.bias", "encoder.layers.{i}.self_attn.out_proj.bias"),
        c("blocks.{i}.norm2.weight", "encoder.layers.{i}.layer_norm2.weight"),
        c("blocks.{i}.norm2.bias", "encoder.layers.{i}.layer_norm2.bias"),
        c("blocks.{i}.mlp.fc1.weight", "encoder.layers.{i}.mlp.fc1.weight"),
        c("blocks.{i}.mlp.fc1.bias", "encoder.layers.{i}.mlp.fc1.bias"),
        c("blocks.{i}.mlp.fc2.weight", "encoder.layers.{i}.mlp.fc2.weight"),
        c("blocks.{i}.mlp.fc2.bias", "encoder.layers.{i}.mlp.fc2.bias"),
    ]
    rules = [
        c("patch_embed.proj.weight", "embeddings.patch_embedding.weight"),
        c("patch_embed.proj.bias", "embeddings.patch_embedding.bias"),
        WeightRule("pos_embed", ("embeddings.position_embedding.weight",), _pos_embed),
    ]
    return expand_rules(rules, 0, "vision.vit.", "model.vision_tower.") + expand_rules(
        per_layer, depth, "vision.vit.", "model.vision_tower.")


def llava_ov_rules(settings: dict) -> Tuple[List[WeightRule], List[str]]:
    """All rules (vision, projector, newline, decoder) and the known-unused name prefixes."""
    c = WeightRule.copy
    rules = vision_rules(settings["vision"]["depth"])
    rules += [c("projector.fc1.weight", "model.multi_modal_projector.linear_1.weight"),
              c("projector.fc1.bias", "model.multi_modal_projector.linear_1.bias"),
              c("projector.fc2.weight", "model.multi_modal_projector.linear_2.weight"),
              c("projector.fc2.bias", "model.multi_modal_projector.linear_2.bias"),
              c("image_newline", "model.image_newline")]
    dec_rules, dec_unused = decoder_rules_full(settings["family"], settings["decoder"].n_layers, settings["tied"],
                                               "decoder.", "model.language_model.", "lm_head.weight")
    # Documented drops: tower layers after the feature layer, the post-layernorm and pooling head
    # (LLaVA-OV reads a hidden state, before both).
    unused_prefixes = [f"model.vision_tower.encoder.layers.{i}." for i in
                       range(settings["vision"]["depth"], settings["vision_layers"])]
    unused_prefixes += ["model.vision_tower.post_layernorm.", "model.vision_tower.head."]
    return rules + dec_rules, dec_unused + unused_prefixes


def open_llava_ov_checkpoint(folder: Union[str, Path]) -> RenamedCheckpoint:
    return RenamedCheckpoint(HFCheckpoint(folder), current_layout_name, "tensor names in the current transformers layout")


def load_llava_ov_weights(model: VisorLVLM, ckpt: RenamedCheckpoint, settings: dict) -> List[str]:
    """Load every LLaVA-OV tensor into `model` (all or nothing), then initialise the cross
    sublayers from their host layers. The model's VISOR-new parameters (cross sublayers,
    positional conv, router) are not read from the checkpoint and keep their initialisation."""
    if model.image_newline is None:
        raise ValueError("the model was built with image_newline=False, but LLaVA-OneVision has one")
    rules, unused = llava_ov_rules(settings)
    names = ckpt.keys()
    known_unused = [k for k in names if any(k == u or (u.endswith(".") and k.startswith(u)) for u in unused)]
    known_unused += check_tied_head(ckpt, settings["tied"], "model.language_model.embed_tokens.weight", "lm_head.weight")
    aliases = {"decoder.lm_head.weight": "decoder.embed_tokens.weight"} if settings["tied"] else {}
    loaded = apply_rules(model, ckpt, rules, known_unused=known_unused, may_lack=model.new_tensor_names(),
                         aliases=aliases, what=f"{ckpt.folder} ({ckpt.note})")
    model.decoder.init_cross_from_host()
    return loaded


def llava_ov_from_hf(
    folder: Union[str, Path],
    plan: Optional[LayerPlan] = None,
    pos_conv: bool = False,
    cross_init: str = "host",
    token_reducer: Optional[TokenReducer] = None,
    policy_hidden: Optional[int] = None,
) -> Tuple[VisorLVLM, dict]:
    """Build a VisorLVLM from a LLaVA-OneVision checkpoint folder -> (model in eval mode, settings).

    plan: default all `self` (the original LVLM); pos_conv: add the zero-initialised visual
    positional conv (identity until trained)."""
    ckpt = open_llava_ov_checkpoint(folder)
    settings = llava_ov_settings(ckpt.config(), where=f"{Path(folder).name}/config.json")
    dc: DecoderConfig = settings["decoder"]
    plan = plan or LayerPlan(n_layers=dc.n_layers, all_self=True)
    model = VisorLVLM(SiglipVisionEncoder(**settings["vision"]), dc, plan, pos_conv=pos_conv,
                      token_reducer=token_reducer, cross_init=cross_init, policy_hidden=policy_hidden,
                      image_newline=True, anyres=None if token_reducer is not None else AnyRes(**settings["anyres"]))
    load_llava_ov_weights(model, ckpt, settings)
    return model.eval(), settings


def lvlm_init_args(model: VisorLVLM, vision_kwargs: Dict) -> dict:
    """The model as LightningCLI `init_args` (what configs/llava_ov_0.5b.yaml writes)."""
    anyres = None if model.anyres is None else dict(vars(model.anyres))
    return {"vision": {"class_path": "src.models.siglip.SiglipVisionEncoder", "init_args": dict(vision_kwargs)},
            "decoder": model.decoder.config.to_dict(), "image_newline": model.image_newline is not None,
            "anyres": anyres}
