"""Paired, calibration-free objectives against the full-precision model (fixed seeds), and FID.

* ``denoise_error`` (default, cheapest): the FP sampler runs once; :class:`StateRecorder` keeps its denoiser
  calls ``(x_t, t, conditioning) → out`` and picks N states spread over each trajectory
  (:class:`TrajectoryStates`, cached on disk as safetensors + a JSON header). A config's score is
  :class:`DenoiseError`: the mean over states of ``‖out − out_FP‖² / ‖out_FP‖²``, teacher-forced
  (one denoiser call per state, no sampling per config).
* ``image``: distances of final latents / decoded images to the FP ones: :func:`nmse`, :func:`psnr`,
  :func:`ssim` (Wang et al. 2004), bundled as :class:`ImageDistance`.
* ``fid``: Fréchet distance of pytorch-fid Inception pool3 features (:func:`frechet_distance`,
  :func:`feature_stats`, :class:`FIDObjective`). The Inception weights are the user's file
  (:data:`FID_WEIGHTS_FILE`) in a folder they choose; nothing is ever downloaded.

Pure torch/numpy/scipy; no ComfyUI. Images are ``[B, C, H, W]`` (ComfyUI's IMAGE is ``[B, H, W, C]``:
permute first).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from scipy import linalg
from torch import nn

from ..quant.atomic import atomic_write_with

DenoiseFn = Callable[..., torch.Tensor]
"""``denoise_fn(x, t, **cond) -> out`` (the model function, quantized or FP, supplied by the caller)."""

STATES_FORMAT = "qua2sedimo.trajectory_states"
STATES_VERSION = 1

# ============================================================================ conditioning structures
# A conditioning value is a tensor, None, bool, int, float, str, or a list/tuple/dict (str keys) of such.
_SCALARS = (bool, int, float, str, type(None))


def _check_value(value: Any, path: str) -> None:
    if isinstance(value, (torch.Tensor, *_SCALARS)):
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_value(v, f"{path}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"conditioning {path} has a non-string key {k!r}; only str keys can be stored")
            _check_value(v, f"{path}[{k!r}]")
        return
    raise ValueError(
        f"conditioning {path} is a {type(value).__name__}: only tensors, numbers, strings, None and "
        "lists/tuples/dicts of them can be recorded (drop or convert this entry)"
    )


def _leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, leaf)`` in a fixed order; containers are described by their path only."""
    if isinstance(value, list | tuple):
        yield path, ("list" if isinstance(value, list) else "tuple", len(value))
        for i, v in enumerate(value):
            yield from _leaves(v, f"{path}[{i}]")
    elif isinstance(value, dict):
        yield path, ("dict", tuple(value))
        for k, v in value.items():
            yield from _leaves(v, f"{path}[{k!r}]")
    else:
        yield path, value


