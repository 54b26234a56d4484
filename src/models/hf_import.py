"""Import Hugging Face checkpoints (Qwen2 and Llama decoders) into our `Decoder`.

A checkpoint folder holds `config.json` and either one `model.safetensors` or shards listed in
`model.safetensors.index.json`. The import is an explicit weight map per family with layer-index
templates (as litgpt's `convert_hf_checkpoint`)::

    "model.layers.{i}.self_attn.q_proj.weight" -> "layers.{i}.attn.q_proj.weight"

and every tensor is accounted for: a checkpoint tensor the map does not name (and does not list as
known-unused), a tensor the map needs but the checkpoint lacks, or one whose shape differs from
our parameter, is an `HFImportError` listing the names. Nothing loads partially.

Config fields our decoder cannot express (rope scaling other than the default, sliding-window
attention, an MLP or output-projection bias, an activation other than SiLU, a head_dim other
than hidden_size / num_attention_heads) raise a ValueError naming the field.

The same machinery (`WeightRule`, `expand_rules`, `apply_rules`) maps the LLaVA-OneVision vision
tower and projector (src/models/llava_ov.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import torch
from safetensors import safe_open
from torch import nn

from src.models.decoder import Decoder, DecoderConfig
from src.models.plan import LayerPlan

SUPPORTED_FAMILIES = ("qwen2", "llama")
# Our presets per family (every field is set from config.json; the preset only names the family).
FAMILY_PRESET = {"qwen2": "qwen2-0.5b", "llama": "llama-3.2-1b"}


class HFImportError(ValueError):
    """Missing, unexpected or mis-shaped tensors in an import; the message lists their names."""


# ---------------------------------------------------------------------------------------------
# Reading a checkpoint folder
# ---------------------------------------------------------------------------------------------


class HFCheckpoint:
    """The tensors of a Hugging Face checkpoint folder, read lazily from safetensors.

    `keys()` lists every tensor name; `get(name)` reads one tensor (on the CPU, stored dtype)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder}: not a directory (expected a Hugging Face checkpoint folder)")
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.exists():
            weight_map = json.loads(index.read_text()).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ValueError(f"{index}: no 'weight_map' in the shard index")
            self._file_of: Dict[str, Path] = {k: self.folder / f for k, f in weight_map.items()}
            absent = sorted({str(p.name) for p in self._file_of.values() if not p.exists()})
            if absent:
                raise FileNotFoundError(f"{index} lists shards that are not in {self.folder}: {absent}")
        elif single.exists():
            with safe_open(str(single), framework="pt") as f:
                self._file_of = {k: single for k in f.keys()}
        else:
            others = sorted(p.name for p in self.folder.glob("*.bin")) + sorted(p.name for p in self.folder.glob("*.pt*"))
            hint = f" (found {others}: only safetensors checkpoints are read)" if others else ""
            raise FileNotFoundError(f"{self.folder}: neither model.safetensors nor model.safetensors.index.json{hint}")
        self._handles: Dict[Path, object] = {}

    def config(self) -> dict:
        path = self.folder / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        return json.loads(path.read_text())

    def keys(self) -> Set[str]:
        return set(self._file_of)

    def get(self, name: str) -> torch.Tensor:
        path = self._file_of[name]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path].get_tensor(name)

    def shape(self, name: str) -> Tuple[int, ...]:
        path = self._file_of[name]
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return tuple(self._handles[path].get_slice(name).get_shape())


class RenamedCheckpoint:
    """A view of a checkpoint with its tensor names rewritten by `rename(name) -> name`
    (e.g. a legacy LLaVA layout onto the current one). Same interface as HFCheckpoint."""

    def __init__(self, base: HFCheckpoint, rename: Callable[[str], str], note: str = "renamed") -> None:
        self.base, self.folder, self.note = base, base.folder, note
        self._source: Dict[str, str] = {}
        for k in sorted(base.keys()):
            new = rename(k)
            if new in self._source:
                raise HFImportError(f"{base.folder}: tensors {self._source[new]!r} and {k!r} both map to {new!r}")
            self._source[new] = k

    def config(self) -> dict:
        return self.base.config()

    def keys(self) -> Set[str]:
        return set(self._source)

    def get(self, name: str) -> torch.Tensor:
        return self.base.get(self._source[name])

    def shape(self, name: str) -> Tuple[int, ...]:
        return self.base.shape(self._source[name])


# ---------------------------------------------------------------------------------------------
# Weight maps
# ---------------------------------------------------------------------------------------------


