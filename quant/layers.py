"""Quantized layers holding only packed codes, lookup tables and the bias (no dense weight)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .activations import check_act_bits, quantize_conv_input, quantize_tokens
from .layer_table import is_linear_like
from .packed import PackedLayout, PackedWeight
from .quantizers import QuantizedWeight, quantize_weight


class _QuantBase(nn.Module):
    """A layer whose ``weight`` Parameter is a :class:`~.packed.PackedWeight` (codes + table, no dense weight) and
    whose optional ``bias`` is a dense Parameter.

    ``cache_weight = True`` keeps a dequantized copy between calls (faster, costs the dense memory).
    """

    kind = ""

    def _init_weight(self, packing: PackedLayout, has_bias: bool, act_bits: int, device=None) -> None:
        check_act_bits(act_bits)
        self.act_bits = act_bits
        self.cache_weight = False
        self._cached: torch.Tensor | None = None
        raw = torch.zeros(packing.nbytes, dtype=torch.uint8, device=device)
        self.weight = nn.Parameter(PackedWeight.wrap(raw, packing), requires_grad=False)
        bias = torch.zeros(packing.n_out, dtype=packing.dtype, device=device) if has_bias else None
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    packing = property(lambda self: self.weight.packing, doc="the packed weight's layout")
    method = property(lambda self: self.packing.method)
    bits = property(lambda self: self.packing.bits)
    group_size = property(lambda self: self.packing.group_size)
    weight_shape = property(lambda self: self.packing.shape, doc="shape of the dense weight this layer replaces")
    weight_dtype = property(lambda self: self.packing.dtype, doc="dtype of the dense weight this layer replaces")
    n_out = property(lambda self: self.packing.n_out)
    k_in = property(lambda self: self.packing.k_in)
    option = property(lambda self: self.packing.option)

    def load_quantized(self, q: QuantizedWeight) -> None:
        """Use a prepared packed weight (e.g. from an option table; shared, not copied) in this layer."""
        if q.packing != self.packing:
            raise ValueError(f"quantized weight {q.option} {tuple(q.shape)} does not fit this layer "
                             f"({self.option} {self.weight_shape})")
        self.weight = nn.Parameter(q.packed, requires_grad=False)
        self._cached = None

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight (original shape) rebuilt from codes and tables."""
        if self._cached is not None and (dtype is None or self._cached.dtype == dtype):
            return self._cached
        w = self.weight.dequantize(dtype or self.weight_dtype)
        if self.cache_weight:
            self._cached = w
        return w

    def _apply(self, fn, recurse=True):  # .to()/.cuda() invalidate the cached dense weight
        self._cached = None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        act = f", act_bits={self.act_bits}" if self.act_bits < 16 else ""
        return f"{self.option}, weight={list(self.weight_shape)}, bias={self.bias is not None}{act}"


