"""Autoregressive generation with a KV cache that follows the layer kinds (DESIGN: "KV cache in generation").

What each layer keeps for the decode steps (per sample):
  self  : K/V of [visual; text], the visual slots first (their K/V written once, at prefill)
  cross : the cross sublayer's visual K/V (computed once, at prefill) + the ordinary layer's text K/V
  text  : text K/V only
Visual hidden states never change after the prefill (a new text token is causal-after them), so a
decode step runs only the new text token through the layers. The visual part of the cache is
therefore `sum over layers reading the image (cross or active self) of V_i` per sample, against
`L * V` for the all-self LVLM: smaller by L / (#cross + #active self) (`visual_kv_ratio`).

Per-sample budgets: an optional self layer is `self` for the samples whose budget includes it and
its skip kind (`cross` or `text`) for the others, at the prefill and at every decode step. Such a
layer splits the batch into (at most) two row groups, each with a cache of its own kind over its
own rows only, so a sample neither stores nor computes the path it does not take. Budgets are
fixed at prefill: given (an index, or (B,) indices), or chosen by the router (`VisorLVLM.policy`)
from the prompt's hidden states before the first optional self layer, as `VisorLVLM.routed` does.

Padding convention: prompts are RIGHT-padded, as the datamodule's batches: sample b's prompt is
input_ids[b, :prompt_lens[b]]. The prefill runs the padded batch like the uncached forward (the
causal mask keeps valid tokens off the padding); the first new token comes from each sample's own
last prompt position; decode step n writes sample b's token into text slot prompt_lens[b] + n - 1
(over the padding, which is masked until then) at RoPE position text_start + that slot, exactly
where the uncached forward over that sample alone puts it. So a padded batch gives the same tokens
as every sample alone.

FastV (`decoder.fastv`) is supported: the drop happens at the prefill, ranked by the attention of
each sample's last prompt token (the uncached forward's `query_index`), and layers K.. cache only
the kept visual tokens (at their own RoPE positions).

Per-sample visual lengths (`visual_kv_lens`) are not supported (the LVLM forward never uses them).
The model should be in eval mode (generation does not change it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from src.models.decoder import Decoder
from src.models.rope import apply_rope

BudgetSpec = Union[None, int, torch.Tensor, str, Callable[[torch.Tensor], torch.Tensor]]


# ---------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------


@dataclass
class RowCache:
    """One layer's cache for one group of samples that run the layer as the same `kind`.

    rows: (B_g,) int64 sample indices into the batch, or None for every sample (B_g = B).
    k, v: (B_g, Hkv, n_visual + capacity, hd): the layer's own attention keys (RoPE applied) and
        values; for `self` the first n_visual slots are the visual tokens, then text slot t at
        n_visual + t; for `cross` and `text`, n_visual = 0 (text only).
    cross_k, cross_v: (B_g, Hkv, V_i, hd), the cross sublayer's visual K/V (`cross` only, else None).
    """

    kind: str
    rows: Optional[torch.Tensor]
    k: torch.Tensor
    v: torch.Tensor
    n_visual: int = 0
    cross_k: Optional[torch.Tensor] = None
    cross_v: Optional[torch.Tensor] = None

    def visual_bytes(self) -> int:
        """Bytes of visual K/V held: the self layer's visual slots, or the cross sublayer's K/V."""
        if self.kind == "self":
            return 2 * self.k[:, :, : self.n_visual].numel() * self.k.element_size()
        if self.kind == "cross":
            return (self.cross_k.numel() + self.cross_v.numel()) * self.cross_k.element_size()
        return 0

    def text_bytes(self) -> int:
        """Bytes allocated for text K/V (the whole capacity, used or not)."""
        return 2 * self.k[:, :, self.n_visual:].numel() * self.k.element_size()


@dataclass
class KVCache:
    """layers[i]: layer i's row groups (one group for every sample, or a self and a skip group).
    text_start (B,) int64: RoPE position of text slot 0 per sample; lengths (B,) int64: text tokens
    cached per sample so far; capacity: text slots allocated per sample."""

    layers: List[List[RowCache]]
    text_start: torch.Tensor
    lengths: torch.Tensor
    capacity: int

    def visual_bytes(self) -> int:
        """Bytes of visual K/V held in the cache (all samples, all layers)."""
        return sum(g.visual_bytes() for groups in self.layers for g in groups)

    def text_bytes(self) -> int:
        return sum(g.text_bytes() for groups in self.layers for g in groups)


@dataclass
class GenerationOutput:
    """tokens (B, N) int64, N <= max_new_tokens: the new tokens, `pad_id` after a sample's eos;
    lengths (B,) int64: new tokens per sample, its eos included; budgets (B,) int64: the budget each
    sample ran at; router_logits (B, n_budgets) when the router chose them, else None; cache: the
    KV cache after the last step."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    budgets: torch.Tensor
    router_logits: Optional[torch.Tensor]
    cache: KVCache


