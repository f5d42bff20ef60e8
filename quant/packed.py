"""The packed LUT weight: one uint8 tensor holding a layer's codes and lookup table, described by a validated layout.

A quantized ``[N, K]`` weight (``K`` = inputs × kernel) is ``codes`` uint8 ``[N, packed_length(K, bits)]`` (see
:mod:`.packing`) plus a table ``lut [R, 2**bits]`` with ``W[n, k] = lut[r(n, k), code[n, k]]``:

* ``R == 1``  ("layer"):   ``r = 0`` (K-Means-A);
* ``R == N``  ("channel"): ``r = n`` (folded UAQ, K-Means-C);
* ``R == N * ceil(K / group_size)`` ("group"): ``r = n * ceil(K / group_size) + k // group_size``.

:class:`PackedWeight` stores both in **one** uint8 tensor ``[codes bytes | padding | table bytes]``; ``codes`` and
``lut`` are views into it. Being a plain uint8 tensor (a subclass that only adds the :class:`PackedLayout`), it moves,
pins, offloads and is sized (``numel() * element_size()`` = the real bytes) like any other weight by code that knows
nothing about it — ComfyUI's model patcher and offloader included — and sits in a layer as its ``weight`` Parameter.
Casting it to a floating dtype (``w.to(torch.bfloat16)``, ``w.float()``) gives the dequantized dense weight.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .options import check_method_bits
from .packing import packed_length

LUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TABLE_ALIGN = 16  # the table starts at a 16-byte offset: any float view of it is aligned


def lut_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Tables are stored at the weight's own precision (fp16/bf16/fp32; others → fp32)."""
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