def _structure(cond: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Keys, nesting and leaf kinds (tensor ndim/dtype, or the type of other leaves)."""
    out = []
    for path, leaf in _leaves(dict(cond)):
        if isinstance(leaf, torch.Tensor):
            out.append((path, ("tensor", leaf.dim(), str(leaf.dtype))))
        elif isinstance(leaf, tuple) and len(leaf) == 2 and leaf[0] in ("list", "tuple", "dict"):
            out.append((path, leaf))
        else:
            out.append((path, type(leaf).__name__))
    return out


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, list):
        return [_map_tensors(v, fn) for v in value]
    if isinstance(value, tuple):
        return tuple(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def _top_key(path: str) -> str:
    return path[2:path.index("'", 2)] if path.startswith("['") else path


# ==================================================================================== states
@dataclass
class DenoiseState:
    """One recorded denoiser call: input ``x`` (batch first), ``t`` (``[]`` or ``[B]``), conditioning
    kwargs, and the FP output (``None`` until a reference is computed)."""

    x: torch.Tensor
    t: torch.Tensor
    cond: dict[str, Any] = field(default_factory=dict)
    fp_out: torch.Tensor | None = None
    trajectory: int = 0
    step: int = 0

    @property
    def batch(self) -> int:
        return int(self.x.shape[0])


class TrajectoryStates(Sequence[DenoiseState]):
    """Validated states of one or more FP trajectories, saved to / loaded from safetensors (no pickle).

    Every tensor in ``cond`` with at least one dimension must have the batch size of ``x`` in dim 0,
    except under the top-level keys named in ``unbatched``. All states share one conditioning structure
    (keys, nesting, tensor ranks and dtypes), and either all or none have FP outputs. ``meta`` is free JSON
    (e.g. sampler settings); ``key`` identifies what the states were made from (:func:`states_cache_key`).
    """

    def __init__(
        self, states: Sequence[DenoiseState], meta: Mapping[str, Any] | None = None, key: str | None = None,
        unbatched: Iterable[str] = (),
    ):
        self.states = list(states)
        self.meta = dict(meta or {})
        self.key = key
        self.unbatched = tuple(unbatched)
        self._validate()

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, i):  # type: ignore[override]
        return self.states[i]

    def __iter__(self) -> Iterator[DenoiseState]:
        return iter(self.states)

    @property
    def has_reference(self) -> bool:
        return self.states[0].fp_out is not None

    def _validate(self) -> None:
        if not self.states:
            raise ValueError("no trajectory states: record at least one denoiser call")
        try:
            json.dumps(self.meta)
        except (TypeError, ValueError) as e:
            raise ValueError(f"meta must be JSON-serializable ({e})") from None
        first = None
        for i, s in enumerate(self.states):
            where = f"state {i}"
            if not isinstance(s, DenoiseState):
                raise ValueError(f"{where} is a {type(s).__name__}, not a DenoiseState")
            if not isinstance(s.x, torch.Tensor) or not s.x.is_floating_point() or s.x.dim() < 1:
                raise ValueError(f"{where}: x must be a floating tensor with a batch dimension")
            b = s.batch
            if not isinstance(s.t, torch.Tensor) or s.t.dim() > 1 or (s.t.dim() == 1 and s.t.shape[0] != b):
                shape = tuple(s.t.shape) if isinstance(s.t, torch.Tensor) else type(s.t).__name__
                raise ValueError(f"{where}: t has shape {shape}, expected () or ({b},) for x of batch {b}")
            if s.fp_out is not None:
                if not isinstance(s.fp_out, torch.Tensor) or s.fp_out.dim() < 1 or s.fp_out.shape[0] != b:
                    raise ValueError(f"{where}: the FP output must be a tensor with batch {b} in dim 0")
                if not bool(torch.isfinite(s.fp_out).all()):
                    raise ValueError(f"{where}: the FP output has non-finite values")
                if not bool((s.fp_out != 0).any()):
                    raise ValueError(f"{where}: the FP output is all zeros, so its relative error is undefined")
            if not isinstance(s.cond, dict):
                raise ValueError(f"{where}: conditioning must be a dict of keyword arguments")
            _check_value(s.cond, "cond")
            for path, leaf in _leaves(s.cond):
                if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1 and _top_key(path) not in self.unbatched \
                        and leaf.shape[0] != b:
                    raise ValueError(
                        f"{where}: conditioning cond{path} has shape {tuple(leaf.shape)}, but x has batch {b} "
                        f"(dim 0 must match; list the key in unbatched=... if it has no batch dimension)"
                    )
            if first is None:
                first = (_structure(s.cond), s.x.dim(), s.fp_out is not None)
                continue
            structure = _structure(s.cond)
            if structure != first[0]:
                pairs = zip(first[0], structure, strict=False)
                diff = next(
                    (f"cond{a[0]}: {a[1]} vs {b_[1]}" for a, b_ in pairs if a != b_),
                    f"{len(first[0])} vs {len(structure)} entries",
                )
                raise ValueError(f"{where}: conditioning differs in structure from state 0 ({diff})")
            if s.x.dim() != first[1]:
                raise ValueError(f"{where}: x has {s.x.dim()} dimensions, state 0 has {first[1]}")
            if (s.fp_out is not None) != first[2]:
                raise ValueError(f"{where}: either all states or none must have FP outputs")

    # ------------------------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> None:
        """Write all states as one safetensors file (atomically); shared tensors are stored once."""
        tensors: dict[str, torch.Tensor] = {}
        names: dict[int, str] = {}
        storages: set[int] = set()

        def ref(t: torch.Tensor) -> dict:
            name = names.get(id(t))
            if name is None:
                name = names[id(t)] = f"t{len(names)}"
                c = t.detach().to("cpu").contiguous()
                ptr = c.untyped_storage().data_ptr()
                if ptr in storages and c.numel():
                    c = c.clone()
                storages.add(c.untyped_storage().data_ptr())
                tensors[name] = c
            return {"tensor": name}

        def encode(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                return ref(v)
            if isinstance(v, list | tuple):
                return {"list" if isinstance(v, list) else "tuple": [encode(x) for x in v]}
            if isinstance(v, dict):
                return {"dict": {k: encode(x) for k, x in v.items()}}
            return v

        entries = [
            {
                "x": ref(s.x), "t": ref(s.t), "fp_out": None if s.fp_out is None else ref(s.fp_out),
                "cond": encode(s.cond), "trajectory": s.trajectory, "step": s.step,
            }
            for s in self.states
        ]
        header = {
            "format": STATES_FORMAT, "version": STATES_VERSION, "key": self.key, "meta": self.meta,
            "unbatched": list(self.unbatched), "states": entries,
        }
        metadata = {"format": STATES_FORMAT, "qua2sedimo": json.dumps(header)}
        atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike, key: str | None = None) -> TrajectoryStates:
        """Read and validate a states file; ``key`` (if given) must match the stored one."""
        path = Path(path)
        fix = f"delete {str(path)!r} and the states will be recorded again"
        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {}).get("qua2sedimo", "null"))
                if not isinstance(header, dict) or header.get("format") != STATES_FORMAT:
                    raise ValueError(f"{path.name!r} is not a Qua2SeDiMo trajectory-states file; {fix}")
                if header.get("version") != STATES_VERSION:
                    raise ValueError(f"{path.name!r} has states version {header.get('version')!r}; {fix}")
                if key is not None and header.get("key") != key:
                    raise ValueError(f"{path.name!r} was recorded for another model or settings; {fix}")
                available = set(f.keys())
                loaded: dict[str, torch.Tensor] = {}

                def get(obj: Any) -> torch.Tensor:
                    if not isinstance(obj, dict) or set(obj) != {"tensor"} or obj["tensor"] not in available:
                        raise ValueError(f"{path.name!r}: bad tensor reference {obj!r}; {fix}")
                    name = obj["tensor"]
                    if name not in loaded:
                        loaded[name] = f.get_tensor(name)
                    return loaded[name]

                def decode(v: Any) -> Any:
                    if isinstance(v, _SCALARS):
                        return v
                    if isinstance(v, dict) and len(v) == 1:
                        (tag, inner), = v.items()
                        if tag == "tensor":
                            return get(v)
                        if tag in ("list", "tuple") and isinstance(inner, list):
                            items = [decode(x) for x in inner]
                            return items if tag == "list" else tuple(items)
                        if tag == "dict" and isinstance(inner, dict):
                            return {k: decode(x) for k, x in inner.items()}
                    raise ValueError(f"{path.name!r}: malformed conditioning entry {str(v)[:80]!r}; {fix}")

                states = []
                for e in header["states"]:
                    cond = decode(e["cond"])
                    fp = None if e["fp_out"] is None else get(e["fp_out"])
                    states.append(DenoiseState(get(e["x"]), get(e["t"]), cond, fp, int(e["trajectory"]),
                                               int(e["step"])))
                if set(loaded) != available:
                    raise ValueError(f"{path.name!r} holds tensors no state refers to; {fix}")
        except (SafetensorError, OSError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"trajectory-states file {str(path)!r} is damaged or unreadable ({e!s}); {fix}") from None
        try:
            return cls(states, header.get("meta"), header.get("key"), header.get("unbatched") or ())
        except (ValueError, TypeError) as e:
            raise ValueError(f"trajectory-states file {path.name!r} is invalid: {e}; {fix}") from None


def states_cache_key(model_fingerprint: str, settings: Mapping[str, Any]) -> str:
    """Key of a states cache: the model's weight fingerprint + the capture settings (prompts, seeds,
    sampler, steps, N, …; anything JSON-serializable, ``str()`` for the rest)."""
    text = json.dumps([STATES_VERSION, model_fingerprint, settings], sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def spread_indices(n: int, k: int) -> list[int]:
    """``k`` of ``range(n)`` spread evenly (interval centres), all of them when ``k >= n``."""
    if k >= n:
        return list(range(n))
    return [int((i + 0.5) * n / k) for i in range(k)]


class StateRecorder:
    """Wraps the FP ``denoise_fn`` during FP sampling and records its calls ``(x, t, cond) → out``.

    Call :meth:`new_trajectory` before each sampling run (prompt/seed). With ``per_trajectory = k`` each run
    keeps k calls spread evenly over it (interval centres of the recorded calls): while a run goes on, only
    every s-th call is kept, s doubling whenever more than ``4k`` are held, so memory stays bounded without
    knowing the number of calls in advance. Tensors are copied to ``device`` (CPU by default); a conditioning
    tensor equal to the previous call's is stored once. Keys in ``drop`` (e.g. ``"transformer_options"``)
    are not recorded; any other value that is not a tensor, number, string or container of them raises
    ``ValueError``.
    """

    def __init__(self, denoise_fn: DenoiseFn, per_trajectory: int | None = None, device: torch.device | str = "cpu",
                 drop: Iterable[str] = ()):
        if per_trajectory is not None and per_trajectory < 1:
            raise ValueError(f"per_trajectory must be at least 1, got {per_trajectory}")
        self.denoise_fn = denoise_fn
        self.per_trajectory = per_trajectory
        self.device = torch.device(device)
        self.drop = frozenset(drop)
        self.records: list[DenoiseState] = []  # finished runs
        self._run: list[DenoiseState] = []  # the current run
        self._trajectory = -1
        self._step = 0
        self._stride = 1
        self._last: dict[str, torch.Tensor] = {}

    @property
    def n_calls(self) -> int:
        """Calls seen in the current run."""
        return self._step

    def new_trajectory(self) -> None:
        """Start the next run (prompt/seed); the previous one is reduced to its ``per_trajectory`` states."""
        self._finish()
        self._trajectory += 1
        self._step, self._stride = 0, 1

    def _finish(self) -> None:
        run = self._run
        keep = range(len(run)) if self.per_trajectory is None else spread_indices(len(run), self.per_trajectory)
        self.records.extend(run[i] for i in keep)
        self._run = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        out = self.denoise_fn(x, t, **cond)
        if self._trajectory < 0:
            self.new_trajectory()
        kept = {k: v for k, v in cond.items() if k not in self.drop}
        _check_value(kept, "cond")
        if self._step % self._stride == 0:
            stored = self._dedupe(_map_tensors(kept, self._copy))
            copy = self._copy
            self._run.append(DenoiseState(copy(x), copy(t), stored, copy(out), self._trajectory, self._step))
            if self.per_trajectory is not None and len(self._run) > 4 * self.per_trajectory:
                self._stride *= 2
                self._run = [s for s in self._run if s.step % self._stride == 0]
        self._step += 1
        return out

    def _copy(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(self.device, copy=True)

    def _dedupe(self, cond: dict[str, Any]) -> dict[str, Any]:
        last, new = self._last, {}

        def visit(v: Any, path: str) -> Any:
            if isinstance(v, torch.Tensor):
                prev = last.get(path)
                if prev is not None and prev.shape == v.shape and prev.dtype == v.dtype and torch.equal(prev, v):
                    v = prev
                new[path] = v
                return v
            if isinstance(v, list | tuple):
                items = [visit(x, f"{path}[{i}]") for i, x in enumerate(v)]
                return items if isinstance(v, list) else tuple(items)
            if isinstance(v, dict):
                return {k: visit(x, f"{path}[{k!r}]") for k, x in v.items()}
            return v

        result = visit(cond, "")
        self._last = new
        return result

    def states(self, meta: Mapping[str, Any] | None = None, key: str | None = None, unbatched: Iterable[str] = (),
               ) -> TrajectoryStates:
        """Finish the current run and return every kept call as validated states."""
        self._finish()
        return TrajectoryStates(self.records, meta, key, unbatched)


# ============================================================================== denoise error
def _tensor_digest(t: torch.Tensor) -> str:
    data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class DenoiseError:
    """Teacher-forced denoiser error of a model function against the FP outputs on cached states.

    ``DenoiseError(states)(denoise_fn)`` → ``{"denoise_error": mean_i e_i, "denoise_error_max": max_i e_i}``
    with, per state i (one recorded call, its whole batch), ``e_i = Σ (out_i − fp_i)² / Σ fp_i²`` summed over
    all elements, computed in float32 with float64 sums; ``e_i = inf`` if ``out_i`` has non-finite values.
    States whose shapes, dtypes, unbatched/non-tensor conditioning (and ``t`` when it is a scalar) agree are
    concatenated along dim 0 into calls of at most ``max_batch`` samples; ``t`` of shape ``[B]`` is
    concatenated, a scalar ``t`` is passed as is. With ``reference_fn`` the FP outputs are recomputed with the
    same batching (so the FP model scores exactly 0); otherwise the states must hold them. Tensors are moved
    to ``device`` once, here.
    """

    def __init__(
        self, states: TrajectoryStates, *, device: torch.device | str | None = None, max_batch: int = 8,
        reference_fn: DenoiseFn | None = None,
    ):
        if not isinstance(states, TrajectoryStates):
            raise ValueError(f"states must be TrajectoryStates, not {type(states).__name__}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if reference_fn is None and not states.has_reference:
            raise ValueError("the states have no FP outputs: record them with outputs or pass reference_fn")
        self.states = states
        self.max_batch = max_batch
        move = (lambda t: t.to(device)) if device is not None else (lambda t: t)
        self._calls: list[tuple[list[int], torch.Tensor, torch.Tensor, dict[str, Any]]] = []
        fp: list[torch.Tensor | None] = [None] * len(states)
        for idx in self._groups():
            group = [states[i] for i in idx]
            x = move(torch.cat([s.x for s in group]) if len(group) > 1 else group[0].x)
            t = move(torch.cat([s.t for s in group]) if len(group) > 1 and group[0].t.dim() == 1 else group[0].t)
            cond = _map_tensors(self._cat_cond([s.cond for s in group]), move)
            self._calls.append((idx, x, t, cond))
            if reference_fn is None:
                for i, s in zip(idx, group, strict=True):
                    fp[i] = move(s.fp_out)
        self._fp: list[torch.Tensor] = fp if reference_fn is None else self._outputs(reference_fn, "reference_fn")
        self._fp_norm = [fp.float().pow(2).sum(dtype=torch.float64) for fp in self._fp]
        bad = [i for i, n in enumerate(self._fp_norm) if not (0 < float(n) < math.inf)]
        if bad:
            raise ValueError(f"state {bad[0]}: the FP output is zero or non-finite, so its relative error is undefined")

    @property
    def n_calls(self) -> int:
        """Denoiser calls per evaluation."""
        return len(self._calls)

    def _signature(self, s: DenoiseState) -> tuple:
        sig: list[Any] = [tuple(s.x.shape[1:]), s.x.dtype, s.t.dtype, s.x.device]
        sig.append(_tensor_digest(s.t) if s.t.dim() == 0 else None)
        sig.append(None if s.fp_out is None else tuple(s.fp_out.shape[1:]))
        for path, leaf in _leaves(s.cond):
            if isinstance(leaf, torch.Tensor):
                if leaf.dim() >= 1 and _top_key(path) not in self.states.unbatched:
                    sig.append((path, tuple(leaf.shape[1:]), leaf.dtype, leaf.device))
                else:
                    sig.append((path, tuple(leaf.shape), leaf.dtype, _tensor_digest(leaf)))
            else:
                sig.append((path, repr(leaf)))
        return tuple(sig)

    def _groups(self) -> list[list[int]]:
        buckets: dict[tuple, list[list[int]]] = {}
        order: list[list[int]] = []
        for i, s in enumerate(self.states):
            chunks = buckets.setdefault(self._signature(s), [])
            if not chunks or sum(self.states[j].batch for j in chunks[-1]) + s.batch > self.max_batch:
                chunks.append([])
                order.append(chunks[-1])
            chunks[-1].append(i)
        return order

    def _cat_cond(self, conds: list[dict[str, Any]]) -> dict[str, Any]:
        if len(conds) == 1:
            return conds[0]

        def merge(values: list[Any], path: str) -> Any:
            v0 = values[0]
            if isinstance(v0, torch.Tensor):
                if v0.dim() >= 1 and _top_key(path) not in self.states.unbatched:
                    return torch.cat(values)
                return v0
            if isinstance(v0, list | tuple):
                items = [merge([v[i] for v in values], f"{path}[{i}]") for i in range(len(v0))]
                return items if isinstance(v0, list) else tuple(items)
            if isinstance(v0, dict):
                return {k: merge([v[k] for v in values], f"{path}[{k!r}]") for k in v0}
            return v0

        return merge(conds, "")

    def _run(self, denoise_fn: DenoiseFn, what: str) -> Iterator[tuple[int, torch.Tensor]]:
        """``(state index, its part of the output)`` for every state, call by call."""
        with torch.no_grad():
            for idx, x, t, cond in self._calls:
                out = denoise_fn(x, t, **cond)
                if not isinstance(out, torch.Tensor):
                    raise ValueError(f"{what} returned a {type(out).__name__}, expected a tensor")
                sizes = [self.states[i].batch for i in idx]
                if out.dim() < 1 or out.shape[0] != sum(sizes):
                    raise ValueError(f"{what} returned shape {tuple(out.shape)} for an input of batch {sum(sizes)}")
                yield from zip(idx, torch.split(out, sizes), strict=True)

    def _outputs(self, denoise_fn: DenoiseFn, what: str) -> list[torch.Tensor]:
        outs: list[torch.Tensor | None] = [None] * len(self.states)
        for i, part in self._run(denoise_fn, what):
            outs[i] = part
        return outs  # type: ignore[return-value]

    def errors(self, denoise_fn: DenoiseFn) -> torch.Tensor:
        """Per-state relative squared error ``e_i`` (float64, CPU), in state order."""
        errs: list[torch.Tensor | None] = [None] * len(self.states)
        for i, out in self._run(denoise_fn, "denoise_fn"):
            fp = self._fp[i]
            if out.shape != fp.shape:
                raise ValueError(f"state {i}: denoise_fn returned shape {tuple(out.shape)}, the FP output has "
                                 f"shape {tuple(fp.shape)}")
            errs[i] = (out.float() - fp.float()).pow(2).sum(dtype=torch.float64) / self._fp_norm[i]
        e = torch.stack([v.to(self._fp_norm[0].device) for v in errs]).cpu()  # type: ignore[union-attr]
        return torch.where(torch.isfinite(e), e, torch.full_like(e, math.inf))  # non-finite output → inf

    def __call__(self, denoise_fn: DenoiseFn) -> dict[str, float]:
        errs = self.errors(denoise_fn)
        return {"denoise_error": float(errs.mean()), "denoise_error_max": float(errs.max())}


# ============================================================================== image metrics
def _pair(x: torch.Tensor, ref: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(x, torch.Tensor) or not isinstance(ref, torch.Tensor):
        raise ValueError(f"{what}: both arguments must be tensors")
    if x.shape != ref.shape:
        raise ValueError(f"{what}: shapes differ: {tuple(x.shape)} vs {tuple(ref.shape)}")
    if x.dim() != 4:
        raise ValueError(f"{what}: expected [B, C, H, W] tensors, got shape {tuple(x.shape)}")
    dtype = torch.float64 if torch.float64 in (x.dtype, ref.dtype) else torch.float32
    return x.to(dtype), ref.to(x.device, dtype)


def _reduce(v: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return v.mean()
    if reduction == "none":
        return v
    raise ValueError(f"reduction must be 'mean' or 'none', not {reduction!r}")


def nmse(x: torch.Tensor, ref: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Per image ``Σ (x − ref)² / Σ ref²`` over C, H, W (``ref`` is the FP image); mean over the batch."""
    x, ref = _pair(x, ref, "nmse")
    num = (x - ref).pow(2).sum(dim=(1, 2, 3), dtype=torch.float64)
    den = ref.pow(2).sum(dim=(1, 2, 3), dtype=torch.float64)
    return _reduce(num / den, reduction)


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float, reduction: str = "mean") -> torch.Tensor:
    """Per image ``10·log10(data_range² / MSE)`` (``inf`` when identical); mean over the batch."""
    x, ref = _pair(x, ref, "psnr")
    mse = (x - ref).pow(2).mean(dim=(1, 2, 3), dtype=torch.float64)
    return _reduce(10.0 * torch.log10(float(data_range) ** 2 / mse), reduction)


