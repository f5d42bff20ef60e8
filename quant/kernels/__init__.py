"""LUT weight kernels and a small backend registry.

Backends (modules with identical ``lut_linear`` / ``dequantize`` signatures):

* ``reference`` — pure PyTorch; CPU, CUDA and anything else; handles every table kind (incl. group-wise).
* ``triton``    — fused LUT GEMM + dequant kernels (:mod:`.triton_lut`); CUDA tensors, per-layer and
  per-channel tables, fp16/bf16/fp32 activations. Imported lazily (on first CUDA use).

Selection (:func:`get_backend`), env ``QUA2SEDIMO_BACKEND``:

* ``auto`` (default): triton for CUDA devices when it imports, else the reference.
* ``reference``: always the reference.
* ``triton``: triton wherever it can run. On a non-CUDA device it runs only on CPU with ``TRITON_INTERPRET=1``
  set before import (slow; tests). Elsewhere the reference is used with a one-time warning — deliberately
  not an error, so a partly CPU-offloaded model keeps working.

If triton fails to import, or a triton launch fails with a non-input error (e.g. a compile error on an
unsupported GPU), a one-time ``RuntimeWarning`` is emitted and the reference is used from then on. Calls the
triton backend cannot serve (group-wise tables, float64) go to the reference.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

import torch

from . import reference

__all__ = ["available_backends", "dequantize", "get_backend", "lut_linear", "reference", "BACKEND_ENV"]

BACKEND_ENV = "QUA2SEDIMO_BACKEND"
_CHOICES = ("auto", "reference", "triton")
_state: dict[str, object] = {"triton": None, "error": None}
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _load_triton() -> ModuleType | None:
    """Import :mod:`.triton_lut` once; remember the failure (if any) instead of retrying."""
    if _state["triton"] is None and _state["error"] is None:
        try:
            from . import triton_lut
        except Exception as exc:  # ImportError, or a broken triton/driver install
            _state["error"] = exc
        else:
            _state["triton"] = triton_lut
    return _state["triton"]  # type: ignore[return-value]


def _choice() -> str:
    value = os.environ.get(BACKEND_ENV, "").strip().lower() or "auto"
    if value not in _CHOICES:
        raise ValueError(f"{BACKEND_ENV}={value!r} is not one of {_CHOICES}")
    return value


def available_backends() -> list[str]:
    """Backends usable in this process (``"triton"`` needs CUDA or ``TRITON_INTERPRET=1``)."""
    names = ["reference"]
    mod = _load_triton()
    if mod is not None and (torch.cuda.is_available() or mod.INTERPRET):
        names.append("triton")
    return names


def get_backend(device: torch.device | str | None = None) -> ModuleType:
    """Backend module for tensors on ``device`` (default: CUDA if available, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    choice = _choice()
    if choice == "reference" or (choice == "auto" and dev.type != "cuda"):
        return reference
    mod = _load_triton()
    if mod is None:
        _warn_once(
            "import", f"qua2sedimo: triton backend unavailable ({_state['error']!r}); using the reference"
        )
        return reference
    if dev.type != "cuda" and not (dev.type == "cpu" and mod.INTERPRET):
        _warn_once(
            f"device:{dev.type}",
            f"qua2sedimo: {BACKEND_ENV}=triton cannot run on {dev.type} tensors (CUDA only; CPU needs "
            "TRITON_INTERPRET=1 set before import); using the reference backend",
        )
        return reference
    return mod


def _pick(device: torch.device, x_dtype: torch.dtype | None, kind_args: tuple) -> ModuleType:
    backend = get_backend(device)
    if backend is reference:
        return reference
    try:
        kind = reference.table_kind(*kind_args)
    except ValueError:
        return reference  # let the reference raise its (identical) validation error
    return backend if backend.supports(x_dtype, kind) else reference


def _run(backend: ModuleType, name: str, *args: object) -> torch.Tensor:
    if backend is reference:
        return getattr(reference, name)(*args)
    try:
        return getattr(backend, name)(*args)
    except (ValueError, TypeError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as exc:  # compile/launch failure: never return garbage, fall back for good
        _state["triton"], _state["error"] = None, exc
        _warned.add("import")  # this warning replaces the "unavailable" one
        _warn_once("runtime", f"qua2sedimo: triton backend failed ({exc!r}); using the reference from now on")
        return getattr(reference, name)(*args)


def lut_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    lut: torch.Tensor,
    bits: int,
    k_in: int,
    bias: torch.Tensor | None = None,
    group_size: int | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """``F.linear(x, W, bias)`` of a LUT-quantized weight, on the backend for ``x.device``."""
    if not (isinstance(x, torch.Tensor) and isinstance(codes, torch.Tensor) and codes.dim() == 2):
        return reference.lut_linear(x, codes, lut, bits, k_in, bias, group_size, chunk_rows)  # raises
    backend = _pick(x.device, x.dtype, (codes, lut, bits, codes.shape[0], k_in, group_size))
    return _run(backend, "lut_linear", x, codes, lut, bits, k_in, bias, group_size, chunk_rows)


def dequantize(
    codes: torch.Tensor,
    lut: torch.Tensor,
    bits: int,
    n_out: int,
    k_in: int,
    group_size: int | None = None,
    dtype: torch.dtype | None = None,
    rows: slice | None = None,
) -> torch.Tensor:
    """Dense ``[N, K]`` weight (``dtype`` default ``lut.dtype``), on the backend for ``codes.device``."""
    if not (isinstance(codes, torch.Tensor) and isinstance(lut, torch.Tensor)):
        return reference.dequantize(codes, lut, bits, n_out, k_in, group_size, dtype, rows)  # raises
    out_dtype = lut.dtype if dtype is None else dtype
    backend = _pick(codes.device, None, (codes, lut, bits, n_out, k_in, group_size))
    if backend is not reference and out_dtype not in backend.ACT_DTYPES:
        backend = reference
    return _run(backend, "dequantize", codes, lut, bits, n_out, k_in, group_size, dtype, rows)
