"""LUT weight kernels over a :class:`~..packed.PackedWeight`: a small registry of backends with capabilities.

A :class:`Backend` has a name, a capability predicate ``supports(w, x_dtype, device, m)`` (``x_dtype``/``m`` None for
a dequantize) and two operations, ``linear(x, w, bias, chunk_rows)`` and ``dequantize(w, dtype, rows)``.
Backends are tried in registration order; the pure-PyTorch ``reference`` comes last, handles every call, and is the
oracle the others are tested against.

* ``triton`` — swap-AB split-K LUT GEMM for fp16/bf16 with ``M <= FUSED_MAX_M`` rows, dequant kernel + cuBLAS
  otherwise (more rows, fp32, rows not on 4-byte boundaries) (:mod:`.triton_lut`); CUDA tensors, per-layer and
  per-channel tables. Imported on first use; an import failure is reported
  once and the backend stays unused.
* ``reference`` — everything else (CPU, group-wise tables, float64, …).

``QUA2SEDIMO_BACKEND`` overrides the choice: ``auto`` (default: Triton on CUDA), ``reference`` (always the
reference), ``triton`` (Triton wherever it can run, CPU included under ``TRITON_INTERPRET=1`` set before import:
slow, tests only; elsewhere a one-time warning and the reference). A backend failing at run time with a non-input
error (e.g. a compile error on an unsupported GPU) is warned about once and no longer chosen for calls of that
kind (device, activation dtype, bits, table kind); the call is answered by the reference.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from ..packed import PackedWeight
from . import reference

__all__ = ["BACKEND_ENV", "Backend", "available_backends", "dequantize", "linear", "reference", "register_backend",
           "select"]

BACKEND_ENV = "QUA2SEDIMO_BACKEND"
_CHOICES = ("auto", "reference", "triton")


@dataclass(frozen=True)
class Backend:
    """A kernel backend: capability predicate and the two operations on packed weights."""

    name: str
    supports: Callable[[PackedWeight, torch.dtype | None, torch.device, int | None], bool]
    linear: Callable[..., torch.Tensor]
    dequantize: Callable[..., torch.Tensor]
    accelerator_only: bool = True  # chosen in ``auto`` mode only for CUDA tensors


REFERENCE = Backend("reference", lambda w, x_dtype, device, m: True, reference.linear, reference.dequantize,
                    accelerator_only=False)
_triton_state: dict[str, object] = {"module": None, "error": None}
_disabled: set[tuple] = set()  # (backend, device type, x dtype, bits, table kind) that failed at run time
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _triton() -> ModuleType | None:
    """:mod:`.triton_lut`, imported once; the failure (if any) is remembered, not retried."""
    if _triton_state["module"] is None and _triton_state["error"] is None:
        try:
            from . import triton_lut
        except Exception as exc:  # ImportError, or a broken triton/driver install
            _triton_state["error"] = exc
        else:
            _triton_state["module"] = triton_lut
    return _triton_state["module"]  # type: ignore[return-value]


def _triton_supports(w: PackedWeight, x_dtype: torch.dtype | None, device: torch.device, m: int | None) -> bool:
    mod = _triton()
    return mod is not None and mod.supports(w, x_dtype, device)


TRITON = Backend("triton", _triton_supports, lambda *a, **k: _triton().linear(*a, **k),
                 lambda *a, **k: _triton().dequantize(*a, **k))
_registry: list[Backend] = [TRITON, REFERENCE]


def register_backend(backend: Backend) -> None:
    """Add a backend, tried before the ones already registered (the reference stays the last resort)."""
    _registry[:] = [b for b in _registry if b.name != backend.name]
    _registry.insert(0, backend)


def _choice() -> str:
    value = os.environ.get(BACKEND_ENV, "").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(f"{BACKEND_ENV}={value!r} is not one of {_CHOICES}")
    return value


def available_backends() -> list[str]:
    """Backends usable in this process (``"triton"`` needs CUDA or ``TRITON_INTERPRET=1``)."""
    names = [b.name for b in _registry if b is not TRITON and b is not REFERENCE]
    mod = _triton()
    if mod is not None and (torch.cuda.is_available() or mod.INTERPRET):
        names.append("triton")
    return [*names, "reference"]


def _key(backend: Backend, w: PackedWeight, x_dtype: torch.dtype | None, device: torch.device) -> tuple:
    return backend.name, device.type, x_dtype, w.packing.bits, w.packing.table_kind


def select(w: PackedWeight, x_dtype: torch.dtype | None = None, device: torch.device | str | None = None,
           m: int | None = None) -> Backend:
    """The backend that serves this call (a linear with ``x_dtype``/``m`` rows, or a dequantize when None)."""
    device = torch.device(device) if device is not None else w.device
    choice = _choice()
    if choice == "reference":
        return REFERENCE
    for backend in _registry:
        if backend is REFERENCE:
            break
        if choice == "triton" and backend is not TRITON:
            continue
        if choice == "auto" and backend.accelerator_only and device.type != "cuda":
            continue
        if _key(backend, w, x_dtype, device) in _disabled:
            continue
        if backend is TRITON and _triton() is None:
            _warn_once("import", f"qua2sedimo: triton backend unavailable ({_triton_state['error']!r}); using the "
                                 "reference")
            continue
        if backend.supports(w, x_dtype, device, m):
            return backend
        if choice == "triton" and device.type not in ("cuda",) and not (device.type == "cpu" and _triton().INTERPRET):
            _warn_once(f"device:{device.type}",
                       f"qua2sedimo: {BACKEND_ENV}=triton cannot run on {device.type} tensors (CUDA only; CPU needs "
                       "TRITON_INTERPRET=1 set before import); using the reference backend")
    return REFERENCE


def _run(backend: Backend, op: str, key: tuple, *args: object) -> torch.Tensor:
    fn = getattr(backend, op)
    if backend is REFERENCE:
        return fn(*args)
    try:
        return fn(*args)
    except (ValueError, TypeError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as exc:  # compile/launch failure: never return garbage, stop choosing it for such calls
        _disabled.add(key)
        _warn_once(f"runtime:{key}", f"qua2sedimo: {backend.name} backend failed ({exc!r}) for {key[1:]}; using "
                                     "the reference for such calls from now on")
        return getattr(REFERENCE, op)(*args)


def _check_packed(w: object) -> PackedWeight:
    if not isinstance(w, PackedWeight):
        raise TypeError(f"expected a PackedWeight, got {type(w).__name__} (build it with PackedWeight.from_parts)")
    return w


def linear(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None,
           chunk_rows: int | None = None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` of a packed weight, in ``x.dtype``, on the backend for this call."""
    _check_packed(w)
    if not isinstance(x, torch.Tensor):
        return reference.linear(x, w, bias, chunk_rows)  # raises the input error
    m = x.numel() // max(1, x.shape[-1]) if x.dim() else 0
    backend = select(w, x.dtype, x.device, m)
    return _run(backend, "linear", _key(backend, w, x.dtype, x.device), x, w, bias, chunk_rows)


def dequantize(w: PackedWeight, dtype: torch.dtype | None = None, rows: slice | None = None) -> torch.Tensor:
    """Dense ``[N, K]`` weight (rows ``rows``) in ``dtype`` (default: the table's), on the backend for ``w``."""
    _check_packed(w)
    out_dtype = w.packing.lut_dtype if dtype is None else dtype
    backend = select(w, None, w.device)
    if backend is not REFERENCE and out_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        backend = REFERENCE
    return _run(backend, "dequantize", _key(backend, w, None, w.device), w, dtype, rows)