def gaussian_window(size: int = 11, sigma: float = 1.5, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Normalized 1-D Gaussian of ``size`` taps."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r * r) / (2 * sigma * sigma))
    return (g / g.sum()).to(dtype)


def ssim(
    x: torch.Tensor, ref: torch.Tensor, data_range: float, win_size: int = 11, sigma: float = 1.5,
    k1: float = 0.01, k2: float = 0.03, reduction: str = "mean",
) -> torch.Tensor:
    """SSIM of Wang et al. (2004): Gaussian window ``win_size``/``sigma``, ``C1 = (k1·L)²``, ``C2 = (k2·L)²``,
    ``L = data_range``; the SSIM map over valid window positions (no padding) of every channel is averaged
    per image, then over the batch. Images must be at least ``win_size`` pixels on each side."""
    x, ref = _pair(x, ref, "ssim")
    b, c, h, w = x.shape
    if h < win_size or w < win_size:
        raise ValueError(f"ssim: images of {h}x{w} pixels are smaller than the {win_size}-pixel window")
    g = gaussian_window(win_size, sigma, x.dtype).to(x.device)
    gh, gw = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1), g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)

    def filt(v: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(v, gh, groups=c), gw, groups=c)

    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_x, mu_y = filt(x), filt(ref)
    sxx = filt(x * x) - mu_x * mu_x
    syy = filt(ref * ref) - mu_y * mu_y
    sxy = filt(x * ref) - mu_x * mu_y
    smap = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x * mu_x + mu_y * mu_y + c1) * (sxx + syy + c2))
    return _reduce(smap.mean(dim=(1, 2, 3), dtype=torch.float64), reduction)


