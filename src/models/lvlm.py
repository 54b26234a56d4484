"""VisorLVLM: vision encoder -> projector -> [pos conv] -> [token reducer] -> plan-driven decoder."""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn

from src.models.anyres import AnyRes, TiledImages
from src.models.decoder import Decoder, DecoderConfig
from src.models.kv_cache import KVCache
from src.models.plan import LayerPlan
from src.models.policy import BudgetPolicy
from src.models.projector import Projector, VisualPosConv
from src.models.token_reduction import TokenReducer


Images = Union[torch.Tensor, TiledImages]


class VisualTokens(NamedTuple):
    """What the LLM receives from the images. tokens (B, V, d); positions (B, V) int64 RoPE positions
    when a selection reducer kept a subset, else None (0..V-1); lens (B,) int64 valid tokens per sample
    when samples differ (AnyRes), padding after them, else None; text_start: the first text position,
    an int for all or (B,) per sample."""

    tokens: torch.Tensor
    positions: Optional[torch.Tensor]
    lens: Optional[torch.Tensor]
    text_start: Union[int, torch.Tensor]


class VisorLVLM(nn.Module):
    """A LLaVA-style LVLM whose decoder layers follow a VISOR LayerPlan.

    With `plan.all_self` and `pos_conv=False` it is the original LVLM (the base model).

    `vision`: a VisionEncoder (any timm model) or any module with its interface (`out_dim`, `grid`,
    `num_tokens`, `image_size`; images (B, 3, S, S) in [0, 1] -> tokens (B, V, out_dim)), such as
    the SigLIP tower of src/models/siglip.py. `image_newline`: LLaVA-OneVision's learned token
    appended after each image's visual tokens (after any token reduction), at the position right
    after the image grid; the text follows it. `cross_rope`: the cross sublayers rotate text
    queries and visual keys at their original positions (default off, as DESIGN.md; see
    src/models/cross_attention.py). `anyres`: LLaVA-OneVision's high-resolution tiling
    (src/models/anyres.py); with it the model also takes `TiledImages` (a base crop and tiles per
    image, a token count per image); plain (B, 3, S, S) images stay one crop each.
    """

    def __init__(
        self,
        vision: nn.Module,
        decoder: DecoderConfig,
        plan: LayerPlan,
        pos_conv: bool = True,
        token_reducer: Optional[TokenReducer] = None,
        cross_init: str = "host",
        policy_hidden: Optional[int] = None,
        image_newline: bool = False,
        cross_rope: bool = False,
        anyres: Optional[AnyRes] = None,
    ) -> None:
        super().__init__()
        for attr in ("out_dim", "grid", "num_tokens", "image_size"):
            if not hasattr(vision, attr):
                raise TypeError(f"lvlm.vision ({type(vision).__name__}) lacks `{attr}`: see VisionEncoder's interface")
        self.vision = vision
        self.projector = Projector(vision.out_dim, decoder.d_model)
        self.pos_conv = VisualPosConv(decoder.d_model) if pos_conv else None
        self.token_reducer = token_reducer
        # The grid the visual RoPE positions index: the encoder's, or the pooled one.
        self.position_grid: Tuple[int, int] = vision.grid
        if token_reducer is not None:
            self.position_grid = token_reducer.output_grid(vision.grid)
        fastv = token_reducer if token_reducer is not None and token_reducer.in_llm else None
        self.decoder = Decoder(decoder, plan, cross_init, fastv, cross_rope)
        # The budget router (policy stage): before the first optional self layer.
        self.policy = BudgetPolicy(decoder.d_model, plan.n_budgets, policy_hidden) if policy_hidden else None
        self.image_newline = nn.Parameter(torch.zeros(decoder.d_model)) if image_newline else None
        if anyres is not None and (anyres.tile != vision.image_size or (anyres.grid, anyres.grid) != tuple(vision.grid)):
            raise ValueError(f"anyres.tile={anyres.tile}, anyres.patch={anyres.patch} give a {anyres.grid}x{anyres.grid} "
                             f"grid of {anyres.tile} px crops; the vision encoder takes {vision.image_size} px, "
                             f"grid {tuple(vision.grid)}: set anyres.tile and anyres.patch to match")
        if anyres is not None and token_reducer is not None:
            raise ValueError("anyres with a token_reducer is not supported: reducers work on one crop's grid")
        self.anyres = anyres

    @property
    def plan(self) -> LayerPlan:
        return self.decoder.plan

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens entering the LLM (after any token reduction before it)."""
        V0 = self.vision.num_tokens
        V = V0 if self.token_reducer is None else self.token_reducer.n_tokens(V0)
        return V + (1 if self.image_newline is not None else 0)

    @property
    def text_start(self) -> int:
        """The first text position: after the position grid, and the image_newline if any."""
        return self.position_grid[0] * self.position_grid[1] + (1 if self.image_newline is not None else 0)

    def encode_images(self, images: Images) -> VisualTokens:
        """images (B, 3, S, S) in [0, 1], or TiledImages (AnyRes) -> VisualTokens (tokens (B, V, d))."""
        if isinstance(images, TiledImages):
            return self._encode_tiled(images)
        visual = self.projector(self.vision(images))  # (B, V0, d)
        if self.pos_conv is not None:
            visual = self.pos_conv(visual)
        positions = None
        if self.token_reducer is not None and not self.token_reducer.in_llm:
            visual, positions = self.token_reducer(visual, self.vision.grid)  # (B, V, d), (B, V) or None
        if self.image_newline is not None:
            B = visual.shape[0]
            visual = torch.cat([visual, self.image_newline.to(visual.dtype).expand(B, 1, -1)], dim=1)  # (B, V+1, d)
            if positions is not None:
                after_grid = positions.new_full((B, 1), self.text_start - 1)
                positions = torch.cat([positions, after_grid], dim=1)  # (B, V+1)
        return VisualTokens(visual, positions, None, self.text_start)

    def _encode_tiled(self, images: TiledImages) -> VisualTokens:
        """AnyRes: every image's crops through the tower at once, then each image's tokens packed
        (src/models/anyres.py) and the batch zero-padded to its longest; positions run on through
        each image's own tokens, its text right after them."""
        if self.anyres is None:
            raise ValueError("TiledImages need a model built with anyres (model.lvlm.init_args.anyres)")
        sizes = images.sizes.tolist()
        counts = [self.anyres.n_crops(h, w) for h, w in sizes]
        if max(counts) > images.crops.shape[1]:
            raise ValueError(f"TiledImages.crops holds {images.crops.shape[1]} crops per image; image sizes "
                             f"{sizes} need {counts}")
        crops = torch.cat([images.crops[b, :n] for b, n in enumerate(counts)])  # (sum n, 3, S, S)
        features = self.projector(self.vision(crops)).split(counts)  # [(n_b, g*g, d)]
        tokens = [self.anyres.pack(f, h, w, self.image_newline) for f, (h, w) in zip(features, sizes)]
        lens = torch.tensor([t.shape[0] for t in tokens], dtype=torch.long, device=crops.device)
        visual = nn.utils.rnn.pad_sequence(tokens, batch_first=True)  # (B, V_max, d), zeros after each image
        if self.pos_conv is not None:
            visual = self.pos_conv(visual)
        return VisualTokens(visual, None, None if bool((lens == lens.max()).all()) else lens, lens)

    def prepare_inputs(self, images: Images, input_ids: torch.Tensor, image_at: int = 0):
        """images (B, 3, S, S) or TiledImages, input_ids (B, T) -> (visual (B, V, d), text embeddings
        (B, T, d), positions (N, V+T), VisualTokens). The sequence is input_ids[:, :image_at], the
        image, the rest (`Decoder.positions`); the image spans `text_start` positions (V0 when a
        selection reducer kept a subset, as without reduction)."""
        assert input_ids.dim() == 2 and input_ids.shape[0] == images.shape[0], (
            f"input_ids must be (B, T) with B={images.shape[0]}, got {tuple(input_ids.shape)}")
        vt = self.encode_images(images)
        text = self.decoder.embed_tokens(input_ids)  # (B, T, d)
        positions = self.decoder.positions(vt.tokens.shape[1], text.shape[1], text.device, vt.positions,
                                           vt.text_start, image_at)
        return vt.tokens, text, positions, vt

    def hidden_states(self, images: torch.Tensor, input_ids: torch.Tensor,
                      budget: Optional[Union[int, torch.Tensor]] = None,
                      query_index: Optional[torch.Tensor] = None,
                      choose: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                      prompt_mask: Optional[torch.Tensor] = None,
                      cache: Optional[KVCache] = None,
                      image_at: int = 0,
                      ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[Union[int, torch.Tensor]]]:
        """The one way a prompt goes through the model (training, validation, routing, prefill).

        images (B, 3, S, S) or TiledImages, input_ids (B, T) right-padded; budget None (largest) / index / (B,)
        indices; query_index (B,): the last prompt token (fastv ranks by its attention; default T-1).
        choose: route instead: the layers before the first optional self layer run, then the router
        on their hidden states (prompt_mask (B, T) bool marks the question tokens it pools), then
        `choose(router logits (B, K)) -> budgets (B,)` sets the budgets of the rest. cache: a fresh
        KVCache to fill (a prefill). image_at: the text tokens before the image (a chat template puts
        the image inside the first user turn; 0: the image first).
        -> (text hidden states after the final norm (B, T, d), router logits (B, K) or None, the budget run).
        """
        dec = self.decoder
        visual, text, positions, vt = self.prepare_inputs(images, input_ids, image_at)
        lens = vt.lens
        if cache is not None:
            B = input_ids.shape[0]
            cache.text_start = torch.as_tensor(vt.text_start, device=text.device).expand(B).clone()
            cache.visual_lens = lens
        start, router_logits = 0, None
        if choose is not None:
            if self.policy is None or self.plan.first_optional is None:
                raise ValueError("routing needs a policy (model.lvlm.init_args.policy_hidden) and optional self "
                                 "layers (plan.optional_self)")
            assert prompt_mask is not None and prompt_mask.shape == input_ids.shape, (
                f"prompt_mask must be (B, T) = {tuple(input_ids.shape)}")
            start = self.plan.first_optional
            visual, text, positions = dec.run_layers(visual, text, 0, start, positions, visual_kv_lens=lens,
                                                     query_index=query_index, cache=cache, image_at=image_at)
            router_logits = self.policy(text, prompt_mask, visual, lens)  # (B, K)
            budget = choose(router_logits)
        _, text, _ = dec.run_layers(visual, text, start, dec.config.n_layers, positions, budget, lens,
                                    query_index=query_index, cache=cache, image_at=image_at)
        return dec.norm(text), router_logits, budget

    def logits(self, hidden: torch.Tensor, logits_at: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The LM head where its logits are used: hidden (B, T, d) -> (B, T, vocab), or with logits_at
        (B, T) bool only at those positions -> (N, vocab), row-major (N = logits_at.sum()). At a real
        vocabulary (151936 x 896) the head over every text position is a large part of a lean
        model's prefill and of a training step's backward."""
        if logits_at is None:
            return self.decoder.lm_head(hidden)
        assert logits_at.shape == hidden.shape[:2] and logits_at.dtype == torch.bool, (
            f"logits_at must be (B, T) = {tuple(hidden.shape[:2])} bool, got {tuple(logits_at.shape)} {logits_at.dtype}")
        return self.decoder.lm_head(hidden[logits_at])

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor,
                budget: Optional[Union[int, torch.Tensor]] = None,
                query_index: Optional[torch.Tensor] = None,
                logits_at: Optional[torch.Tensor] = None, image_at: int = 0) -> torch.Tensor:
        """images (B, 3, S, S) or TiledImages, input_ids (B, T) right-padded, budget None (largest) / index / (B,)
        indices, query_index (B,) the last prompt token (fastv ranks by its attention; default T-1),
        image_at: text tokens before the image
        -> logits (B, T, vocab), or (N, vocab) at the positions of logits_at (B, T) bool."""
        hidden, _, _ = self.hidden_states(images, input_ids, budget, query_index, image_at=image_at)
        return self.logits(hidden, logits_at)

    def routed(self, images: torch.Tensor, input_ids: torch.Tensor, prompt_mask: torch.Tensor,
               choose: Callable[[torch.Tensor], torch.Tensor],
               query_index: Optional[torch.Tensor] = None,
               logits_at: Optional[torch.Tensor] = None,
               image_at: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run with the router (see `hidden_states`) -> (logits (B, T, vocab) or (N, vocab) at
        logits_at, router logits (B, K), budgets (B,))."""
        hidden, router_logits, budgets = self.hidden_states(images, input_ids, None, query_index, choose, prompt_mask,
                                                            image_at=image_at)
        return self.logits(hidden, logits_at), router_logits, budgets

    def generate(self, images: torch.Tensor, input_ids: torch.Tensor, prompt_lens: Optional[torch.Tensor] = None,
                 max_new_tokens: int = 16, **kwargs):
        """Cached generation from right-padded prompts: images (B, 3, S, S) or TiledImages, input_ids (B, P),
        prompt_lens (B,) (None: all P) -> src.models.generation.GenerationOutput (tokens (B, N), ...).
        kwargs: budget, eos_id, pad_id, temperature, top_k, generator, prompt_mask, image_at (see `generate` there)."""
        from src.models.generation import generate  # generation imports the decoder; keep this module light

        return generate(self, images, input_ids, prompt_lens, max_new_tokens, **kwargs)

    def new_tensor_names(self) -> List[str]:
        """State-dict tensors (parameters and buffers) VISOR adds to a base LVLM: the cross sublayers,
        the positional conv, the router (with its feature statistics)."""
        prefixes = ["decoder." + p for p in self.decoder.new_parameter_prefixes()] + ["pos_conv.", "policy."]
        return [n for n in self.state_dict() if any(n.startswith(p) for p in prefixes)]
