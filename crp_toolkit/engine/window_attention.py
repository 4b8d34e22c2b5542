"""torchvision Swin's shifted-window attention written out as explicit ops.

torchvision computes it in one function, ``shifted_window_attention``, kept whole by tracing
(``torch.fx.wrap``) because its padding, shift and mask depend on the feature map's size.
:class:`ExplicitWindowAttention` keeps that dependence in three shape functions (padding,
effective shift, shift mask), which compute constants from shapes and carry no relevance,
and writes the rest as ops with rules: pad, roll, window partition (view, permute), the qkv
projection, ``q k^T`` scaled (or cosine similarity times the logit scale, v2), the relative
position bias and shift mask added, softmax, attention times v, the output projection, the
reverse partition, roll and crop.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crp_toolkit.engine.ops import shape_function

__all__ = ["ExplicitWindowAttention", "is_window_attention", "shared_linear"]


def shared_linear(weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Linear:
    """An ``nn.Linear`` holding the given parameters themselves (no copy, no initialisation)."""
    linear = nn.Linear(1, 1, bias=bias is not None, device="meta")
    linear.in_features, linear.out_features = weight.shape[1], weight.shape[0]
    linear.weight = weight
    if bias is not None:
        linear.bias = bias
    return linear


def is_window_attention(module: nn.Module) -> bool:
    """torchvision's ``ShiftedWindowAttention`` or ``ShiftedWindowAttentionV2``."""
    return type(module).__module__ == "torchvision.models.swin_transformer" and type(
        module
    ).__name__ in ("ShiftedWindowAttention", "ShiftedWindowAttentionV2")


def window_padding(x: Tensor, window: list[int]) -> tuple[int, ...]:
    """``F.pad`` amounts that make the (B, H, W, C) map a multiple of the window."""
    _, h, w, _ = x.shape
    return (
        0,
        0,
        0,
        (window[1] - w % window[1]) % window[1],
        0,
        (window[0] - h % window[0]) % window[0],
    )


def effective_shift(x: Tensor, window: list[int], shift: list[int]) -> tuple[int, int]:
    """The cyclic shift of the padded map: none along an axis the window covers whole."""
    _, h, w, _ = x.shape
    return (0 if window[0] >= h else shift[0], 0 if window[1] >= w else shift[1])


def shift_mask(x: Tensor, window: list[int], shift: tuple[int, int]) -> Tensor:
    """(windows, 1, L, L) additive mask (-100 between regions a cyclic shift brought together,
    0 elsewhere) of the padded map ``x``; all zeros without a shift."""
    _, h, w, _ = x.shape
    windows, size = (h // window[0]) * (w // window[1]), window[0] * window[1]
    if sum(shift) == 0:
        return x.new_zeros(windows, 1, size, size)
    regions = x.new_zeros(h, w)
    bounds = [((0, -win), (-win, -s), (-s, None)) for win, s in zip(window, shift, strict=True)]
    for count, (rows, cols) in enumerate((r, c) for r in bounds[0] for c in bounds[1]):
        regions[rows[0] : rows[1], cols[0] : cols[1]] = count
    regions = regions.view(h // window[0], window[0], w // window[1], window[1])
    regions = regions.permute(0, 2, 1, 3).reshape(windows, size)
    differ = regions.unsqueeze(1) - regions.unsqueeze(2)
    return torch.where(differ != 0, -100.0, 0.0).to(x.dtype).unsqueeze(1)


for _function in (window_padding, effective_shift, shift_mask):
    shape_function(_function)
torch.fx.wrap("window_padding")
torch.fx.wrap("effective_shift")
torch.fx.wrap("shift_mask")


class ExplicitWindowAttention(nn.Module):
    """A Swin window-attention module as explicit ops, sharing its parameters (v2's qkv bias,
    whose key part torchvision zeroes at every call, is held as that zeroed copy)."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.window, self.shift = list(attention.window_size), list(attention.shift_size)
        self.num_heads = attention.num_heads
        self.qkv, self.proj = attention.qkv, attention.proj
        self.logit_scale = getattr(attention, "logit_scale", None)
        self.cosine = self.logit_scale is not None
        if self.cosine and attention.qkv.bias is not None:
            bias = attention.qkv.bias.detach().clone()
            bias[bias.numel() // 3 : 2 * bias.numel() // 3] = 0
            self.qkv = shared_linear(attention.qkv.weight, nn.Parameter(bias, requires_grad=False))
        self.attention = attention  # its relative position bias (a function of parameters)

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, C = x.shape
        x = F.pad(x, window_padding(x, self.window))
        _, h, w, _ = x.shape
        shift = effective_shift(x, self.window, self.shift)
        mask = shift_mask(x, self.window, shift)
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        (wh, ww), heads = self.window, self.num_heads
        x = x.view(B, h // wh, wh, w // ww, ww, C).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(-1, wh * ww, C)
        q, k, v = self.qkv(x).unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        if not self.cosine:
            attn = (q * (C // heads) ** -0.5) @ k.transpose(-2, -1)
        else:
            scale = torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
            attn = (F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)) * scale
        attn = attn + self.attention.get_relative_position_bias()
        attn = (attn.unflatten(0, (B, -1)) + mask).flatten(0, 1)
        x = (attn.softmax(-1) @ v).transpose(1, 2).flatten(2)
        x = self.proj(x).view(B, h // wh, w // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5)
        x = torch.roll(x.reshape(B, h, w, C), shifts=shift, dims=(1, 2))
        return x[:, :H, :W, :].contiguous()