class ImageDistance:
    """Distance of generated images (or final latents) to the FP ones of the same prompts and seeds.

    ``ImageDistance(fp_images)(images)`` → ``{"image_nmse", "psnr", "ssim"}`` (means over the batch, see
    :func:`nmse`, :func:`psnr`, :func:`ssim`). ``data_range`` defaults to ``max − min`` of ``fp_images``
    (pass 1.0 for images in [0, 1]). For images smaller than 11 px the SSIM window shrinks to the largest odd
    size that fits (``nan`` below 3 px).
    """

    def __init__(self, fp_images: torch.Tensor, data_range: float | None = None):
        if not isinstance(fp_images, torch.Tensor) or fp_images.dim() != 4:
            raise ValueError("fp_images must be a [B, C, H, W] tensor")
        self.fp_images = fp_images
        self.data_range = float(fp_images.max() - fp_images.min()) if data_range is None else float(data_range)
        if not self.data_range > 0:
            raise ValueError(f"data_range must be positive, got {self.data_range}")

    def __call__(self, images: torch.Tensor) -> dict[str, float]:
        ref = self.fp_images
        if not isinstance(images, torch.Tensor) or images.shape != ref.shape:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images have shape {shape}, the FP images {tuple(ref.shape)}")
        out = {
            "image_nmse": float(nmse(images, ref)),
            "psnr": float(psnr(images, ref, self.data_range)),
        }
        side = min(ref.shape[-2:])
        win = min(11, side if side % 2 else side - 1)
        out["ssim"] = float(ssim(images, ref, self.data_range, win_size=win)) if win >= 3 else math.nan
        return out


