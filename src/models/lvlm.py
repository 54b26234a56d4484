"""VisorLVLM: vision encoder -> projector -> [pos conv] -> [token reducer] -> plan-driven decoder."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from src.models.decoder import Decoder, DecoderConfig
from src.models.plan import LayerPlan
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

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W), input_ids (B, T) right-padded -> logits (B, T, vocab)."""
        assert input_ids.dim() == 2 and input_ids.shape[0] == images.shape[0], (
            f"input_ids must be (B, T) with B={images.shape[0]}, got {tuple(input_ids.shape)}")
        visual = self.encode_images(images)
        text = self.decoder.embed_tokens(input_ids)  # (B, T, d)
        hidden, _ = self.decoder(visual, text)
        return self.decoder.lm_head(hidden)

    def new_parameter_names(self) -> List[str]:
        """Parameters VISOR adds to a base LVLM: the cross sublayers and the positional conv."""
        prefixes = ["decoder." + p for p in self.decoder.new_parameter_prefixes()] + ["pos_conv."]
        return [n for n, _ in self.named_parameters() if any(n.startswith(p) for p in prefixes)]
