"""A Llama/Qwen2-family decoder driven by a VISOR LayerPlan, top to bottom in one file.

RMSNorm, RoPE (configurable theta), GQA, SwiGLU, optional qkv bias, optional tied embeddings.
Sequence layout is the original LVLM's: `image_at` text tokens (a chat template's start and first
user-turn head; 0: the image comes first), the visual tokens, then the rest of the text, with RoPE
positions in that order in every layer kind and a causal mask over the whole sequence. The decoder
keeps the visual and the text tokens as two streams, (B, V, d) and (B, T, d), the text stream
holding the tokens before the image at its head.

Per layer kind (see LayerPlan):
  self  : the ordinary layer over the whole sequence, in order  (visual tokens updated)
  cross : text after the image += gated cross-attn(text -> visual), then the ordinary layer over
          text only (the text before the image does not read it, as in the original causal order)
  text  : the ordinary layer over text only                      (visual tokens not read)
Text tokens are right-padded, so the causal mask alone keeps valid queries off padded keys.

`Decoder.run_layers` is the model's one layer loop: training, the prefill (which fills a KVCache,
src/models/kv_cache.py) and each cached decode step (which reads it) all go through it, so the
plan, the per-sample budgets, the gated gather/scatter and FastV are read in one place.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Dict, List, Optional, Set, Tuple, Union

import torch
from torch import nn
import torch.nn.functional as F
import torch.utils.checkpoint

from src.models.cross_attention import CrossAttention
from src.models.norm import RMSNorm
from src.models.plan import LayerPlan
from src.models.rope import apply_rope, rope_cos_sin
from src.models.token_reduction import FastVReducer
from src.models.kv_cache import KVCache, RowCache
from src.ops.attention import causal_self_attention, decode_attention
from src.ops.layer_skip import gather_rows, scatter_add_rows

# ---------------------------------------------------------------------------------------------
# Config with named presets (as litgpt's Config.from_name)
# ---------------------------------------------------------------------------------------------

PRESETS: Dict[str, dict] = {
    # The embedded default: small enough to train on 2 CPU cores.
    "tiny": dict(vocab_size=64, n_layers=6, d_model=128, n_heads=4, n_kv_heads=2, intermediate_size=352,
                 rope_theta=10000.0, norm_eps=1e-6, qkv_bias=True, tie_embeddings=True),
    # Shape of Qwen2-0.5B (LLaVA-OneVision-0.5B's LLM), for benchmarks and real checkpoints.
    "qwen2-0.5b": dict(vocab_size=151936, n_layers=24, d_model=896, n_heads=14, n_kv_heads=2,
                       intermediate_size=4864, rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True,
                       tie_embeddings=True),
    # Shape of Llama-3.2-1B (its llama3 rope scaling is not implemented: shapes only).
    "llama-3.2-1b": dict(vocab_size=128256, n_layers=16, d_model=2048, n_heads=32, n_kv_heads=8,
                         intermediate_size=8192, rope_theta=500000.0, norm_eps=1e-5, qkv_bias=False,
                         tie_embeddings=True),
}


@dataclass
class DecoderConfig:
    """Decoder hyper-parameters. Fields left None take the preset's value."""

    preset: str = "tiny"
    vocab_size: Optional[int] = None
    n_layers: Optional[int] = None
    d_model: Optional[int] = None
    n_heads: Optional[int] = None
    n_kv_heads: Optional[int] = None
    intermediate_size: Optional[int] = None
    rope_theta: Optional[float] = None
    norm_eps: Optional[float] = None
    qkv_bias: Optional[bool] = None
    tie_embeddings: Optional[bool] = None

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"decoder.preset: unknown preset {self.preset!r}; known: {sorted(PRESETS)}")
        for key, value in PRESETS[self.preset].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        for key in ("vocab_size", "n_layers", "d_model", "n_heads", "n_kv_heads", "intermediate_size"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"decoder.{key} must be a positive integer, got {getattr(self, key)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"decoder.d_model={self.d_model} is not divisible by decoder.n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"decoder.d_model / decoder.n_heads = {self.head_dim} must be even (RoPE rotates pairs)")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"decoder.n_heads={self.n_heads} is not a multiple of decoder.n_kv_heads={self.n_kv_heads}"
            )
        if self.rope_theta <= 0:
            raise ValueError(f"decoder.rope_theta must be > 0, got {self.rope_theta}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# ---------------------------------------------------------------------------------------------
# The ordinary decoder layer
# ---------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    def __init__(self, c: DecoderConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.d_model, c.n_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Optional[RowCache] = None,
                slots: Optional[torch.Tensor] = None, key_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, S, d), cos/sin (S, hd) or (B or 1, 1, S, hd) -> (B, S, d).

        Without `slots`: causal over the S tokens (they fill cache slots 0..S-1 when a cache is given).
        With slots (B,) int64 and S = 1 (a decode step): the token is stored at its slot and attends
        to the cached slots up to it. key_valid (B, S), or (B, cache slots) at a decode step, bool:
        the keys that may be seen at all (None: every one; see `causal_self_attention`)."""
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, S, hd)
        k = self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, hd)
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, S, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            cache.write(k, v, slots)
        if slots is None:
            y = causal_self_attention(q, k, v, key_valid)  # (B, H, S, hd)
        else:
            n = int(slots.max()) + 1
            y = decode_attention(q, cache.k[:, :, :n], cache.v[:, :, :n], slots + 1,
                                 None if key_valid is None else key_valid[:, :n])  # (B, H, 1, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))


class SwiGLU(nn.Module):
    def __init__(self, c: DecoderConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.d_model, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.d_model, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, d) -> (B, S, d)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: DecoderConfig) -> None:
        super().__init__()
        self.input_norm = RMSNorm(c.d_model, c.norm_eps)
        self.attn = SelfAttention(c)
        self.post_attn_norm = RMSNorm(c.d_model, c.norm_eps)
        self.mlp = SwiGLU(c)
        # Activation checkpointing (set by src.lit.distributed.shard_lvlm): training keeps only the
        # layer's input and recomputes the rest in backward.
        self.checkpointed = False

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Optional[RowCache] = None,
                slots: Optional[torch.Tensor] = None, key_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, S, d) -> (B, S, d); cache/slots/key_valid: see SelfAttention."""
        if self.checkpointed and cache is None and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, cos, sin, None, slots, key_valid,
                                                     use_reentrant=False)
        return self._forward(x, cos, sin, cache, slots, key_valid)

    def _forward(self, x, cos, sin, cache, slots, key_valid) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x), cos, sin, cache, slots, key_valid)
        return x + self.mlp(self.post_attn_norm(x))