# ======================================================================================== FID
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
"""pytorch-fid's Inception weights; ``pt_inception-2015-12-05-6726825d.safetensors`` is accepted too."""
FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
FID_DIMS = 2048
IMAGE_EXTENSIONS = frozenset({"bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp"})


def find_fid_weights(folder: str | os.PathLike) -> Path:
    """The Inception weights file in ``folder`` (``.safetensors`` preferred); a clear error if missing."""
    folder = Path(folder)
    stem = Path(FID_WEIGHTS_FILE).stem
    for name in (f"{stem}.safetensors", FID_WEIGHTS_FILE):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(
        f"FID needs pytorch-fid's Inception weights, which are never downloaded automatically: put "
        f"{FID_WEIGHTS_FILE!r} (from {FID_WEIGHTS_URL}) or the same tensors as '{stem}.safetensors' into "
        f"the folder {str(folder.resolve())!r}"
    )


def _require_pytorch_fid():
    try:
        from pytorch_fid import inception
    except ImportError as e:
        raise ImportError(
            "FID needs the pytorch-fid package (its Inception architecture): pip install \"pytorch-fid==0.3.0\" "
            "(or the fid extra: pip install \"qua2sedimo[fid]\")"
        ) from e
    return inception


def load_fid_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: safetensors, or ``.pth`` through ``torch.load(weights_only=True)`` only."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable or unsafe file gets the same advice
        raise ValueError(f"cannot read the Inception weights {str(path)!r} ({e!s}); replace the file") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{str(path)!r} is not a state dict of tensors; expected pytorch-fid's Inception weights")
    return dict(state)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's ``InceptionV3`` up to the pool3 features (2048-d), built without its download path.

    ``forward(images)`` takes ``[B, 3, H, W]`` in [0, 1], resizes bilinearly to 299x299 (``resize_input``),
    maps to [-1, 1] and returns ``[B, 2048]`` float features, as pytorch-fid's ``get_activations``.
    """

    def __init__(self, inception: nn.Module, resize_input: bool = True):
        super().__init__()
        self.resize_input = resize_input
        i = inception
        self.blocks = nn.ModuleList([
            nn.Sequential(i.Conv2d_1a_3x3, i.Conv2d_2a_3x3, i.Conv2d_2b_3x3, nn.MaxPool2d(kernel_size=3, stride=2)),
            nn.Sequential(i.Conv2d_3b_1x1, i.Conv2d_4a_3x3, nn.MaxPool2d(kernel_size=3, stride=2)),
            nn.Sequential(i.Mixed_5b, i.Mixed_5c, i.Mixed_5d, i.Mixed_6a, i.Mixed_6b, i.Mixed_6c, i.Mixed_6d,
                          i.Mixed_6e),
            nn.Sequential(i.Mixed_7a, i.Mixed_7b, i.Mixed_7c, nn.AdaptiveAvgPool2d(output_size=(1, 1))),
        ])
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"Inception expects [B, 3, H, W] images in [0, 1], got shape {tuple(images.shape)}")
        x = images
        if self.resize_input:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        for block in self.blocks:
            x = block(x)
        return x.flatten(1)


def build_fid_inception(state_dict: Mapping[str, torch.Tensor] | None = None, resize_input: bool = True,
                        ) -> FIDInceptionV3:
    """pytorch-fid's FID Inception (torchvision Inception v3, 1008 classes, no aux head, its FID blocks),
    with ``state_dict`` loaded strictly (random weights when ``None``). Needs pytorch-fid; downloads nothing."""
    inc = _require_pytorch_fid()
    build = getattr(inc, "_inception_v3", None)
    if build is not None:
        net = build(num_classes=1008, aux_logits=False, weights=None)
    else:  # pragma: no cover - older pytorch-fid
        import torchvision

        net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    net.Mixed_5b = inc.FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = inc.FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = inc.FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = inc.FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = inc.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = inc.FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = inc.FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = inc.FIDInceptionE_1(1280)
    net.Mixed_7c = inc.FIDInceptionE_2(2048)
    if state_dict is not None:
        try:
            net.load_state_dict(state_dict, strict=True)
        except RuntimeError as e:
            raise ValueError(f"the weights are not pytorch-fid's Inception: {str(e).splitlines()[0]} …") from None
    return FIDInceptionV3(net, resize_input)


def load_fid_inception(folder: str | os.PathLike, device: torch.device | str | None = None) -> FIDInceptionV3:
    """The FID Inception with the user's weights from ``folder`` (see :func:`find_fid_weights`)."""
    path = find_fid_weights(folder)
    _require_pytorch_fid()
    model = build_fid_inception(load_fid_state_dict(path))
    return model.to(device) if device is not None else model