def _copy(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    return ts[0]


def _concat0(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Fuse projections along the output dimension (e.g. q, k, v -> qkv)."""
    return torch.cat(list(ts), dim=0)


@dataclass(frozen=True)
class WeightRule:
    """Our tensor `ours` is `combine([checkpoint tensors `theirs`...])`; names may hold `{i}`
    (the layer index), expanded for every layer. `combine` defaults to a plain copy."""

    ours: str
    theirs: Tuple[str, ...]
    combine: Callable[[Sequence[torch.Tensor]], torch.Tensor] = _copy

    @staticmethod
    def copy(ours: str, theirs: str) -> "WeightRule":
        return WeightRule(ours, (theirs,))


def expand_rules(rules: Iterable[WeightRule], n_layers: int, our_prefix: str = "", their_prefix: str = "") -> List[WeightRule]:
    """Rules with `{i}` expanded over range(n_layers) and the prefixes prepended."""
    out = []
    for r in rules:
        indices = range(n_layers) if "{i}" in r.ours or any("{i}" in t for t in r.theirs) else [None]
        for i in indices:
            fmt = (lambda s: s.format(i=i)) if i is not None else (lambda s: s)
            out.append(WeightRule(our_prefix + fmt(r.ours), tuple(their_prefix + fmt(t) for t in r.theirs), r.combine))
    return out


def decoder_rules(family: str) -> List[WeightRule]:
    """The weight map of a Qwen2/Llama causal LM body onto our Decoder, names relative to the LM
    body (HF `Qwen2Model`/`LlamaModel`, i.e. without the `model.` prefix) and to our Decoder.
    The `lm_head` is mapped by the caller (its name differs between a causal LM and LLaVA)."""
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(f"model_type: {family!r} is not supported; supported: {list(SUPPORTED_FAMILIES)}")
    c = WeightRule.copy
    rules = [
        c("embed_tokens.weight", "embed_tokens.weight"),
        c("layers.{i}.input_norm.weight", "layers.{i}.input_layernorm.weight"),
        c("layers.{i}.attn.q_proj.weight", "layers.{i}.self_attn.q_proj.weight"),
        c("layers.{i}.attn.k_proj.weight", "layers.{i}.self_attn.k_proj.weight"),
        c("layers.{i}.attn.v_proj.weight", "layers.{i}.self_attn.v_proj.weight"),
        c("layers.{i}.attn.o_proj.weight", "layers.{i}.self_attn.o_proj.weight"),
        c("layers.{i}.post_attn_norm.weight", "layers.{i}.post_attention_layernorm.weight"),
        c("layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.gate_proj.weight"),
        c("layers.{i}.mlp.up_proj.weight", "layers.{i}.mlp.up_proj.weight"),
        c("layers.{i}.mlp.down_proj.weight", "layers.{i}.mlp.down_proj.weight"),
        c("norm.weight", "norm.weight"),
    ]
    if family == "qwen2":  # Qwen2: bias on q, k, v (not on o_proj)
        rules += [c(f"layers.{{i}}.attn.{p}_proj.bias", f"layers.{{i}}.self_attn.{p}_proj.bias") for p in "qkv"]
    return rules


# Tensors some checkpoints carry that hold no weights (recomputed buffers); never "unexpected".
DECODER_KNOWN_UNUSED = ("layers.{i}.self_attn.rotary_emb.inv_freq", "rotary_emb.inv_freq")


def apply_rules(
    module: nn.Module,
    ckpt,
    rules: Sequence[WeightRule],
    known_unused: Iterable[str] = (),
    may_lack: Iterable[str] = (),
    aliases: Mapping[str, str] = None,
    what: str = "checkpoint",
) -> List[str]:
    """Load `module`'s state from `ckpt` by `rules` (already expanded), all or nothing.

    known_unused: checkpoint names that may be present and are not loaded (documented drops);
    may_lack: our state names the rules need not cover (parameters new to VISOR; they keep their init);
    aliases: {our name: the name it shares storage with} (tied weights), not loaded twice.
    Raises HFImportError listing missing / unexpected / mis-shaped tensors; returns the names loaded."""
    aliases = dict(aliases or {})
    target = module.state_dict()
    present = ckpt.keys()
    ours_needed = {k for k in target if k not in aliases and k not in set(may_lack)}
    by_ours = {}
    for r in rules:
        if r.ours in by_ours:
            raise ValueError(f"weight map lists {r.ours!r} twice")
        by_ours[r.ours] = r
    needed_theirs = {t for r in rules for t in r.theirs}
    missing = sorted(t for t in needed_theirs if t not in present)
    unmapped = sorted(ours_needed - set(by_ours))  # our tensors nothing in the map fills
    stray = sorted(k for k in by_ours if k not in target)  # the map names a tensor we lack
    unexpected = sorted(present - needed_theirs - set(known_unused))
    misshaped = []
    built: Dict[str, torch.Tensor] = {}
    if not stray:
        for k, r in by_ours.items():
            if any(t not in present for t in r.theirs):
                continue
            bad = [f"{t} {ckpt.shape(t)}" for t in r.theirs]
            value = None
            try:
                value = r.combine([ckpt.get(t) for t in r.theirs])
            except RuntimeError:  # e.g. qkv pieces whose widths cannot be concatenated
                pass
            if value is None or tuple(value.shape) != tuple(target[k].shape):
                got = tuple(value.shape) if value is not None else "incompatible"
                misshaped.append(f"{', '.join(bad)} -> {k}: got {got}, model expects {tuple(target[k].shape)}")
            else:
                built[k] = value
    if missing or unexpected or misshaped or unmapped or stray:
        parts = [f"{what} does not fit the model:"]
        for label, names in (("missing from the checkpoint", missing), ("unexpected in the checkpoint", unexpected),
                             ("mis-shaped", misshaped), ("model tensors the weight map does not fill", unmapped),
                             ("weight map names tensors the model lacks", stray)):
            if names:
                parts.append(f"  {label} ({len(names)}): {names}")
        raise HFImportError("\n".join(parts))
    with torch.no_grad():
        for k, v in built.items():
            target[k].copy_(v.to(target[k].dtype))
    return sorted(built)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def _require(cfg: dict, key: str, where: str):
    if key not in cfg or cfg[key] is None:
        raise ValueError(f"{where}.{key} is missing")
    return cfg[key]


def rope_theta_from_hf(cfg: dict, where: str = "config") -> float:
    """RoPE base from transformers-5 `rope_parameters` or the older `rope_theta`/`rope_scaling`;
    any rope type but the default (linear, dynamic, yarn, llama3, longrope, ...) is rejected."""
    params = cfg.get("rope_parameters")
    scaling = cfg.get("rope_scaling")
    if scaling is not None:  # the older field; checked even beside rope_parameters
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
        if kind not in (None, "default"):
            raise ValueError(f"{where}.rope_scaling={scaling!r} is not supported (only the default RoPE)")
    theta = cfg.get("rope_theta", 10000.0)
    if params is not None:
        if not isinstance(params, dict) or (params and all(isinstance(v, dict) for v in params.values())):
            raise ValueError(f"{where}.rope_parameters: per-layer-type rope parameters are not supported, got {params!r}")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in (None, "default"):
            raise ValueError(f"{where}.rope_parameters.rope_type={kind!r} is not supported (only the default RoPE)")
        factor = params.get("partial_rotary_factor", 1.0)
        if factor != 1.0:
            raise ValueError(f"{where}.rope_parameters.partial_rotary_factor={factor} is not supported (full RoPE only)")
        theta = params.get("rope_theta", theta)
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{where}.partial_rotary_factor={cfg['partial_rotary_factor']} is not supported (full RoPE only)")
    return float(theta)


def decoder_config_from_hf(cfg: dict, where: str = "config.json") -> DecoderConfig:
    """A DecoderConfig from a Qwen2/Llama `config.json` dict (or a LLaVA `text_config`).

    Raises ValueError naming the field for anything our decoder cannot express."""
    family = cfg.get("model_type")
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(f"{where}.model_type={family!r} is not supported; supported: {list(SUPPORTED_FAMILIES)}")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{where}.hidden_act={act!r} is not supported (our MLP is SwiGLU with SiLU)")
    if cfg.get("mlp_bias", False):
        raise ValueError(f"{where}.mlp_bias=true is not supported (our MLP has no bias)")
    if family == "llama":
        if cfg.get("attention_bias", False):
            raise ValueError(f"{where}.attention_bias=true is not supported for llama (it also biases o_proj, "
                             "which our decoder lacks)")
        qkv_bias = False
    else:
        qkv_bias = True  # Qwen2 always biases q, k, v
    if cfg.get("use_sliding_window", False):
        raise ValueError(f"{where}.use_sliding_window=true is not supported (full causal attention only)")
    layer_types = cfg.get("layer_types")
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        raise ValueError(f"{where}.layer_types={layer_types} is not supported (full_attention layers only)")
    d_model = int(_require(cfg, "hidden_size", where))
    n_heads = int(_require(cfg, "num_attention_heads", where))
    n_kv = cfg.get("num_key_value_heads") or n_heads
    head_dim = cfg.get("head_dim")
    if head_dim is not None and n_heads and int(head_dim) * n_heads != d_model:
        raise ValueError(f"{where}.head_dim={head_dim} is not supported: our decoder needs head_dim = hidden_size / "
                         f"num_attention_heads = {d_model}/{n_heads}")
    return DecoderConfig(
        preset=FAMILY_PRESET[family],
        vocab_size=int(_require(cfg, "vocab_size", where)),
        n_layers=int(_require(cfg, "num_hidden_layers", where)),
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=int(n_kv),
        intermediate_size=int(_require(cfg, "intermediate_size", where)),
        rope_theta=rope_theta_from_hf(cfg, where),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        qkv_bias=qkv_bias,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


# ---------------------------------------------------------------------------------------------
# Loading a decoder
# ---------------------------------------------------------------------------------------------


def decoder_rules_full(family: str, n_layers: int, tied: bool, our_prefix: str = "", body_prefix: str = "model.",
                       head_name: str = "lm_head.weight") -> Tuple[List[WeightRule], List[str]]:
    """Expanded rules and known-unused names for a whole causal LM (body + lm_head).

    body_prefix: where the LM body sits in the checkpoint (`model.` for Qwen2ForCausalLM,
    `model.language_model.` in LLaVA-OneVision); head_name: the output projection's name."""
    rules = expand_rules(decoder_rules(family), n_layers, our_prefix, body_prefix)
    if not tied:
        rules.append(WeightRule.copy(our_prefix + "lm_head.weight", head_name))
    unused = [r.format(i=i) for r in DECODER_KNOWN_UNUSED for i in range(n_layers)]
    return rules, [body_prefix + u for u in unused]


def check_tied_head(ckpt, tied: bool, embed_name: str, head_name: str) -> List[str]:
    """A tied model may still find `lm_head` in the checkpoint: accepted (and skipped) only when it
    equals the embedding. Returns the names to treat as known-unused."""
    if not tied or head_name not in ckpt.keys() or embed_name not in ckpt.keys():
        return []
    if not torch.equal(ckpt.get(head_name), ckpt.get(embed_name)):
        raise HFImportError(f"tie_word_embeddings is true but {head_name} differs from {embed_name}: "
                            "our tied decoder cannot hold both")
    return [head_name]


def load_hf_decoder_weights(decoder: Decoder, ckpt, family: str, body_prefix: str = "model.",
                            head_name: str = "lm_head.weight", extra_unused: Iterable[str] = ()) -> List[str]:
    """Load a Qwen2/Llama LM from `ckpt` (HFCheckpoint) into `decoder`, all or nothing, then copy
    host attention into the cross sublayers (cross_init='host'). Cross sublayers are new and not
    read from the checkpoint. Returns the decoder names loaded."""
    c = decoder.config
    rules, unused = decoder_rules_full(family, c.n_layers, c.tie_embeddings, "", body_prefix, head_name)
    unused += check_tied_head(ckpt, c.tie_embeddings, body_prefix + "embed_tokens.weight", head_name)
    new = [k for k in decoder.state_dict() if any(k.startswith(p) for p in decoder.new_parameter_prefixes())]
    aliases = {"lm_head.weight": "embed_tokens.weight"} if c.tie_embeddings else {}
    loaded = apply_rules(decoder, ckpt, rules, known_unused=[*unused, *extra_unused], may_lack=new,
                         aliases=aliases, what=f"{ckpt.folder}")
    decoder.init_cross_from_host()
    return loaded


def decoder_from_hf(folder: str | Path, plan: Optional[LayerPlan] = None, cross_init: str = "host") -> Decoder:
    """Build our Decoder from a Qwen2ForCausalLM / LlamaForCausalLM checkpoint folder.

    plan: the layer plan (default: all `self`, i.e. the original LLM)."""
    ckpt = HFCheckpoint(folder)
    cfg = ckpt.config()
    dc = decoder_config_from_hf(cfg, where=f"{Path(folder).name}/config.json")
    plan = plan or LayerPlan(n_layers=dc.n_layers, all_self=True)
    decoder = Decoder(dc, plan, cross_init)
    load_hf_decoder_weights(decoder, ckpt, cfg["model_type"])
    return decoder.eval()