# ---------------------------------------------------------------------------------------------
# Cached layer pieces (the same modules and ops as Decoder's forward)
# ---------------------------------------------------------------------------------------------


def _attend(dec: Decoder, i: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rc: RowCache,
            q_slots: Optional[torch.Tensor]) -> torch.Tensor:
    """Layer i's self-attention with its cache. h (B_g, S, d) normed inputs of the new tokens;
    cos/sin (B_g or 1, 1, S, hd) their RoPE tables. q_slots None: prefill, the new tokens fill slots
    0..S-1 (causal); else (B_g,) with S = 1: the slot each sample's new token takes (it sees the
    slots up to and including it). -> (B_g, S, d) after the output projection."""
    attn = dec.layers[i].attn
    B, S, _ = h.shape
    H, Hkv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = attn.q_proj(h).view(B, S, H, hd).transpose(1, 2)  # (B, H, S, hd)
    k = attn.k_proj(h).view(B, S, Hkv, hd).transpose(1, 2)  # (B, Hkv, S, hd)
    v = attn.v_proj(h).view(B, S, Hkv, hd).transpose(1, 2)  # (B, Hkv, S, hd)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    gqa = H != Hkv
    if q_slots is None:
        rc.k[:, :, :S], rc.v[:, :, :S] = k, v
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)  # (B, H, S, hd)
    else:
        assert S == 1 and q_slots.shape == (B,), f"decode: one token per sample, q_slots (B,) = ({B},)"
        rows = torch.arange(B, device=h.device)
        rc.k[rows, :, q_slots], rc.v[rows, :, q_slots] = k[:, :, 0], v[:, :, 0]
        n = int(q_slots.max()) + 1
        visible = torch.arange(n, device=h.device)[None, :] <= q_slots[:, None]  # (B, n)
        y = F.scaled_dot_product_attention(q, rc.k[:, :, :n], rc.v[:, :, :n], attn_mask=visible[:, None, None, :],
                                           enable_gqa=gqa)  # (B, H, 1, hd)
    return attn.o_proj(y.transpose(1, 2).reshape(B, S, H * hd))


def _ordinary(dec: Decoder, i: int, x: torch.Tensor, cos, sin, rc: RowCache, q_slots) -> torch.Tensor:
    """Layer i's ordinary block (attention with the cache, then the MLP): x (B_g, S, d) -> (B_g, S, d)."""
    layer = dec.layers[i]
    x = x + _attend(dec, i, layer.input_norm(x), cos, sin, rc, q_slots)
    return x + layer.mlp(layer.post_attn_norm(x))


def _cross(dec: Decoder, i: int, text: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos, sin) -> torch.Tensor:
    """Layer i's cross sublayer over cached visual K/V: text (B_g, S, d), k/v (B_g, Hkv, V_i, hd),
    cos/sin (B_g or 1, 1, S, hd) the text positions' RoPE tables (used with cross_rope) -> (B_g, S, d)."""
    cross = dec.cross[str(i)]
    return cross.attend(text, cross.queries(text, cos, sin), k, v)


def _new_cache(dec: Decoder, kind: str, rows, B: int, n_visual: int, capacity: int, like: torch.Tensor) -> RowCache:
    c = dec.config
    shape = (B, c.n_kv_heads, n_visual + capacity, c.head_dim)
    # zeros, not empty: masked slots are multiplied by a zero weight, which must not meet a NaN
    return RowCache(kind, rows, like.new_zeros(shape), like.new_zeros(shape), n_visual)


