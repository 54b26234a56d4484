"""Projector (vision features -> LLM width) and the visual conditional positional embedding."""
import torch
from torch import nn


class Projector(nn.Module):
    """2-layer MLP, as LLaVA: (B, V, Cv) -> (B, V, d)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisualPosConv(nn.Module):
    """x + depthwise_conv1d(x) over the visual token sequence (kernel 7), zero-initialised.

    Cross layers use no RoPE on visual keys, so the tokens carry their position in their
    content instead. Zero init makes it the identity until trained. (B, V, d) -> (B, V, d)."""

    def __init__(self, dim: int, kernel_size: int = 7) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"pos_conv kernel_size must be odd, got {kernel_size}")
        self.conv = nn.Conv1d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x.transpose(1, 2)).transpose(1, 2)