def lut_rows(method: str, n_out: int, k_in: int, group_size: int | None = None) -> int:
    """Rows of the lookup table: one per output channel (or channel group), or one per layer."""
    if method == "kmeans_a":
        return 1
    if method == "uaq" and group_size:
        return n_out * -(-k_in // group_size)
    return n_out


def n_out_k_in(shape: Sequence[int]) -> tuple[int, int]:
    """A weight of shape ``[out, in, *kernel]`` as rows × columns ``(out, in·prod(kernel))``."""
    if len(shape) < 2:
        raise ValueError(f"a quantizable weight needs at least 2 dimensions, got shape {tuple(shape)}")
    return int(shape[0]), int(math.prod(shape[1:]))


@dataclass(frozen=True)
class PackedLayout:
    """What a packed weight holds: the option, the dense weight's shape and dtype, the table's dtype and rows.

    Validated once, here; everything that reads codes/tables (layers, option table, file, kernels) relies on it.
    """

    method: str
    bits: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    group_size: int | None = None
    lut_dtype: torch.dtype | None = None  # default: lut_dtype_for(dtype)
    n_out: int = field(init=False)
    k_in: int = field(init=False)
    lut_rows: int = field(init=False)

    def __post_init__(self) -> None:
        check_method_bits(self.method, self.bits)
        shape = tuple(self.shape)
        if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
            raise ValueError(f"a packed weight's shape must be positive integers, got {shape!r}")
        n, k = n_out_k_in(shape)
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise ValueError(f"a packed weight's dense dtype must be floating point, got {self.dtype!r}")
        group = self.group_size or None
        if group is not None and (not isinstance(group, int) or group < 1):
            raise ValueError(f"group_size must be None or a positive int, got {self.group_size!r}")
        if group is not None and self.method != "uaq":
            raise ValueError(f"group-wise tables are only defined for 'uaq', not {self.method!r}")
        lut_dtype = self.lut_dtype or lut_dtype_for(self.dtype)
        if lut_dtype not in LUT_DTYPES:
            raise ValueError(f"table dtype must be float16/bfloat16/float32/float64, got {lut_dtype}")
        for name, value in (("shape", shape), ("group_size", group), ("lut_dtype", lut_dtype), ("n_out", n),
                            ("k_in", k), ("lut_rows", lut_rows(self.method, n, k, group))):
            object.__setattr__(self, name, value)

    @property
    def option(self) -> str:
        return f"{self.method}-{self.bits}"

    @property
    def levels(self) -> int:
        return 1 << self.bits

    @property
    def table_kind(self) -> str:
        """``"layer"`` (one table), ``"channel"`` (one per output row) or ``"group"``."""
        if self.lut_rows == 1:
            return "layer"
        return "channel" if self.lut_rows == self.n_out else "group"

    @property
    def codes_shape(self) -> tuple[int, int]:
        return self.n_out, packed_length(self.k_in, self.bits)

    @property
    def lut_shape(self) -> tuple[int, int]:
        return self.lut_rows, self.levels

    @property
    def lut_offset(self) -> int:
        n, row = self.codes_shape
        return -(-(n * row) // _TABLE_ALIGN) * _TABLE_ALIGN

    @property
    def nbytes(self) -> int:
        """Bytes of the packed tensor (codes, alignment padding, table)."""
        return self.lut_offset + self.lut_rows * self.levels * self.lut_dtype.itemsize

    @property
    def stored_nbytes(self) -> int:
        """Bytes of codes and table alone (the accounting of :mod:`.accounting`)."""
        return math.prod(self.codes_shape) + self.lut_rows * self.levels * self.lut_dtype.itemsize

    def check_parts(self, codes: torch.Tensor, lut: torch.Tensor) -> None:
        """``codes`` and ``lut`` fit this layout (dtype, shape, device); raises ``ValueError`` naming the mismatch."""
        if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8 or tuple(codes.shape) != self.codes_shape:
            got = f"{codes.dtype} {tuple(codes.shape)}" if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise ValueError(f"codes are {got}, expected uint8 {self.codes_shape} for {self.option} {self.shape} "
                             "(packed_length(K, bits) bytes per output row)")
        if not isinstance(lut, torch.Tensor) or lut.dtype != self.lut_dtype or tuple(lut.shape) != self.lut_shape:
            got = f"{lut.dtype} {tuple(lut.shape)}" if isinstance(lut, torch.Tensor) else type(lut).__name__
            raise ValueError(f"table is {got}, expected {self.lut_dtype} {self.lut_shape} for {self.option} "
                             f"{self.shape}" + ("" if self.group_size else " (group-wise tables need group_size)"))
        if lut.device != codes.device:
            raise ValueError(f"table is on {lut.device} but codes are on {codes.device}")
        if not bool(torch.isfinite(lut).all()):
            raise ValueError(f"table of {self.option} {self.shape} has NaN/Inf values")

    def to_json(self) -> dict:
        return {"option": self.option, "shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch."),
                "group_size": self.group_size}


# Tensor methods that return the same bytes (moved, copied, pinned, detached): the result keeps the layout.
_SAME_BYTES = {torch.Tensor.to, torch.Tensor.detach, torch.Tensor.clone, torch.Tensor.cpu, torch.Tensor.cuda,
               torch.Tensor.pin_memory, torch.Tensor.contiguous, torch.Tensor.requires_grad_,
               torch.Tensor.share_memory_, torch.Tensor.detach_, torch.Tensor.data.__get__}


class PackedWeight(torch.Tensor):
    """A layer's packed codes and lookup table in one uint8 tensor, with its :class:`PackedLayout`.

    Build with :meth:`from_parts`; read with :attr:`codes`, :attr:`lut`, :meth:`dequantize`. ``patches`` holds
    weight patches (e.g. ComfyUI LoRA patches) that the layer applies to the dequantized weight on the fly; it is
    carried by copies of the tensor and starts empty.
    """

    packing: PackedLayout
    patches: list

    @classmethod
    def wrap(cls, raw: torch.Tensor, layout: PackedLayout, patches: list | None = None) -> PackedWeight:
        """View a 1-D uint8 tensor of ``layout.nbytes`` bytes as a packed weight (no copy)."""
        if raw.dtype != torch.uint8 or raw.dim() != 1 or raw.numel() != layout.nbytes:
            raise ValueError(f"a packed {layout.option} {layout.shape} weight is {layout.nbytes} uint8 bytes, got "
                             f"{raw.dtype} {tuple(raw.shape)}")
        with torch._C.DisableTorchFunctionSubclass():
            out = raw.as_subclass(cls)
        out.packing = layout
        out.patches = list(patches or ())
        return out

    @classmethod
    def from_parts(cls, codes: torch.Tensor, lut: torch.Tensor, layout: PackedLayout) -> PackedWeight:
        """Pack ``codes`` and ``lut`` (validated against ``layout``) into one new tensor on their device."""
        layout.check_parts(codes, lut)
        raw = torch.zeros(layout.nbytes, dtype=torch.uint8, device=codes.device)
        raw[: codes.numel()].copy_(codes.reshape(-1))
        raw[layout.lut_offset:].copy_(lut.contiguous().reshape(-1).view(torch.uint8))
        return cls.wrap(raw, layout)

    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """The serialisation of files and option tables: ``{prefix}codes`` and ``{prefix}lut`` (contiguous, CPU)."""
        return {f"{prefix}codes": self.codes.contiguous().cpu(), f"{prefix}lut": self.lut.contiguous().cpu()}

    @property
    def raw(self) -> torch.Tensor:
        """The bytes as a plain uint8 tensor (shares memory)."""
        with torch._C.DisableTorchFunctionSubclass():
            return self.as_subclass(torch.Tensor)

    @property
    def codes(self) -> torch.Tensor:
        n, row = self.packing.codes_shape
        return self.raw[: n * row].view(n, row)

    @property
    def lut(self) -> torch.Tensor:
        lay = self.packing
        return self.raw[lay.lut_offset:].view(lay.lut_dtype).view(lay.lut_shape)

    def dequantize(self, dtype: torch.dtype | None = None, rows: slice | None = None) -> torch.Tensor:
        """The dense weight (``[N, K]`` rows ``rows``, else the layer's full shape) in ``dtype`` (default: the
        dense weight's dtype), on the kernel backend for this tensor's device."""
        from . import kernels

        w = kernels.dequantize(self, dtype or self.packing.dtype, rows)
        return w if rows is not None else w.reshape(self.packing.shape)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        src = args[0] if args and isinstance(args[0], PackedWeight) else None
        if src is not None and func in (torch.Tensor.to, torch.Tensor.type) and _float_target(args[1:], kwargs):
            return _to_dense(src, args[1:], kwargs)
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if (src is not None and func in _SAME_BYTES and isinstance(out, torch.Tensor)
                and out.dtype == torch.uint8 and out.numel() == src.packing.nbytes):
            return out if isinstance(out, PackedWeight) else PackedWeight.wrap(out, src.packing, src.patches)
        return out

    def __reduce_ex__(self, protocol):
        return PackedWeight.wrap, (self.raw.detach().clone(), self.packing)

    def __deepcopy__(self, memo):
        out = PackedWeight.wrap(self.raw.detach().clone(), self.packing, list(self.patches))
        memo[id(self)] = out
        return out

    def __repr__(self, *, tensor_contents=None) -> str:
        lay = self.packing
        return (f"PackedWeight({lay.option}, shape={list(lay.shape)}, dtype={lay.dtype}, table={lay.table_kind}, "
                f"{lay.nbytes} bytes, device={self.device})")


def _float_target(args: tuple, kwargs: dict) -> torch.dtype | None:
    dtype = kwargs.get("dtype")
    for a in args:
        if isinstance(a, torch.dtype):
            dtype = a
        elif isinstance(a, torch.Tensor):
            dtype = a.dtype
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def _to_dense(src: PackedWeight, args: tuple, kwargs: dict) -> torch.Tensor:
    """``packed.to(<float dtype>[, device])``: the dequantized weight (moved first, so it is built on the target)."""
    dtype = _float_target(args, kwargs)
    device = kwargs.get("device")
    for a in args:
        if isinstance(a, str | torch.device):
            device = a
        elif isinstance(a, torch.Tensor):
            device = a.device
    moved = src if device is None else src.to(device, non_blocking=bool(kwargs.get("non_blocking", False)))
    return moved.dequantize(dtype)


def is_packed(t: object) -> bool:
    return isinstance(t, PackedWeight)
