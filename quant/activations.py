"""Activation fake-quantization: the paper's dynamic, asymmetric, token-wise min-max scheme.

This is an *accuracy simulation* (quantize → dequantize in the activation dtype); the weights stay
packed and the matmul runs at the activation precision.
"""

from __future__ import annotations

import torch

ACT_BITS = (16, 8, 6)


def check_act_bits(act_bits: int) -> None:
    if act_bits not in ACT_BITS:
        raise ValueError(f"unsupported activation bits {act_bits!r}: use one of {ACT_BITS} (16 = off)")


def fake_quant_minmax(x: torch.Tensor, bits: int, dims: tuple[int, ...]) -> torch.Tensor:
    """Asymmetric min-max quantize→dequantize of ``x`` with one range per slice reduced over ``dims``."""
    qmax = (1 << bits) - 1
    xf = x.float()
    lo = xf.amin(dim=dims, keepdim=True)
    hi = xf.amax(dim=dims, keepdim=True)
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(xf / scale) + zero, 0, qmax)
    return ((q - zero) * scale).to(x.dtype)


def quantize_tokens(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-token fake-quant of Linear inputs ``[..., C]`` (one range per row)."""
    if bits >= 16:
        return x
    return fake_quant_minmax(x, bits, (-1,))


def quantize_conv_input(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Fake-quant of Conv2d inputs ``[B, C, H, W]`` with one range per (sample, channel)."""
    if bits >= 16:
        return x
    return fake_quant_minmax(x, bits, tuple(range(2, x.dim())))