# ---------------------------------------------------------------------------------------------
# The decoder
# ---------------------------------------------------------------------------------------------


def _in_sequence_order(streams: torch.Tensor, V: int, image_at: int, dim: int) -> torch.Tensor:
    """A tensor in stream order [visual (V); text] along `dim` -> the sequence's own order:
    text[:image_at], visual, text[image_at:] (so a causal mask over it is the original model's).
    image_at = 0: the same tensor."""
    if not image_at:
        return streams
    visual, head, tail = streams.split([V, image_at, streams.shape[dim] - V - image_at], dim)
    return torch.cat([head, visual, tail], dim)


class Decoder(nn.Module):
    """`fastv`: an in-LLM token drop (FastVReducer) run before layer `fastv.layer`; `cross_rope`:
    the cross sublayers rotate queries and keys at their original positions (see CrossAttention)."""

    def __init__(self, config: DecoderConfig, plan: LayerPlan, cross_init: str = "host",
                 fastv: Optional[FastVReducer] = None, cross_rope: bool = False) -> None:
        super().__init__()
        if plan.n_layers != config.n_layers:
            raise ValueError(f"plan.n_layers={plan.n_layers} differs from decoder.n_layers={config.n_layers}")
        if cross_init not in ("host", "random"):
            raise ValueError(f"cross_init must be 'host' or 'random', got {cross_init!r}")
        if fastv is not None:
            K = fastv.layer
            if K >= plan.n_layers:
                raise ValueError(f"token_reducer.layer={K} must be < the number of layers ({plan.n_layers})")
            prev = plan.kinds[K - 1]
            if prev == "text" or (K - 1 in plan.optional_self and plan.skip_kind == "text"):
                raise ValueError(f"token_reducer.layer={K}: layer {K - 1} must read the visual tokens (self or cross "
                                 f"in every budget) to rank them, it is {prev!r} (skip kind {plan.skip_kind!r})")
        self.config, self.plan, self.fastv = config, plan, fastv
        c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.d_model)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.n_layers))
        # Cross sublayers exist at `cross` layers (and at optional self layers whose skip kind is
        # `cross`); keyed by layer index.
        self.cross = nn.ModuleDict(
            {str(i): CrossAttention(c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.qkv_bias, c.norm_eps,
                                    rope=cross_rope)
             for i in plan.cross_sublayers}
        )
        self.register_buffer("budget_members", plan.members(), persistent=False)  # (n_budgets, n_layers) bool
        self.norm = RMSNorm(c.d_model, c.norm_eps)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.apply(self._init_weights)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.cross_init = cross_init
        self.init_cross_from_host()
        # Sharded training (FSDP) all-gathers a layer's weights each time the layer is entered, so
        # every rank must enter it as often as the others whatever its samples' budgets: with
        # per-sample budgets an optional self layer then always runs as two row groups, one of them
        # possibly empty. Set by src.lit.distributed.shard_lvlm.
        self.same_calls_on_every_rank = False

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def init_cross_from_host(self, only: Optional[Set[str]] = None) -> None:
        """Copy each host layer's attention into its cross sublayer (no-op for cross_init='random');
        `only`: the layer keys to initialise (default all).

        Call again after loading base weights into the host layers."""
        if self.cross_init != "host":
            return
        for key, cross in self.cross.items():
            if only is not None and key not in only:
                continue
            host = self.layers[int(key)]
            cross.init_from_host(host.attn, host.input_norm)

    @staticmethod
    def positions(V: int, T: int, device: torch.device, visual_positions: Optional[torch.Tensor] = None,
                  text_start: Optional[Union[int, torch.Tensor]] = None, image_at: int = 0) -> torch.Tensor:
        """RoPE positions of the two streams [visual; text] -> (N, V+T) int64, N = 1 or B.

        The sequence is text[:image_at], the image, text[image_at:]. Default (image_at = 0): visual
        0..V-1, text V... `visual_positions` (B, V): the visual tokens' own positions within the image
        (kept tokens of a token reducer keep their original ones); `text_start`: the positions the
        image spans, one for all (default V) or (B,) per sample (AnyRes images of different token
        counts): text slot t >= image_at sits at text_start + t, slot t < image_at at t, and the
        image at image_at + its own positions."""
        assert 0 <= image_at <= T, f"image_at must be in [0, T={T}], got {image_at}"
        text_start = V if text_start is None else text_start
        if isinstance(text_start, torch.Tensor):
            assert text_start.dim() == 1, f"text_start must be an int or (B,), got {tuple(text_start.shape)}"
            text_pos = text_start.to(device)[:, None] + torch.arange(T, device=device)  # (B, T)
        else:
            text_pos = torch.arange(text_start, text_start + T, device=device)[None]  # (1, T)
        if image_at:
            text_pos = torch.cat([torch.arange(image_at, device=device)[None].expand(text_pos.shape[0], -1),
                                  text_pos[:, image_at:]], dim=1)
        if visual_positions is None:
            visual_positions = torch.arange(V, device=device)[None]
        assert visual_positions.dim() == 2 and visual_positions.shape[1] == V, (
            f"visual_positions must be (B, V={V}), got {tuple(visual_positions.shape)}")
        N = max(visual_positions.shape[0], text_pos.shape[0])
        return torch.cat([visual_positions.expand(N, -1) + image_at, text_pos.expand(N, -1)], dim=1)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """positions (N, S) -> cos, sin (N, 1, S, hd) (N = 1 or B; broadcast over heads)."""
        cos, sin = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, dtype)
        return cos.unsqueeze(1), sin.unsqueeze(1)

    def forward(
        self,
        visual: torch.Tensor,
        text: torch.Tensor,
        visual_kv_lens: Optional[torch.Tensor] = None,
        budget: Optional[Union[int, torch.Tensor]] = None,
        positions: Optional[torch.Tensor] = None,
        query_index: Optional[torch.Tensor] = None,
        image_at: int = 0,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Run the plan.

        visual (B, V, d): projected visual tokens; text (B, T, d): embedded text tokens;
        visual_kv_lens (B,) or None: valid visual tokens per sample, padding after them (hidden from every attention);
        budget: None (the largest), a budget index for the whole batch, or (B,) int64 indices;
        positions (N, V+T) from `positions` (default: 0..V+T-1); query_index (B,) int64: the
        last prompt token per sample, whose attention ranks visual tokens for fastv (default T-1);
        image_at: text tokens before the image (see the module docstring).
        Returns (text hidden states after the final norm (B, T, d), visual hidden states (B, V', d);
        V' < V after a fastv drop).
        """
        if positions is None:
            positions = self.positions(visual.shape[1], text.shape[1], text.device, image_at=image_at)
        visual, text, _ = self.run_layers(visual, text, 0, self.config.n_layers, positions, budget,
                                          visual_kv_lens, query_index, image_at=image_at)
        return self.norm(text), visual

    def run_layers(
        self,
        visual: torch.Tensor,
        text: torch.Tensor,
        start: int,
        end: int,
        positions: torch.Tensor,
        budget: Optional[Union[int, torch.Tensor]] = None,
        visual_kv_lens: Optional[torch.Tensor] = None,
        query_index: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        image_at: int = 0,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layers [start, end) -> (visual (B, V', d), text (B, T, d), positions (N, V'+T)), no final norm.

        The one layer loop of the model: training, prefill and cached decoding all run here.
        positions (N, V+T) from `positions`. An optional self layer takes the self path for the
        samples whose budget includes it and its `skip_kind` for the others: with mixed budgets each
        group's rows are gathered, run and scattered back with the residual, so a sample does only
        the work of its own path. With `fastv`, layer K-1's attention from the query token ranks the
        visual tokens and layers K.. see only the kept ones, at their own positions.

        cache: None (no cache); a KVCache holding fewer than `end` layers: a prefill, which appends
        each layer's row groups (budgets fixed from here on); a full one: a decode step, text (B, 1, d)
        the new token per sample at text slot cache.lengths, visual (B, 0, d), positions (B, 1) its
        RoPE position; the row groups, the visual K/V, the visual lengths and `image_at` come from the cache.
        image_at: the text tokens before the image (the first image_at rows of `text`; see the module
        docstring); a prefill records it in the cache.
        """
        assert visual.dim() == 3 and text.dim() == 3, "visual (B, V, d) and text (B, T, d) expected"
        assert visual.shape[0] == text.shape[0] and visual.shape[2] == text.shape[2] == self.config.d_model
        B, T = visual.shape[0], text.shape[1]
        assert positions.dim() == 2 and positions.shape[0] in (1, B) and positions.shape[1] == visual.shape[1] + T, (
            f"positions must be (1 or B, V+T) = (1 or {B}, {visual.shape[1] + T}), got {tuple(positions.shape)}")
        decoding = cache is not None and len(cache.layers) == self.config.n_layers
        slots = None
        if decoding:
            assert visual.shape[1] == 0 and T == 1, "a decode step: visual (B, 0, d), text (B, 1, d)"
            assert cache.lengths.shape == (B,), f"the cache holds {cache.lengths.shape[0]} samples, not {B}"
            slots = cache.lengths
            if int(slots.max()) >= cache.capacity:
                raise RuntimeError(f"KV cache full: {cache.capacity} text slots per sample")
            visual_kv_lens, image_at = cache.visual_lens, cache.image_at
        else:
            assert 0 <= image_at <= T, f"image_at must be in [0, T={T}], got {image_at}"
            if cache is not None:
                assert len(cache.layers) == start, f"the cache holds {len(cache.layers)} layers, the prefill starts at {start}"
                cache.image_at = image_at
        if query_index is None:
            query_index = torch.full((B,), T - 1, dtype=torch.long, device=text.device)
        assert query_index.shape == (B,), f"query_index must be (B,) = ({B},), got {tuple(query_index.shape)}"
        active = None if decoding else self._active(budget, B, text.device)  # (B, n_layers) bool
        per_sample = isinstance(budget, torch.Tensor)
        cos, sin = self.rope(positions, text.dtype)
        for i in range(start, end):
            if decoding:  # a group left empty at prefill (`same_calls_on_every_rank`) has nothing to decode
                caches = [rc for rc in cache.layers[i] if rc.rows is None or rc.rows.numel()]
                groups = [(rc.kind, rc.rows) for rc in caches]
            else:
                groups = self._groups(i, active, per_sample)
                caches = None if cache is None else [self._new_row_cache(kind, rows, visual, cache) for kind, rows in groups]
            scores = None
            if self.fastv is not None and i == self.fastv.layer - 1 and not decoding:
                if visual_kv_lens is not None:
                    raise NotImplementedError("fastv with per-sample visual lengths (visual_kv_lens)")
                self_on = (active[:, i] if i in self.plan.optional_self
                           else torch.full((B,), self.plan.kinds[i] == "self", device=text.device))
                scores = self._visual_attention(i, self_on, visual, text, cos, sin, query_index)
            visual, text = self._run_groups(i, groups, visual, text, cos, sin, visual_kv_lens, caches, slots, image_at)
            if cache is not None and not decoding:
                cache.layers.append(caches)
            if scores is not None:
                keep = self.fastv.select(scores)  # (B, V') ascending
                visual = visual.gather(1, keep.unsqueeze(-1).expand(-1, -1, visual.shape[-1]))
                vis_pos = positions[:, : scores.shape[1]].expand(B, -1).gather(1, keep)
                positions = torch.cat([vis_pos, positions[:, scores.shape[1]:].expand(B, -1)], dim=1)
                cos, sin = self.rope(positions, text.dtype)
        if decoding:
            cache.lengths = cache.lengths + 1
        return visual, text, positions

    def _visual_attention(self, i: int, self_on: torch.Tensor, visual, text, cos, sin, query_index) -> torch.Tensor:
        """(B, V): attention (softmax probabilities, mean over heads) the query token of each sample
        gives each visual token at layer i, with the same weights and positions the layer uses:
        self path -> the layer's causal self-attention over [visual; text]; cross path -> its cross
        sublayer over the visual tokens. self_on (B,) bool: which samples take the self path."""
        B, V, d = visual.shape
        T = text.shape[1]
        c = self.config
        rows = torch.arange(B, device=text.device)
        q_tok = text[rows, query_index].unsqueeze(1)  # (B, 1, d)
        G = c.n_heads // c.n_kv_heads
        scores = visual.new_zeros(B, V, dtype=torch.float32)
        cos_q = cos.expand(B, -1, -1, -1)[rows, :, V + query_index].unsqueeze(2)  # (B, 1, 1, hd)
        sin_q = sin.expand(B, -1, -1, -1)[rows, :, V + query_index].unsqueeze(2)
        if bool(self_on.any()):
            layer = self.layers[i]
            x = layer.input_norm(torch.cat([visual, text], dim=1))  # (B, S, d)
            q = layer.attn.q_proj(x[rows, V + query_index].unsqueeze(1)).view(B, 1, c.n_heads, c.head_dim).transpose(1, 2)
            k = layer.attn.k_proj(x).view(B, V + T, c.n_kv_heads, c.head_dim).transpose(1, 2)  # (B, Hkv, S, hd)
            q, k = apply_rope(q, cos_q, sin_q), apply_rope(k, cos, sin)
            logits = q @ k.repeat_interleave(G, dim=1).transpose(-1, -2) / math.sqrt(c.head_dim)  # (B, H, 1, S)
            future = torch.arange(V + T, device=text.device) > (V + query_index)[:, None]  # (B, S) causal
            probs = logits.float().masked_fill(future[:, None, None, :], float("-inf")).softmax(-1)
            scores = torch.where(self_on[:, None], probs[:, :, 0, :V].mean(1), scores)
        if not bool(self_on.all()):
            cross = self.cross[str(i)]
            q = cross.queries(q_tok, cos_q, sin_q)  # (B, H, 1, hd)
            k = cross.visual_keys(visual, cos[..., :V, :], sin[..., :V, :])  # (B, Hkv, V, hd)
            logits = q @ k.repeat_interleave(G, dim=1).transpose(-1, -2) / math.sqrt(c.head_dim)  # (B, H, 1, V)
            scores = torch.where(self_on[:, None], scores, logits.float().softmax(-1)[:, :, 0].mean(1))
        return scores

    def _active(self, budget, B: int, device: torch.device) -> torch.Tensor:
        """(B, n_layers) bool: optional self layers on per sample (budget None: the largest)."""
        if budget is None or isinstance(budget, int):  # one budget for all: a broadcast row, no gather
            return self.budget_members[self.plan.budget_index(budget)].to(device).expand(B, -1)
        return self.budget_members.to(device)[self.plan.resolve(budget, B, device)]

    def visual_tokens_per_layer(self, V: int) -> List[int]:
        """Visual tokens each layer sees for an image of V: V, fewer from FastV's layer on."""
        n = self.config.n_layers
        if self.fastv is None:
            return [V] * n
        return [V] * self.fastv.layer + [self.fastv.n_kept(V)] * (n - self.fastv.layer)

    def _groups(self, i: int, active: torch.Tensor, per_sample: bool) -> List[Tuple[str, Optional[torch.Tensor]]]:
        """Layer i's row groups [(kind, rows (B_g,) int64 or None for every sample)]; active (B, n_layers);
        per_sample: the budgets were given per sample (see `same_calls_on_every_rank`)."""
        kind = self.plan.kinds[i]
        if kind != "self" or i not in self.plan.optional_self:
            return [(kind, None)]
        on = active[:, i]
        if per_sample and self.same_calls_on_every_rank:
            return [("self", on.nonzero().squeeze(1)), (self.plan.skip_kind, (~on).nonzero().squeeze(1))]
        n_on = int(on.sum())
        if n_on == on.shape[0]:
            return [("self", None)]
        if n_on == 0:
            return [(self.plan.skip_kind, None)]
        return [("self", on.nonzero().squeeze(1)), (self.plan.skip_kind, (~on).nonzero().squeeze(1))]

    def _new_row_cache(self, kind: str, rows: Optional[torch.Tensor], visual: torch.Tensor, cache: KVCache) -> RowCache:
        c = self.config
        n_rows = visual.shape[0] if rows is None else rows.numel()
        n_visual = visual.shape[1] if kind == "self" else 0
        return RowCache.empty(kind, rows, n_rows, c.n_kv_heads, c.head_dim, n_visual, cache.capacity, visual)

    def _run_groups(self, i: int, groups, visual, text, cos, sin, visual_kv_lens, caches, slots, image_at: int):
        """Layer i over its row groups -> (visual, text). One group: the whole batch. Two (an optional
        self layer with mixed budgets): each group's rows are gathered and run as its kind, and the
        change is added back to the residual stream (visual changes only on the self rows)."""
        if len(groups) == 1:
            rc = None if caches is None else caches[0]
            return self._layer(i, groups[0][0], visual, text, cos, sin, visual_kv_lens, rc, slots, image_at)
        B, V, d = visual.shape
        T = text.shape[1]
        v_flat, t_flat = visual.reshape(B, V * d), text.reshape(B, T * d)
        v_out, t_out = v_flat, t_flat
        for g, (kind, idx) in enumerate(groups):
            n = idx.numel()  # may be 0 (see `same_calls_on_every_rank`)
            v_g = gather_rows(v_flat, idx).view(n, V, d) if V else visual[:n]
            t_g = gather_rows(t_flat, idx).view(n, T, d)
            cos_g, sin_g = (cos, sin) if cos.shape[0] == 1 else (cos[idx], sin[idx])  # per-sample RoPE follows its rows
            v_new, t_new = self._layer(i, kind, v_g, t_g, cos_g, sin_g,
                                       None if visual_kv_lens is None else visual_kv_lens[idx],
                                       None if caches is None else caches[g], None if slots is None else slots[idx],
                                       image_at)
            if kind == "self" and V:
                v_out = scatter_add_rows(v_out, idx, (v_new - v_g).reshape(n, V * d))
            t_out = scatter_add_rows(t_out, idx, (t_new - t_g).reshape(n, T * d))
        return v_out.view(B, V, d), t_out.view(B, T, d)

    def _layer(self, i: int, kind: str, visual, text, cos, sin, visual_kv_lens, rc: Optional[RowCache] = None,
               slots: Optional[torch.Tensor] = None, image_at: int = 0):
        """Layer i as `kind` for a group's rows -> (visual, text); visual changes only under `self`.
        rc: the group's cache (filled at prefill, read at a decode step, where visual is (B_g, 0, d));
        slots (B_g,): the decode step's text slots; image_at: text tokens before the image (at a
        decode step the new token comes after it: only the cached self slots are laid out by it)."""
        V = visual.shape[1]
        before = 0 if slots is not None else image_at  # rows of `text` before the image
        if kind == "self":
            key_valid = None
            if visual_kv_lens is not None:  # keys on the visual padding are hidden
                n_visual, n_slots = (V, V + text.shape[1]) if slots is None else (rc.n_visual, rc.k.shape[2])
                slot = torch.arange(n_slots, device=text.device) - image_at  # the visual slots from 0
                key_valid = (slot >= n_visual) | (slot < visual_kv_lens[:, None])  # (B, n_slots)
            x = self.layers[i](torch.cat([text[:, :before], visual, text[:, before:]], dim=1),  # in sequence order
                               _in_sequence_order(cos, V, before, 2), _in_sequence_order(sin, V, before, 2), rc,
                               None if slots is None else slots + rc.n_visual, key_valid)  # (B, V+T, d)
            if not before:
                return x[:, :V], x[:, V:]
            return x[:, before:before + V], torch.cat([x[:, :before], x[:, before + V:]], dim=1)
        if kind == "cross":
            cross = self.cross[str(i)]
            if rc is not None and rc.cross_k is not None:  # a decode step: the visual K/V from the prefill
                k, v = rc.cross_k, rc.cross_v
            else:
                k, v = cross.visual_kv(visual, cos[..., :V, :], sin[..., :V, :])  # (B, Hkv, V, hd)
                if rc is not None:
                    rc.cross_k, rc.cross_v = k, v
            reader = text[:, before:]  # the text after the image reads it
            read = cross.attend(reader, cross.queries(reader, cos[..., V + before:, :], sin[..., V + before:, :]),
                                k, v, visual_kv_lens)
            text = torch.cat([text[:, :before], read], dim=1) if before else read
        return visual, self.layers[i](text, cos[..., V:, :], sin[..., V:, :], rc, slots)  # text keeps its positions

    def forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        """The unmodified LLM over one sequence: x (B, S, d) -> final hidden states (B, S, d).

        The reference for the all-self plan (positions 0..S-1, causal, every layer)."""
        cos, sin = rope_cos_sin(torch.arange(x.shape[1], device=x.device), self.config.head_dim,
                                self.config.rope_theta, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)

    def new_parameter_prefixes(self) -> List[str]:
        """Names (relative to the decoder) of the modules VISOR adds to a base LLM."""
        return ["cross."]
