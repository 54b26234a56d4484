"""VisorLVLM: vision encoder -> projector -> [pos conv] -> [token reducer] -> plan-driven decoder."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from src.models.decoder import Decoder, DecoderConfig
from src.models.plan import LayerPlan
from src.models.policy import BudgetPolicy
from src.models.projector import Projector, VisualPosConv
from src.models.token_reduction import TokenReducer
from src.models.vision import VisionEncoder


class VisorLVLM(nn.Module):
    """A LLaVA-style LVLM whose decoder layers follow a VISOR LayerPlan.

    With `plan.all_self` and `pos_conv=False` it is the original LVLM (the base model).
    """

    def __init__(
        self,
        vision: VisionEncoder,
        decoder: DecoderConfig,
        plan: LayerPlan,
        pos_conv: bool = True,
        token_reducer: Optional[TokenReducer] = None,
        cross_init: str = "host",
        policy_hidden: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.vision = vision
        self.projector = Projector(vision.out_dim, decoder.d_model)
        self.pos_conv = VisualPosConv(decoder.d_model) if pos_conv else None
        self.token_reducer = token_reducer
        self.visual_grid: Tuple[int, int] = vision.grid
        if token_reducer is not None:
            self.visual_grid = token_reducer.output_grid(vision.grid)
        self.decoder = Decoder(decoder, plan, cross_init)
        # The budget router (policy stage): before the first optional self layer.
        self.policy = BudgetPolicy(decoder.d_model, plan.n_budgets, policy_hidden) if policy_hidden else None

    @property
    def plan(self) -> LayerPlan:
        return self.decoder.plan

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens entering the LLM (after any token reduction)."""
        return self.visual_grid[0] * self.visual_grid[1]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> visual tokens at LLM width (B, V, d)."""
        visual = self.projector(self.vision(images))  # (B, V0, d)
        if self.pos_conv is not None:
            visual = self.pos_conv(visual)
        if self.token_reducer is not None:
            visual = self.token_reducer(visual, self.vision.grid)  # (B, V, d)
        return visual

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor,
                budget: Optional[Union[int, torch.Tensor]] = None) -> torch.Tensor:
        """images (B, 3, H, W), input_ids (B, T) right-padded, budget None (largest) / index / (B,)
        indices -> logits (B, T, vocab)."""
        assert input_ids.dim() == 2 and input_ids.shape[0] == images.shape[0], (
            f"input_ids must be (B, T) with B={images.shape[0]}, got {tuple(input_ids.shape)}")
        visual = self.encode_images(images)
        text = self.decoder.embed_tokens(input_ids)  # (B, T, d)
        hidden, _ = self.decoder(visual, text, budget=budget)
        return self.decoder.lm_head(hidden)

    def routed(self, images: torch.Tensor, input_ids: torch.Tensor, prompt_mask: torch.Tensor,
               choose: Callable[[torch.Tensor], torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run with the router: layers before the first optional self layer, then the router on their
        hidden states (prompt_mask (B, T) bool marks the question tokens it pools), then
        `choose(router logits (B, K)) -> budgets (B,)`, then the rest at those budgets.
        -> (logits (B, T, vocab), router logits (B, K), budgets (B,))."""
        if self.policy is None or self.plan.first_optional is None:
            raise ValueError("routed(): the model has no policy (model.lvlm.init_args.policy_hidden) or the plan "
                             "no optional self layers (plan.optional_self)")
        dec = self.decoder
        visual = self.encode_images(images)
        text = dec.embed_tokens(input_ids)  # (B, T, d)
        cos, sin = dec.rope(visual.shape[1], text.shape[1], text.device, text.dtype)
        first = self.plan.first_optional
        visual, text = dec.run_layers(visual, text, 0, first, cos, sin)
        router_logits = self.policy(text, prompt_mask, visual)  # (B, K)
        budgets = choose(router_logits)
        visual, text = dec.run_layers(visual, text, first, dec.config.n_layers, cos, sin, budgets)
        return dec.lm_head(dec.norm(text)), router_logits, budgets

    def new_parameter_names(self) -> List[str]:
        """Parameters VISOR adds to a base LVLM: the cross sublayers, the positional conv, the router."""
        prefixes = ["decoder." + p for p in self.decoder.new_parameter_prefixes()] + ["pos_conv.", "policy."]
        return [n for n, _ in self.named_parameters() if any(n.startswith(p) for p in prefixes)]