def inception_features(model: nn.Module, images: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 50,
                       ) -> np.ndarray:
    """Pool3 features ``[N, 2048]`` (float64) of ``[B, 3, H, W]`` images in [0, 1] (a tensor or batches)."""
    device = next(model.parameters()).device
    batches = torch.split(images, batch_size) if isinstance(images, torch.Tensor) else images
    feats = []
    with torch.no_grad():
        for batch in batches:
            feats.append(model(batch.to(device, torch.float32)).cpu().double().numpy())
    if not feats:
        raise ValueError("no images to compute Inception features of")
    return np.concatenate(feats)


def image_folder_batches(folder: str | os.PathLike, batch_size: int = 50) -> Iterator[torch.Tensor]:
    """Images of ``folder`` (sorted, RGB, [0, 1], original size) in batches of equal size (needs Pillow)."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"image folder {str(folder)!r} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {str(folder)!r}")
    batch: list[torch.Tensor] = []
    for p in files:
        with Image.open(p) as im:
            img = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
        if batch and (len(batch) == batch_size or batch[0].shape != img.shape):
            yield torch.stack(batch)
            batch = []
        batch.append(img)
    yield torch.stack(batch)


def feature_stats(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (``np.cov``, rows = samples, N − 1 normalization) of ``[N, D]`` features, float64."""
    f = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N, D] with N >= 2 samples, got shape {f.shape}")
    f = f.astype(np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6,
                     ) -> float:
    """``‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^{1/2})`` as pytorch-fid computes it (``scipy.linalg.sqrtm``;
    ``eps``·I is added to both covariances when the product's square root is not finite)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"mismatched statistics: means {mu1.shape}/{mu2.shape}, covariances "
                         f"{sigma1.shape}/{sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in the covariance square root")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def save_stats(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, meta: Mapping[str, Any] | None = None,
               ) -> None:
    """Write reference statistics (safetensors, atomically); ``meta`` is free JSON (e.g. the folder)."""
    tensors = {"mu": torch.from_numpy(np.ascontiguousarray(mu, np.float64)),
               "sigma": torch.from_numpy(np.ascontiguousarray(sigma, np.float64))}
    metadata = {"format": "qua2sedimo.fid_stats", "meta": json.dumps(dict(meta or {}))}
    atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_stats(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(mu, sigma, meta)`` written by :func:`save_stats`, validated."""
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            if md.get("format") != "qua2sedimo.fid_stats":
                raise ValueError(f"{str(path)!r} is not a Qua2SeDiMo FID statistics file")
            mu, sigma = f.get_tensor("mu").numpy(), f.get_tensor("sigma").numpy()
            meta = json.loads(md.get("meta", "{}"))
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise ValueError(f"FID statistics file {str(path)!r} is damaged or unreadable ({e!s})") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]) or not np.isfinite(sigma).all():
        raise ValueError(f"FID statistics file {str(path)!r} holds malformed statistics")
    return mu, sigma, meta