def _prefill_layer(dec: Decoder, i: int, kind: str, rc: RowCache, visual: torch.Tensor, text: torch.Tensor,
                   cos: torch.Tensor, sin: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Layer i as `kind` over a group's rows, filling rc: visual (B_g, V, d), text (B_g, P, d),
    cos/sin (B_g or 1, 1, V+P, hd) -> (visual, text), visual updated only by `self`."""
    V = visual.shape[1]
    if kind == "self":
        x = _ordinary(dec, i, torch.cat([visual, text], dim=1), cos, sin, rc, None)  # (B_g, V+P, d)
        return x[:, :V], x[:, V:]
    if kind == "cross":
        rc.cross_k, rc.cross_v = dec.cross[str(i)].visual_kv(visual, cos[..., :V, :], sin[..., :V, :])  # (B_g, Hkv, V, hd)
        text = _cross(dec, i, text, rc.cross_k, rc.cross_v, cos[..., V:, :], sin[..., V:, :])
    return visual, _ordinary(dec, i, text, cos[..., V:, :], sin[..., V:, :], rc, None)


def _decode_layer(dec: Decoder, i: int, rc: RowCache, x: torch.Tensor, cos, sin, slots: torch.Tensor) -> torch.Tensor:
    """Layer i for one new text token per sample of a group: x (B_g, 1, d), cos/sin (B_g, 1, 1, hd),
    slots (B_g,) its text slot -> (B_g, 1, d)."""
    if rc.kind == "cross":
        x = _cross(dec, i, x, rc.cross_k, rc.cross_v, cos, sin)
    return _ordinary(dec, i, x, cos, sin, rc, slots + rc.n_visual)


def _groups(dec: Decoder, i: int, active: torch.Tensor) -> List[Tuple[str, Optional[torch.Tensor]]]:
    """[(kind, rows (B_g,) or None for all)] for layer i; active (B, n_layers) bool."""
    plan = dec.plan
    kind = plan.kinds[i]
    if i not in plan.optional_self:
        return [(kind, None)]
    on = active[:, i]
    n_on = int(on.sum())
    if n_on == on.shape[0]:
        return [("self", None)]
    if n_on == 0:
        return [(plan.skip_kind, None)]
    return [("self", on.nonzero().squeeze(1)), (plan.skip_kind, (~on).nonzero().squeeze(1))]


def _rows(t: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
    """Per-sample tensor (B, ...) or a shared one (1, ...) -> its group's rows."""
    return t if rows is None or t.shape[0] == 1 else t[rows]


def _resolve_budgets(dec: Decoder, budget, B: int, device) -> torch.Tensor:
    """None / int / (B,) -> (B,) int64 budget indices, validated."""
    plan = dec.plan
    if budget is None:
        budget = plan.largest_budget
    if isinstance(budget, int):
        if not 0 <= budget < plan.n_budgets:
            raise IndexError(f"budget {budget} out of range [0, {plan.n_budgets})")
        return torch.full((B,), budget, dtype=torch.long, device=device)
    if not (isinstance(budget, torch.Tensor) and budget.shape == (B,) and not budget.is_floating_point()):
        raise ValueError(f"budget must be None, an int, a (B,) = ({B},) integer tensor, 'policy' or a callable; "
                         f"got {budget!r}")
    if bool((budget < 0).any()) or bool((budget >= plan.n_budgets).any()):
        raise IndexError(f"budget values {budget.tolist()} out of range [0, {plan.n_budgets})")
    return budget.to(device=device, dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# Prefill, decode step, generate
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def prefill(lvlm, images: torch.Tensor, input_ids: torch.Tensor, prompt_lens: torch.Tensor, capacity: int,
            budget: BudgetSpec = None, prompt_mask: Optional[torch.Tensor] = None
            ) -> Tuple[torch.Tensor, KVCache, torch.Tensor, Optional[torch.Tensor]]:
    """Run the right-padded prompts once, filling a cache of `capacity` text slots per sample.

    images (B, 3, H, W); input_ids (B, P) right-padded; prompt_lens (B,) int64 in [1, P];
    budget: None (largest) | index | (B,) indices | 'policy' (router argmax) | a callable
    router logits (B, K) -> budgets (B,) (e.g. `select_budgets` with a mode);
    prompt_mask (B, P) bool: the tokens the router pools (default: each sample's prompt).
    -> (logits of each sample's next token (B, vocab), cache, budgets (B,), router logits (B, K) or None).
    """
    dec: Decoder = lvlm.decoder
    plan = dec.plan
    B, P = input_ids.shape
    device = input_ids.device
    assert prompt_lens.shape == (B,), f"prompt_lens must be (B,) = ({B},), got {tuple(prompt_lens.shape)}"
    prompt_lens = prompt_lens.to(device=device, dtype=torch.long)
    if bool((prompt_lens < 1).any()) or bool((prompt_lens > P).any()):
        raise ValueError(f"prompt_lens must be in [1, P={P}], got {prompt_lens.tolist()}")
    if capacity < P:
        raise ValueError(f"capacity {capacity} < prompt length {P}")
    visual, text, positions = lvlm.prepare_inputs(images, input_ids)  # (B, V, d), (B, P, d), (N, V+P)
    V = visual.shape[1]
    text_start = positions[:, V].expand(B).clone()  # (B,) RoPE position of text slot 0
    if isinstance(budget, str) and budget != "policy":
        raise ValueError(f"budget must be None, an index, (B,) indices, 'policy' or a callable; got {budget!r}")
    routed = callable(budget) or isinstance(budget, str)
    router_logits = None
    if routed:
        if lvlm.policy is None or plan.first_optional is None:
            raise ValueError("budget='policy' needs a router (model.lvlm.init_args.policy_hidden) and optional self "
                             "layers (plan.optional_self)")
        choose = budget if callable(budget) else (lambda logits: logits.argmax(-1))
        budgets = torch.full((B,), plan.largest_budget, dtype=torch.long, device=device)  # until the router picks
        if prompt_mask is None:
            prompt_mask = torch.arange(P, device=device)[None, :] < prompt_lens[:, None]
        assert prompt_mask.shape == (B, P), f"prompt_mask must be (B, P) = ({B}, {P}), got {tuple(prompt_mask.shape)}"
    else:
        budgets = _resolve_budgets(dec, budget, B, device)
    active = dec.budget_members.to(device)[budgets]  # (B, n_layers) bool
    query_index = prompt_lens - 1  # fastv ranks by each sample's last prompt token
    cos, sin = dec.rope(positions, text.dtype)  # (N, 1, V+P, hd)
    layers: List[List[RowCache]] = []
    for i in range(plan.n_layers):
        if routed and i == plan.first_optional:
            router_logits = lvlm.policy(text, prompt_mask, visual)  # (B, K)
            budgets = _resolve_budgets(dec, choose(router_logits), B, device)
            active = dec.budget_members.to(device)[budgets]
        scores = None
        if dec.fastv is not None and i == dec.fastv.layer - 1:
            self_on = (active[:, i] if i in plan.optional_self
                       else torch.full((B,), plan.kinds[i] == "self", device=device))
            scores = dec._visual_attention(i, self_on, visual, text, cos, sin, query_index)  # (B, V)
        groups = []
        new_visual, new_text = (visual, text)
        for kind, rows in _groups(dec, i, active):
            Bg = B if rows is None else rows.numel()
            n_vis = visual.shape[1]
            rc = _new_cache(dec, kind, rows, Bg, n_vis if kind == "self" else 0, capacity, text)
            v_g, t_g = _prefill_layer(dec, i, kind, rc, _rows(visual, rows), _rows(text, rows),
                                      _rows(cos, rows), _rows(sin, rows))
            if rows is None:
                new_visual, new_text = v_g, t_g
            else:
                if new_text is text:
                    new_visual, new_text = visual.clone(), text.clone()
                new_visual[rows], new_text[rows] = v_g, t_g
            groups.append(rc)
        visual, text = new_visual, new_text
        layers.append(groups)
        if scores is not None:  # the fastv drop, as Decoder.run_layers
            keep = dec.fastv.select(scores)  # (B, V') ascending
            visual = visual.gather(1, keep.unsqueeze(-1).expand(-1, -1, visual.shape[-1]))
            vis_pos = positions[:, : scores.shape[1]].expand(B, -1).gather(1, keep)
            positions = torch.cat([vis_pos, positions[:, scores.shape[1]:].expand(B, -1)], dim=1)
            cos, sin = dec.rope(positions, text.dtype)
    last = text[torch.arange(B, device=device), query_index]  # (B, d)
    logits = dec.lm_head(dec.norm(last))  # (B, vocab)
    cache = KVCache(layers, text_start, prompt_lens.clone(), capacity)
    return logits, cache, budgets, router_logits


@torch.no_grad()
def decode_step(lvlm, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
    """Append one token per sample: tokens (B,) int64 -> logits of the next one (B, vocab).
    Each sample's token goes to text slot cache.lengths[b] at RoPE position text_start[b] + that slot."""
    dec: Decoder = lvlm.decoder
    B = cache.lengths.shape[0]
    assert tokens.shape == (B,), f"tokens must be (B,) = ({B},), got {tuple(tokens.shape)}"
    slots = cache.lengths
    if int(slots.max()) >= cache.capacity:
        raise RuntimeError(f"KV cache full: {cache.capacity} text slots per sample")
    x = dec.embed_tokens(tokens)[:, None]  # (B, 1, d)
    cos, sin = dec.rope((cache.text_start + slots)[:, None], x.dtype)  # (B, 1, 1, hd)
    for i, groups in enumerate(cache.layers):
        if len(groups) == 1 and groups[0].rows is None:
            x = _decode_layer(dec, i, groups[0], x, cos, sin, slots)
            continue
        out = x.clone()
        for rc in groups:
            r = rc.rows
            out[r] = _decode_layer(dec, i, rc, x[r], cos[r], sin[r], slots[r])
        x = out
    cache.lengths = cache.lengths + 1
    return dec.lm_head(dec.norm(x))[:, 0]  # (B, vocab)


def pick_tokens(logits: torch.Tensor, temperature: float = 0.0, top_k: Optional[int] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits (B, vocab) -> tokens (B,) int64: argmax for temperature 0, else a sample from
    softmax(logits / temperature) restricted to the top_k most likely (all when None)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(lvlm, images: torch.Tensor, input_ids: torch.Tensor, prompt_lens: Optional[torch.Tensor] = None,
             max_new_tokens: int = 16, budget: BudgetSpec = None, eos_id: Optional[int] = None, pad_id: int = 0,
             temperature: float = 0.0, top_k: Optional[int] = None, generator: Optional[torch.Generator] = None,
             prompt_mask: Optional[torch.Tensor] = None) -> GenerationOutput:
    """Cached generation for a batch of right-padded prompts.

    images (B, 3, H, W); input_ids (B, P) right-padded with prompt_lens (B,) (None: every prompt is P
    long); budget: see `prefill`; eos_id: a sample stops after producing it (None: never);
    temperature 0 is greedy, > 0 samples (top_k: from the k most likely) with `generator`.
    -> GenerationOutput (tokens (B, N <= max_new_tokens), lengths (B,), budgets (B,), ...).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    assert input_ids.dim() == 2, f"input_ids must be (B, P), got {tuple(input_ids.shape)}"
    B, P = input_ids.shape
    if prompt_lens is None:
        prompt_lens = torch.full((B,), P, dtype=torch.long, device=input_ids.device)
    logits, cache, budgets, router_logits = prefill(lvlm, images, input_ids, prompt_lens, P + max_new_tokens,
                                                    budget, prompt_mask)
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    lengths = torch.zeros(B, dtype=torch.long, device=input_ids.device)
    out = []
    for step in range(max_new_tokens):
        tok = pick_tokens(logits, temperature, top_k, generator)
        tok = torch.where(finished, torch.full_like(tok, pad_id), tok)
        out.append(tok)
        lengths += (~finished).long()
        if eos_id is not None:
            finished |= tok == eos_id
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        logits = decode_step(lvlm, cache, tok)
    return GenerationOutput(torch.stack(out, dim=1), lengths, budgets, router_logits, cache)


# ---------------------------------------------------------------------------------------------
# Visual KV-cache size
# ---------------------------------------------------------------------------------------------


def _visual_per_layer(lvlm) -> List[int]:
    """Visual tokens each layer sees (fewer from layer K on after a fastv drop)."""
    V, n = lvlm.num_visual_tokens, lvlm.plan.n_layers
    fastv = lvlm.decoder.fastv
    if fastv is None:
        return [V] * n
    return [V] * fastv.layer + [fastv.n_kept(V)] * (n - fastv.layer)


def visual_kv_bytes(lvlm, budget: Union[None, int, torch.Tensor] = None, batch_size: int = 1,
                    dtype: Optional[torch.dtype] = None, all_self: bool = False) -> int:
    """Bytes of visual K/V the cache holds: `batch_size` samples at `budget` (None: largest, an index)
    or one sample per entry of a (B,) tensor of budgets. Per sample and layer: V_i keys and values
    of Hkv x hd at a `self` or `cross` layer, none at a `text` layer. all_self: the same decoder
    with every layer `self` (the original LVLM). dtype: default the decoder's parameters'."""
    c, plan = lvlm.decoder.config, lvlm.plan
    dtype = dtype or lvlm.decoder.embed_tokens.weight.dtype
    per_token = 2 * c.n_kv_heads * c.head_dim * torch.empty((), dtype=dtype).element_size()
    counts = _visual_per_layer(lvlm)
    if isinstance(budget, torch.Tensor):
        assert budget.dim() == 1, f"budget must be an int or (B,) indices, got {tuple(budget.shape)}"
        return sum(visual_kv_bytes(lvlm, int(k), 1, dtype, all_self) for k in budget.tolist())
    kinds = ["self"] * plan.n_layers if all_self else plan.budget_kinds(
        plan.largest_budget if budget is None else budget)
    return batch_size * per_token * sum(v for v, kind in zip(counts, kinds) if kind in ("self", "cross"))


def visual_kv_ratio(lvlm, budget: Optional[int] = None) -> float:
    """Visual KV-cache bytes of the all-self LVLM over this plan's at `budget`: L / (#cross + #active
    self) without token reduction (DESIGN: "KV cache in generation")."""
    return visual_kv_bytes(lvlm, None, all_self=True) / visual_kv_bytes(lvlm, budget)
