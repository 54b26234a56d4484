"""Autoregressive generation with a KV cache that follows the layer kinds (DESIGN: "KV cache in generation").

The layer work is the decoder's own loop (`Decoder.run_layers` with a cache, src/models/kv_cache.py
for what each layer keeps): the prefill runs the prompt as the uncached forward does and fills the
cache; a decode step runs only the new text token through the layers, since visual hidden states
never change after the prefill (a new text token is causal-after them). The visual part of the
cache is `sum over layers reading the image (cross or active self) of V_i` per sample, against
`L * V` for the all-self LVLM: smaller by L / (#cross + #active self) (`visual_kv_ratio`).

Per-sample budgets: an optional self layer is `self` for the samples whose budget includes it and
its skip kind for the others, at the prefill and at every decode step, each row group with a cache
of its own kind. Budgets are fixed at prefill: given (an index, or (B,) indices), or chosen by the
router (`VisorLVLM.policy`) from the prompt's hidden states before the first optional self layer,
as `VisorLVLM.routed` does.

Padding convention: prompts are RIGHT-padded, as the datamodule's batches: sample b's prompt is
input_ids[b, :prompt_lens[b]]. The prefill runs the padded batch like the uncached forward (the
causal mask keeps valid tokens off the padding); the first new token comes from each sample's own
last prompt position; decode step n writes sample b's token into text slot prompt_lens[b] + n - 1
(over the padding, which is masked until then) at RoPE position text_start + that slot, exactly
where the uncached forward over that sample alone puts it. So a padded batch gives the same tokens
as every sample alone.

FastV (`decoder.fastv`): the drop happens at the prefill, ranked by the attention of each sample's
last prompt token, and layers K.. cache only the kept visual tokens (at their own RoPE positions).
AnyRes images of different token counts (`TiledImages`): each sample's visual slots are padded
after its own tokens, the padding hidden from every attention at prefill and decode
(`KVCache.visual_lens`), and its text starts right after its tokens (`KVCache.text_start`).
Chat layout (`image_at` > 0, the image inside the first user turn): the prompt's first image_at
tokens come before the image, in text slots 0..image_at-1 and, in a self layer's cache, before the
visual slots; every new token comes after the image.
The model should be in eval mode (generation does not change it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

from src.models.kv_cache import KVCache

BudgetSpec = Union[None, int, torch.Tensor, str, Callable[[torch.Tensor], torch.Tensor]]


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


@torch.no_grad()
def prefill(lvlm, images: torch.Tensor, input_ids: torch.Tensor, prompt_lens: torch.Tensor, capacity: int,
            budget: BudgetSpec = None, prompt_mask: Optional[torch.Tensor] = None, image_at: int = 0
            ) -> Tuple[torch.Tensor, KVCache, torch.Tensor, Optional[torch.Tensor]]:
    """Run the right-padded prompts once, filling a cache of `capacity` text slots per sample.

    images (B, 3, S, S) or TiledImages; input_ids (B, P) right-padded; prompt_lens (B,) int64 in [1, P];
    budget: None (largest) | index | (B,) indices | 'policy' (router argmax) | a callable
    router logits (B, K) -> budgets (B,) (e.g. `select_budgets` with a mode);
    prompt_mask (B, P) bool: the tokens the router pools (default: each sample's prompt);
    image_at: the prompt tokens before the image (a chat template's; each prompt is longer).
    -> (logits of each sample's next token (B, vocab), cache, budgets (B,), router logits (B, K) or None).
    """
    B, P = input_ids.shape
    device = input_ids.device
    assert prompt_lens.shape == (B,), f"prompt_lens must be (B,) = ({B},), got {tuple(prompt_lens.shape)}"
    prompt_lens = prompt_lens.to(device=device, dtype=torch.long)
    if bool((prompt_lens < 1).any()) or bool((prompt_lens > P).any()):
        raise ValueError(f"prompt_lens must be in [1, P={P}], got {prompt_lens.tolist()}")
    if bool((prompt_lens <= image_at).any()):
        raise ValueError(f"image_at={image_at} text tokens come before the image, so every prompt must be longer; "
                         f"prompt_lens {prompt_lens.tolist()}")
    if capacity < P:
        raise ValueError(f"capacity {capacity} < prompt length {P}")
    choose = None
    if isinstance(budget, str):
        if budget != "policy":
            raise ValueError(f"budget must be None, an index, (B,) indices, 'policy' or a callable; got {budget!r}")
        choose = lambda logits: logits.argmax(-1)  # noqa: E731
    elif callable(budget):
        choose = budget
    elif not (budget is None or isinstance(budget, int)):  # one budget for the batch stays an int
        budget = lvlm.plan.resolve(budget, B, device)
    if choose is not None and prompt_mask is None:
        prompt_mask = torch.arange(P, device=device)[None, :] < prompt_lens[:, None]
    cache = KVCache(None, prompt_lens.clone(), capacity)  # text_start and visual_lens: set from the images
    query_index = prompt_lens - 1  # fastv ranks by each sample's last prompt token
    hidden, router_logits, budget = lvlm.hidden_states(images, input_ids, budget, query_index, choose, prompt_mask,
                                                       cache, image_at)
    last = torch.zeros(B, P, dtype=torch.bool, device=device)
    last[torch.arange(B, device=device), query_index] = True
    return lvlm.logits(hidden, last), cache, lvlm.plan.resolve(budget, B, device), router_logits


@torch.no_grad()
def decode_step(lvlm, cache: KVCache, tokens: torch.Tensor) -> torch.Tensor:
    """Append one token per sample: tokens (B,) int64 -> logits of the next one (B, vocab).
    Each sample's token goes to text slot cache.lengths[b] at RoPE position text_start[b] + that slot."""
    dec = lvlm.decoder
    B = cache.lengths.shape[0]
    assert tokens.shape == (B,), f"tokens must be (B,) = ({B},), got {tuple(tokens.shape)}"
    x = dec.embed_tokens(tokens)[:, None]  # (B, 1, d)
    positions = (cache.text_start + cache.lengths)[:, None]  # (B, 1)
    _, x, _ = dec.run_layers(x.new_zeros(B, 0, x.shape[-1]), x, 0, dec.config.n_layers, positions, cache=cache)
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
             prompt_mask: Optional[torch.Tensor] = None, image_at: int = 0,
             stop_sequences: Sequence[Sequence[int]] = ()) -> GenerationOutput:
    """Cached generation for a batch of right-padded prompts.

    images (B, 3, S, S) or TiledImages; input_ids (B, P) right-padded with prompt_lens (B,) (None: every prompt is P
    long); budget, prompt_mask, image_at: see `prefill`; eos_id: a sample stops after producing it (None: never);
    stop_sequences: token sequences that also stop a sample once its new tokens end with one (kept in
    its tokens); temperature 0 is greedy, > 0 samples (top_k: from the k most likely) with `generator`.
    A finished sample leaves the batch (`KVCache.select`): later decode steps cost only the samples
    still running, and the returned cache holds those.
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
                                                    budget, prompt_mask, image_at)
    device = input_ids.device
    running = torch.arange(B, device=device)  # batch indices of the samples still generating
    lengths = torch.zeros(B, dtype=torch.long, device=device)
    out = []
    stops = [list(s) for s in stop_sequences if len(s)]
    longest_stop = max((len(s) for s in stops), default=0)
    for step in range(max_new_tokens):
        tok = pick_tokens(logits, temperature, top_k, generator)  # (R,) for the running samples
        row = torch.full((B,), pad_id, dtype=torch.long, device=device)
        row[running] = tok
        out.append(row)
        lengths[running] += 1
        done = torch.zeros_like(tok, dtype=torch.bool) if eos_id is None else tok == eos_id
        if stops:
            recent = torch.stack(out[-longest_stop:], dim=1)[running].tolist()  # the tokens a stop can end with
            done |= torch.tensor([any(s[-len(q):] == q for q in stops) for s in recent], device=device)
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            cache, running, tok = cache.select(keep), running[keep], tok[keep]
        logits = decode_step(lvlm, cache, tok)
    return GenerationOutput(torch.stack(out, dim=1), lengths, budgets, router_logits, cache)


# ---------------------------------------------------------------------------------------------
# Visual KV-cache size
# ---------------------------------------------------------------------------------------------


def visual_kv_bytes(lvlm, budget: Union[None, int, torch.Tensor] = None, batch_size: int = 1,
                    dtype: Optional[torch.dtype] = None, all_self: bool = False,
                    n_visual: Optional[int] = None) -> int:
    """Bytes of visual K/V the cache holds: `batch_size` samples at `budget` (None: largest, an index)
    or one sample per entry of a (B,) tensor of budgets. Per sample and layer: V_i keys and values
    of Hkv x hd at a `self` or `cross` layer, none at a `text` layer. all_self: the same decoder
    with every layer `self` (the original LVLM). dtype: default the decoder's parameters'.
    n_visual: visual tokens per sample (an AnyRes image's count; None: one crop's)."""
    c, plan = lvlm.decoder.config, lvlm.plan
    dtype = dtype or lvlm.decoder.embed_tokens.weight.dtype
    per_token = 2 * c.n_kv_heads * c.head_dim * torch.empty((), dtype=dtype).element_size()
    counts = lvlm.decoder.visual_tokens_per_layer(lvlm.num_visual_tokens if n_visual is None else n_visual)
    if isinstance(budget, torch.Tensor):
        assert budget.dim() == 1, f"budget must be an int or (B,) indices, got {tuple(budget.shape)}"
        return sum(visual_kv_bytes(lvlm, int(k), 1, dtype, all_self, n_visual) for k in budget.tolist())
    kinds = ["self"] * plan.n_layers if all_self else plan.budget_kinds(budget)
    return batch_size * per_token * sum(v for v, kind in zip(counts, kinds) if kind in ("self", "cross"))


def visual_kv_ratio(lvlm, budget: Optional[int] = None) -> float:
    """Visual KV-cache bytes of the all-self LVLM over this plan's at `budget`: L / (#cross + #active
    self) without token reduction (DESIGN: "KV cache in generation")."""
    return visual_kv_bytes(lvlm, None, all_self=True) / visual_kv_bytes(lvlm, budget)
