"""Analytical FLOPs per layer kind and per sample (1 multiply-add = 2 FLOPs).

Convention: matmuls and attention counted as computed. Attention is 4 * H * Sq * Sk * hd (Q K^T
and P V), HALVED under a causal mask (self layers over [visual; text], the text-only attention of
cross and text layers), as FlashAttention's FLOP formulas count it, because the kernels skip the
masked half; cross-attention (text over every visual token) has no mask and counts in full.
Norms, activations and RoPE are left out. `measured_flops` runs torch's FlopCounterMode with the
same convention (src/ops/sdpa_flops.py); the vision encoder is measured once with it (any timm
model), the projector and the LLM are analytical and cross-checked against it in tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
from torch.utils.flop_counter import FlopCounterMode

from src.models.decoder import DecoderConfig
from src.ops.sdpa_flops import SDPA_FLOP_FORMULAS

# How a FLOPs figure here counts, for table headers (experiments/tables/reflop.py also reads it there).
CONVENTION = ("as computed: 1 multiply-add = 2 FLOPs, a causal attention square counted half, "
              "cross-attention in full (src/flops.py)")


def _linear_per_token(c: DecoderConfig) -> int:
    qo = 2 * 2 * c.d_model * c.n_heads * c.head_dim
    kv = 2 * 2 * c.d_model * c.n_kv_heads * c.head_dim
    mlp = 3 * 2 * c.d_model * c.intermediate_size
    return qo + kv + mlp


def attention_flops(c: DecoderConfig, n_queries: int, n_keys: int, causal: bool = False) -> int:
    """Q K^T and P V for n_queries x n_keys; a causal square counts half (the masked half is skipped)."""
    full = 4 * c.n_heads * n_queries * n_keys * c.head_dim
    return full // 2 if causal else full


def cross_sublayer_flops(c: DecoderConfig, V: int, T: int) -> int:
    """The cross-attention sublayer alone: q/o projections over T, k/v projections over V, attention T x V."""
    qo = 2 * 2 * T * c.d_model * c.n_heads * c.head_dim
    kv = 2 * 2 * V * c.d_model * c.n_kv_heads * c.head_dim
    return qo + kv + attention_flops(c, T, V)


def layer_flops(c: DecoderConfig, kind: str, V: int, T: int, image_at: int = 0) -> int:
    """One decoder layer of `kind` for one sample with V visual and T text tokens, image_at of them
    before the image (a chat layout: they are not cross-attention queries)."""
    if kind == "self":
        S = V + T
        return S * _linear_per_token(c) + attention_flops(c, S, S, causal=True)
    text = T * _linear_per_token(c) + attention_flops(c, T, T, causal=True)
    if kind == "text":
        return text
    if kind == "cross":
        return text + cross_sublayer_flops(c, V, T - image_at)
    raise ValueError(f"unknown layer kind {kind!r}")


def llm_flops(c: DecoderConfig, kinds: Sequence[str], V: Union[int, Sequence[int]], T: int, lm_head: bool = True,
              head_tokens: Optional[int] = None, image_at: int = 0) -> int:
    """The whole LLM for one sample: every layer by its kind, plus the LM head over `head_tokens`
    positions (default all T text tokens; 1 for a prefill, which needs the last one).
    V: visual tokens, one count for all layers or one per layer (after an in-LLM drop); image_at:
    text tokens before the image (see `layer_flops`)."""
    per_layer = [V] * len(kinds) if isinstance(V, int) else list(V)
    assert len(per_layer) == len(kinds), f"{len(per_layer)} visual counts for {len(kinds)} layers"
    total = sum(layer_flops(c, k, v, T, image_at) for k, v in zip(kinds, per_layer))
    head_tokens = T if head_tokens is None else head_tokens
    return total + (2 * head_tokens * c.d_model * c.vocab_size if lm_head else 0)


def fastv_rank_flops(c: DecoderConfig, kind: str, V: int, T: int) -> int:
    """Ranking the visual tokens by one query token's attention at a `self` or `cross` layer: its query
    projection, the keys it reads (all V+T for self, V for cross) and one row of logits."""
    keys = V + T if kind == "self" else V
    return 2 * c.d_model * c.n_heads * c.head_dim + 2 * keys * c.d_model * c.n_kv_heads * c.head_dim \
        + 2 * c.n_heads * keys * c.head_dim


@dataclass
class SampleFlops:
    vision: int
    projector: int  # projector, positional conv and any token reduction before the LLM
    llm: int  # decoder layers (an in-LLM token drop's ranking included) and the LM head

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.llm


def measured_flops(fn, *args) -> int:
    """FLOPs of fn(*args) as FlopCounterMode counts them, causal attention halved (the convention above)."""
    with FlopCounterMode(display=False, custom_mapping=SDPA_FLOP_FORMULAS) as counter:
        fn(*args)
    return counter.get_total_flops()


def vision_flops_per_image(encoder) -> int:
    """Measured once per encoder (any timm architecture), cached on it."""
    if getattr(encoder, "_flops_per_image", None) is None:
        x = torch.zeros(1, 3, encoder.image_size, encoder.image_size, device=next(encoder.parameters()).device)
        was_training = encoder.training
        encoder.eval()  # a train-mode pass would update batch-norm statistics
        with torch.no_grad():
            encoder._flops_per_image = measured_flops(encoder, x)
        encoder.train(was_training)
    return encoder._flops_per_image


def sample_flops(model, T: int, budget: Optional[int] = None,
                 image_hw: Optional[Tuple[int, int]] = None, image_at: int = 0) -> SampleFlops:
    """FLOPs for one sample with T text tokens through a VisorLVLM (inference, one forward) at
    `budget` (an index into the plan's budgets; None: the largest). image_hw: the original (height,
    width) of an AnyRes image (its crops through the tower, its token count in the LLM); None: one crop.
    image_at: text tokens before the image (a chat layout; they do not query cross layers)."""
    c = model.decoder.config
    V0, crops, V = model.vision.num_tokens, 1, model.num_visual_tokens
    if image_hw is not None:
        if model.anyres is None:
            raise ValueError("image_hw (an AnyRes image) given for a model built without anyres")
        crops, V = model.anyres.n_crops(*image_hw), model.anyres.num_tokens(*image_hw)
    proj = 2 * crops * V0 * (model.projector.fc1.in_features * c.d_model + c.d_model * c.d_model)
    if model.pos_conv is not None:
        proj += 2 * (V if image_hw is not None else V0) * c.d_model * model.pos_conv.conv.kernel_size[0]
    reducer = model.token_reducer
    kinds = model.plan.budget_kinds(budget)
    if reducer is None or not reducer.in_llm:
        if reducer is not None:
            proj += reducer.reduction_flops(V0, c.d_model)
        llm = llm_flops(c, kinds, V, T, image_at=image_at)
    else:  # fastv: layers before K see V tokens, K.. the kept ones, plus the ranking at layer K-1
        K = reducer.layer
        llm = llm_flops(c, kinds, model.decoder.visual_tokens_per_layer(V), T, image_at=image_at)
        llm += fastv_rank_flops(c, kinds[K - 1], V, T)
    return SampleFlops(vision=crops * vision_flops_per_image(model.vision), projector=proj, llm=llm)