class FIDObjective:
    """FID of generated images against reference statistics (of a user image folder or FP images).

    ``FIDObjective(model, (mu, sigma))(images)`` → ``{"fid": d}`` with ``images`` ``[B, 3, H, W]`` in [0, 1]
    (B >= 2; FID of few images is strongly biased upward, compare only equal-sized sets).
    ``reference`` may also be ``[N, 2048]`` features or a ``[N, 3, H, W]`` image tensor.
    """

    def __init__(self, model: nn.Module, reference: tuple[np.ndarray, np.ndarray] | np.ndarray | torch.Tensor,
                 batch_size: int = 50):
        self.model, self.batch_size = model, batch_size
        if isinstance(reference, tuple):
            self.mu, self.sigma = np.asarray(reference[0], np.float64), np.asarray(reference[1], np.float64)
        elif isinstance(reference, torch.Tensor) and reference.dim() == 4:
            self.mu, self.sigma = feature_stats(inception_features(model, reference, batch_size))
        else:
            self.mu, self.sigma = feature_stats(reference)

    def __call__(self, images: torch.Tensor | Iterable[torch.Tensor]) -> dict[str, float]:
        mu, sigma = feature_stats(inception_features(self.model, images, self.batch_size))
        return {"fid": frechet_distance(mu, sigma, self.mu, self.sigma)}