class QuantLinear(_QuantBase):
    """``nn.Linear`` with a packed LUT-quantized weight; forward through the kernel backend."""

    kind = "linear"

    def __init__(
        self, in_features: int, out_features: int, method: str, bits: int, bias: bool = True,
        weight_dtype: torch.dtype = torch.float16, group_size: int | None = None, act_bits: int = 16, device=None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        packing = PackedLayout(method, bits, (out_features, in_features), weight_dtype, group_size)
        self._init_weight(packing, bias, act_bits, device)

    @classmethod
    def from_quantized(cls, q: QuantizedWeight, bias: torch.Tensor | None = None, act_bits: int = 16) -> QuantLinear:
        """Build from a prepared quantized weight (no re-quantization)."""
        if len(q.shape) != 2:
            raise ValueError(f"a Linear weight must be 2-D, got shape {tuple(q.shape)}")
        mod = cls(q.shape[1], q.shape[0], q.method, q.bits, bias is not None, q.dtype, q.group_size, act_bits,
                  device="meta")
        mod.load_quantized(q)
        if bias is not None:
            mod.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return mod

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, method: str, bits: int, act_bits: int = 16, seed: int = 0,
        group_size: int | None = None, name: str = "",
    ) -> QuantLinear:
        """Quantize an ``nn.Linear``."""
        q = quantize_weight(linear.weight, method, bits, seed=seed, group_size=group_size, name=name)
        return cls.from_quantized(q, linear.bias, act_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self._cached is not None or self.cache_weight:
            return F.linear(quantize_tokens(x, self.act_bits), self.dequantized_weight(x.dtype), bias)
        return packed_linear(x, self.weight, bias, self.act_bits)


class QuantConv2d(_QuantBase):
    """``nn.Conv2d`` with a packed LUT-quantized weight (dequantize, then the device's convolution)."""

    kind = "conv2d"

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size, method: str, bits: int, stride=1, padding=0,
        dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
        weight_dtype: torch.dtype = torch.float16, group_size: int | None = None, act_bits: int = 16, device=None,
    ):
        super().__init__()
        ks = nn.modules.utils._pair(kernel_size)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, ks
        self.stride, self.padding = nn.modules.utils._pair(stride), padding if isinstance(padding, str) else \
            nn.modules.utils._pair(padding)
        self.dilation, self.groups, self.padding_mode = nn.modules.utils._pair(dilation), groups, padding_mode
        shape = (out_channels, in_channels // groups, *ks)
        self._init_weight(PackedLayout(method, bits, shape, weight_dtype, group_size), bias, act_bits, device)

    @classmethod
    def from_conv(
        cls, conv: nn.Conv2d, method: str, bits: int, act_bits: int = 16, seed: int = 0,
        group_size: int | None = None, name: str = "", quantized: QuantizedWeight | None = None,
    ) -> QuantConv2d:
        """Quantize an ``nn.Conv2d`` (or use a prepared ``quantized`` weight)."""
        q = quantized or quantize_weight(conv.weight, method, bits, seed=seed, group_size=group_size, name=name)
        mod = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, q.method, q.bits, conv.stride, conv.padding,
            conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, q.dtype, q.group_size, act_bits,
            device="meta",
        )
        mod.load_quantized(q)
        if conv.bias is not None:
            mod.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=False)
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return dense_conv2d(self, x, self.dequantized_weight(x.dtype), bias)


def packed_linear(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None, act_bits: int = 16) -> torch.Tensor:
    """The forward of a quantized Linear: activation fake-quant (``act_bits`` < 16), then the LUT kernel."""
    if x.shape[-1] != weight.packing.k_in:
        raise ValueError(f"input has {x.shape[-1]} features, this layer expects {weight.packing.k_in}")
    return kernels.linear(quantize_tokens(x, act_bits), weight, bias)


def dense_conv2d(conv: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 act_bits: int | None = None) -> torch.Tensor:
    """``conv``'s convolution (its stride, padding, padding mode, dilation, groups) with a given dense weight, the
    input fake-quantized to ``act_bits`` (default: the layer's)."""
    x = quantize_conv_input(x, conv.act_bits if act_bits is None else act_bits)
    if conv.padding_mode != "zeros":
        pad = [p for p in reversed(conv.padding) for _ in range(2)]
        return F.conv2d(F.pad(x, pad, mode=conv.padding_mode), weight, bias, conv.stride, 0, conv.dilation,
                        conv.groups)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def quantized_module(
    module: nn.Module, q: QuantizedWeight, act_bits: int = 16
) -> QuantLinear | QuantConv2d:
    """The quantized replacement of a dense Linear/Conv2d from a prepared weight."""
    if isinstance(module, nn.Conv2d):
        return QuantConv2d.from_conv(module, q.method, q.bits, act_bits, quantized=q)
    if isinstance(module, nn.Linear) or is_linear_like(module):
        return QuantLinear.from_quantized(q, module.bias, act_bits)
    raise ValueError(f"cannot quantize a {type(module).__name__}: only Linear and Conv2d layers are supported")
