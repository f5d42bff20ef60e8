"""Every use of ComfyUI internals (``comfy.*``, ``folder_paths``) lives here; nodes stay thin.

* a quantized *copy* of a MODEL (the input ModelPatcher and its modules are never mutated),
* the option-table cache and config/quantized-file folders under ComfyUI's models folder,
* progress bars and Cancel,
* saving and loading quantized safetensors through ComfyUI's own model detection and custom ops.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import inspect
import os
import re
from pathlib import Path

import comfy.lora
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.sd
import comfy.utils
import comfy.weight_adapter
import folder_paths
import torch
import torch.nn.functional as F
from torch import nn

from ..quant import QuantConfig, option_table, quantize_
from ..quant.activations import quantize_tokens
from ..quant.atomic import sweep_stale_temps
from ..quant.format import layer_entries, load_quantized_file, read_header, save_quantized_file
from ..quant.layer_table import is_quantized_layer, quantizable_layers
from ..quant.layers import dense_conv2d, packed_linear
from ..quant.packed import PackedWeight
from ..quant.quantizers import QuantizedWeight

FOLDER = "qua2sedimo"  # models/qua2sedimo: configs (*.json), quantized models, option-table cache
QUANTIZED_FOLDER = "qua2sedimo_quantized"  # where Load Quantized looks (ours + the output folder)


def register_folders() -> None:
    """Register ``models/qua2sedimo`` (configs, quantized models) and the output folder for loading."""
    base = os.path.join(folder_paths.models_dir, FOLDER)
    if FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER] = ([base], {".json"})
    if QUANTIZED_FOLDER not in folder_paths.folder_names_and_paths:
        paths = [base, folder_paths.get_output_directory()]
        folder_paths.folder_names_and_paths[QUANTIZED_FOLDER] = (paths, {".safetensors"})
        for folder in paths:  # on start: temporary files of saves killed before they finished
            sweep_stale_temps(folder)


def config_dir() -> Path:
    return Path(folder_paths.folder_names_and_paths[FOLDER][0][0])


def cache_dir() -> Path:
    """Option tables and FP trajectory states (``$QUA2SEDIMO_CACHE_DIR`` overrides models/qua2sedimo/cache)."""
    override = os.environ.get("QUA2SEDIMO_CACHE_DIR")
    return Path(override) if override else config_dir() / "cache"


def list_configs() -> list[str]:
    return folder_paths.get_filename_list(FOLDER)


_INTERNAL_DIRS = ("cache", "journals", "ray-import")  # ours, under models/qua2sedimo: never models to load


def list_quantized() -> list[str]:
    """Our quantized models in models/qua2sedimo and the output folder: no caches, journals or Ray import links,
    nothing a link leads to outside those folders, no other safetensors (checked by their header)."""
    roots = [Path(p).resolve() for p in folder_paths.folder_names_and_paths[QUANTIZED_FOLDER][0]]
    out = []
    for name in folder_paths.get_filename_list(QUANTIZED_FOLDER):
        if name.replace("\\", "/").split("/")[0] in _INTERNAL_DIRS:
            continue
        path = folder_paths.get_full_path(QUANTIZED_FOLDER, name)
        if path is None or not any(Path(path).resolve().is_relative_to(r) for r in roots):
            continue
        try:
            read_header(path)
        except ValueError:
            continue
        out.append(name)
    return out


def config_path(name: str) -> Path:
    return Path(folder_paths.get_full_path_or_raise(FOLDER, name))


def quantized_path(name: str) -> Path:
    return Path(folder_paths.get_full_path_or_raise(QUANTIZED_FOLDER, name))


def safe_prefix(prefix: str) -> str:
    """A file-name prefix confined to its folder: no absolute paths, no '..', only safe characters."""
    parts = [re.sub(r"[^A-Za-z0-9_.\-]", "_", p) for p in re.split(r"[\\/]+", prefix or "")]
    parts = [p for p in parts if p not in ("", ".", "..")]
    return "/".join(parts) or "qua2sedimo"


def new_output_path(prefix: str, folder: Path, suffix: str) -> Path:
    """``folder/prefix_00001_suffix`` with the next free counter, never escaping ``folder``."""
    rel = safe_prefix(prefix)
    target_dir = (folder / rel).parent.resolve()
    if not target_dir.is_relative_to(folder.resolve()):
        raise ValueError(f"file name prefix {prefix!r} points outside {folder}")
    target_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(rel).name
    n = 1
    while (target_dir / f"{stem}_{n:05d}_{suffix}").exists():
        n += 1
    return target_dir / f"{stem}_{n:05d}_{suffix}"


# --------------------------------------------------------------------------------------------- models
def diffusion_model(model) -> nn.Module:
    """The denoiser ``nn.Module`` inside a ComfyUI MODEL."""
    try:
        return model.model.diffusion_model
    except AttributeError:
        raise ValueError("expected a ComfyUI MODEL (a ModelPatcher with a diffusion model)") from None


class Progress:
    """ComfyUI progress bar + Cancel for ``(done, total, label)`` callbacks."""

    def __init__(self, node_id: str | None = None):
        self.node_id = node_id
        self.bar = None

    def __call__(self, done: int, total: int, label: str = "") -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        if self.bar is None or self.bar.total != total:
            self.bar = comfy.utils.ProgressBar(total, node_id=self.node_id)
        self.bar.update_absolute(done, total)


def _copy_tree(module: nn.Module, *, own_parameters: bool = False, skip: str | None = None) -> nn.Module:
    """A copy of the module tree over the same tensors (no memory); the child ``skip`` is left out (the caller sets
    it). With ``own_parameters`` every Parameter object is new (same storage): moving one tree (``param.data = …``
    in ``Module.to``, ComfyUI's loading/offloading) then leaves the other's weights in place."""
    new = copy.copy(module)
    new._parameters = ({k: _own_parameter(p) for k, p in module._parameters.items()} if own_parameters
                       else dict(module._parameters))
    new._buffers = dict(module._buffers)
    new._modules = {k: (_copy_tree(v, own_parameters=own_parameters) if v is not None else None)
                    for k, v in module._modules.items() if k != skip}
    return new


def _own_parameter(p):
    """A new Parameter over ``p``'s storage; tensor subclasses (0.33's quantized weights) are kept as they are."""
    if type(p) is nn.Parameter:
        return nn.Parameter(p.data, requires_grad=p.requires_grad)
    return p


# What ComfyUI's model patchers keep on the BaseModel instance (loaded memory, low-VRAM counters, the dynamic-VRAM
# state of 0.33: vbars, pins, backup buffers, registered patchers). A new BaseModel starts without any of it.
# BaseModel's own ``device``/``current_patcher`` start as None; the patcher's constructor sets the rest.
_PATCHER_STATE_ON_MODEL = (
    "device", "current_patcher", "model_loaded_weight_memory", "lowvram_patch_counter", "model_lowvram",
    "current_weight_patches_uuid", "model_offload_buffer_memory", "dynamic_vbars", "dynamic_pins", "dynamic_patchers",
)
_RESET_TO_NONE = ("device", "current_patcher")


def _without_patcher_state(state: dict) -> dict:
    return {k: (None if k in _RESET_TO_NONE else v) for k, v in state.items()
            if k not in _PATCHER_STATE_ON_MODEL or k in _RESET_TO_NONE}


def _own_base_model(model, diffusion: nn.Module):
    """A BaseModel for ``diffusion`` that shares no mutable state with ``model.model``: its own modules and
    Parameter objects (same storage), none of the source patcher's load/offload bookkeeping."""
    base = _copy_tree(model.model, own_parameters=True, skip="diffusion_model")
    base.__dict__ = _without_patcher_state(base.__dict__)
    base.diffusion_model = diffusion
    return base


def _patcher_around(model, base):
    """A clone of the MODEL's patcher (patches, options, wrappers…) around another BaseModel, with fresh
    backups; on ComfyUI with dynamic VRAM a classic ModelPatcher (see :func:`_without_dynamic_vram`)."""
    params = inspect.signature(model.clone).parameters
    if "model_override" in params:  # ComfyUI ≥ 0.4: clone onto another model, as a classic (non-dynamic) patcher
        _, backups = model.get_clone_model_override()
        extra = {"disable_dynamic": True} if "disable_dynamic" in params else {}
        out = model.clone(model_override=(base, tuple(type(b)() for b in backups)), **extra)
    else:  # ComfyUI 0.3.x: clone() wraps the same BaseModel; retarget it and drop shared backups
        out = model.clone()
        out.model = base
        for name in ("backup", "backup_buffers", "object_patches_backup"):
            if hasattr(out, name):
                setattr(out, name, {})
        if hasattr(out, "pinned"):
            out.pinned = set()
        comfy.model_patcher.ModelPatcher(base, out.load_device, out.offload_device)  # initialises base's state
    forget_loader(out)
    return out


def forget_loader(model) -> None:
    """Drop the source loader ComfyUI 0.33 keeps for rebuilding a MODEL (multi-GPU clones, non-dynamic delegates):
    rebuilding from it would silently give the full-precision model; without it ComfyUI says it cannot."""
    if getattr(model, "cached_patcher_init", None) is not None:
        model.cached_patcher_init = None


_FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                    if hasattr(torch, n))


def stored_format(module: nn.Module) -> str | None:
    """How ComfyUI stores a layer's weight when it is not a plain dense tensor: ``"scaled_fp8"`` (0.3.x fp8 ops:
    fp8 weight × ``scale_weight``), ``"comfy_quant:<format>"`` (0.33's per-layer formats, comfy-kitchen
    ``QuantizedTensor``: float8, int8, nvfp4, mxfp8…), ``"fp8"`` (a bare fp8 weight); ``None`` when dense."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        return None
    if type(w) not in (torch.Tensor, nn.Parameter):
        fmt = getattr(module, "quant_format", None) or getattr(w, "_layout_cls", None) or type(w).__name__
        return f"comfy_quant:{fmt}"
    if w.dtype in _FP8_DTYPES:
        return "scaled_fp8" if isinstance(getattr(module, "scale_weight", None), torch.Tensor) else "fp8"
    return None


def _is_comfy_quantized_tensor(w: torch.Tensor) -> bool:
    try:
        from comfy.quant_ops import QuantizedTensor  # ComfyUI ≥ 0.4 (comfy-kitchen)
    except ImportError:
        return False
    return isinstance(w, QuantizedTensor)


def compute_dtype(model) -> torch.dtype:
    """The dtype a quantized layer of ``model`` computes in (fp8 sources: the model's cast dtype)."""
    base = model.model
    dtype = getattr(base, "manual_cast_dtype", None) or base.get_dtype()
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16


def source_weight(module: nn.Module, name: str, dtype: torch.dtype) -> torch.Tensor | None:
    """The dense weight of a layer ComfyUI stores quantized (see :func:`stored_format`), in ``dtype``; ``None`` for
    a dense layer. A format that cannot be dequantized is refused with the layer, the format and the fix."""
    fmt = stored_format(module)
    if fmt is None:
        return None
    w = module.weight
    try:
        if fmt.startswith("comfy_quant:"):
            if not _is_comfy_quantized_tensor(w):  # torch.Tensor.dequantize() would hand back the raw values
                raise TypeError(f"{type(w).__module__}.{type(w).__name__} is not comfy-kitchen's QuantizedTensor")
            dense = w.dequantize().to(torch.float32)
        else:
            dense = w.detach().to(torch.float32)
            if fmt == "scaled_fp8":
                dense = dense * module.scale_weight.detach().to(torch.float32)
    except Exception as e:  # an unknown/unsupported layout of a newer comfy-kitchen
        raise ValueError(f"layer {name!r} is stored in ComfyUI's quantized format {fmt!r}, which cannot be read "
                         f"back to dense weights here ({type(e).__name__}: {e}); load a full-precision or fp8 "
                         "checkpoint of this model, or keep the layer at fp16 in the config") from None
    if dense.shape != tuple(w.shape) or not torch.isfinite(dense).all():
        raise ValueError(f"layer {name!r} ({fmt}) dequantized to a wrong shape or non-finite values")
    return dense.to(dtype)


def _source_weights(model, dm: nn.Module, config: QuantConfig) -> dict[str, torch.Tensor]:
    """Dense weights (the MODEL's pending LoRA/weight patches applied) for the layers to quantize whose weights are
    patched or stored in a quantized format (fp8 sources); the other layers quantize from their own weights."""
    out = {}
    dtype = None
    for name, option in config.options.items():
        if option == "fp16":
            continue
        module = dm.get_submodule(name)
        key = f"diffusion_model.{name}.weight"
        if stored_format(module) is not None:
            dtype = dtype or compute_dtype(model)
            dense = source_weight(module, name, dtype)
        elif key in model.patches:
            dense = module.weight
        else:
            continue
        if key in model.patches:
            # a private fp32 copy: calculate_weight works in place (on the Parameter itself if w is fp32)
            w32 = dense.detach().to(torch.float32, copy=True)
            dense = comfy.lora.calculate_weight(model.patches[key], w32, key).to(dense.dtype)
        out[name] = dense.detach()
    return out


BYPASS_BEFORE_QUANT = (
    "this MODEL carries forward injections ({keys}) - e.g. from 'Load LoRA (Bypass)' - which add the LoRA in the "
    "forward pass of the full-precision layers; Apply Config cannot bake them into quantized weights and would drop "
    "them. Use the normal 'Load LoRA' node before Qua2SeDiMo Apply Config (its patches are baked into the weights "
    "before quantization)."
)


def _refuse_injections(model) -> None:
    injections = {k: v for k, v in (getattr(model, "injections", None) or {}).items() if v}
    if injections:
        raise ValueError(BYPASS_BEFORE_QUANT.format(keys=", ".join(sorted(injections))))


def apply_config(model, config: QuantConfig, act_bits: int = 16, node_id: str | None = None):
    """A new MODEL whose denoiser holds packed weights as ``config`` says; ``model`` is untouched and shares no
    mutable state with the result (module tree, Parameter objects, patcher and dynamic-VRAM state are its own).

    LoRA/weight patches already on the input are baked into the weights before quantization; forward injections
    (bypass LoRA) are refused with a clear error rather than dropped.
    """
    dm = diffusion_model(model)
    config.check_model(dm)
    _refuse_injections(model)
    new_dm = _copy_tree(dm, own_parameters=True)
    patched = _source_weights(model, dm, config)
    for name, w in patched.items():
        new_dm.get_submodule(name).weight = nn.Parameter(w, requires_grad=False)
    options = sorted({o for o in config.options.values() if o != "fp16"})
    table = None
    if options and not patched:
        table = option_table(dm, options, cache_dir=cache_dir(), device=quant_device(), progress=Progress(node_id),
                             only=config.options)
    summary = quantize_(new_dm, config, table=table, act_bits=act_bits, make_layer=comfy_quant_layer)
    new_dm.qua2sedimo_config = config
    base = _own_base_model(model, new_dm)
    out = _patcher_around(model, base)
    out.size = comfy.model_management.module_size(base)
    for key in [k for k in out.patches if k.removeprefix("diffusion_model.").removesuffix(".weight") in patched]:
        del out.patches[key]
    mark_quantized(out)
    return out, summary


# ------------------------------------------------------------------------- packed layers inside ComfyUI's ops
LORA_PATH_ENV = "QUA2SEDIMO_LORA_PATH"  # "branch" (default: low-rank branch where exact) or "dequant"


def _lora_path() -> str:
    value = os.environ.get(LORA_PATH_ENV, "").strip().lower() or "branch"
    if value not in ("branch", "dequant"):
        raise ValueError(f"{LORA_PATH_ENV}={value!r} is not 'branch' or 'dequant'")
    return value


def _lowrank_terms(patches: list) -> list[tuple[torch.Tensor, torch.Tensor, float]] | None:
    """ComfyUI weight patches as low-rank terms ``(down [r, K], up [N, r], scale)`` when every one is a plain LoRA
    on the whole weight at model strength 1 (the exact case of ``W·x + scale·up·(down·x)``); None otherwise (LoHa,
    LoKr, DoRA, merges, offsets, strength_model ≠ 1: those are applied to the dequantized weight)."""
    terms = []
    for patch_list, _key in patches:
        for strength, adapter, strength_model, offset, function in patch_list:
            if (strength_model != 1.0 or offset is not None or function is not None
                    or type(adapter) is not comfy.weight_adapter.LoRAAdapter):
                return None
            up, down, alpha, mid, dora_scale, reshape = adapter.weights[:6]
            if mid is not None or dora_scale is not None or reshape is not None or up.dim() != 2 or down.dim() != 2:
                return None
            scale = float(strength) * (float(alpha) / down.shape[0] if alpha is not None else 1.0)
            terms.append((down, up, scale))
    return terms


class _PackedOp:
    """What ComfyUI's Linear/Conv2d ops need to run with a :class:`PackedWeight` as ``weight``: the weight is moved
    to the input's device as it is (packed), ComfyUI's weight functions (low-VRAM LoRA patches) and the patches our
    patcher attaches to the weight are applied to the dequantized weight, on the fly; nothing is re-quantized."""

    act_bits = 16

    def _packed_inputs(self, x: torch.Tensor) -> tuple[PackedWeight, torch.Tensor | None]:
        non_blocking = comfy.model_management.device_supports_non_blocking(x.device)
        w = self.weight if self.weight.device == x.device else self.weight.to(x.device, non_blocking=non_blocking)
        bias = None
        if self.bias is not None:
            bias = comfy.model_management.cast_to(self.bias, x.dtype, x.device, non_blocking=non_blocking,
                                                  copy=bool(self.bias_function))
            for f in self.bias_function:
                bias = f(bias)
        return w, bias

    def _patched_dense(self, w: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
        dense = w.dequantize(torch.float32)  # patch arithmetic in fp32, as ComfyUI's patcher does
        for patch_list, key in w.patches:
            dense = comfy.lora.calculate_weight(patch_list, dense, key)
        for f in self.weight_function:
            dense = f(dense)
        return dense.to(dtype)

    def _lowrank(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, float]] | None:
        """The weight's patches as low-rank terms on ``x``'s device and dtype (cached on the patched weight)."""
        if self.weight_function or _lora_path() == "dequant":
            return None
        cache = self.weight.__dict__.setdefault("lowrank_cache", {})
        key = (x.device, x.dtype)
        if key not in cache:
            terms = _lowrank_terms(self.weight.patches)
            cache[key] = None if terms is None else [(d.to(x.device, x.dtype), u.to(x.device, x.dtype), s)
                                                     for d, u, s in terms]
        return cache[key]


_every_op = getattr(comfy.ops, "run_every_op", lambda: None)  # ComfyUI ≥ 0.4: interrupts inside a step


class QuantOps(comfy.ops.manual_cast):
    """ComfyUI's ops with layers that run packed weights (and load them from a quantized file)."""

    class Linear(_PackedOp, comfy.ops.manual_cast.Linear):
        def forward(self, x, *args, **kwargs):
            if not isinstance(self.weight, PackedWeight):
                return super().forward(x, *args, **kwargs)
            _every_op()
            w, bias = self._packed_inputs(x)
            if not w.patches and not self.weight_function:
                return packed_linear(x, w, bias, self.act_bits)
            terms = self._lowrank(x)
            if terms is None:
                return F.linear(quantize_tokens(x, self.act_bits), self._patched_dense(w, x.dtype), bias)
            y = packed_linear(x, w, bias, self.act_bits)
            for down, up, scale in terms:
                y = y + F.linear(F.linear(x, down), up) * scale
            return y

    class Conv2d(_PackedOp, comfy.ops.manual_cast.Conv2d):
        def forward(self, x, *args, **kwargs):
            if not isinstance(self.weight, PackedWeight):
                return super().forward(x, *args, **kwargs)
            _every_op()
            w, bias = self._packed_inputs(x)
            dense = self._patched_dense(w, x.dtype) if (w.patches or self.weight_function) else w.dequantize(x.dtype)
            return dense_conv2d(self, x, dense, bias)


def comfy_quant_layer(module: nn.Module, q: QuantizedWeight, act_bits: int = 16) -> nn.Module:
    """The ComfyUI layer (:class:`QuantOps`) running the packed weight ``q`` in place of the dense ``module``."""
    if isinstance(module, nn.Conv2d):
        layer = QuantOps.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                                module.padding, module.dilation, module.groups, module.bias is not None,
                                module.padding_mode, device="meta")
    else:
        n_out, n_in = q.shape
        layer = QuantOps.Linear(n_in, n_out, module.bias is not None, device="meta")
    layer.weight = nn.Parameter(q.packed.to(_weight_device(module)), requires_grad=False)
    if module.bias is not None:
        layer.bias = nn.Parameter(module.bias.detach().to(q.dtype), requires_grad=False)  # same storage if it can
    layer.act_bits = act_bits
    layer.train(module.training)
    return layer


def _weight_device(module: nn.Module) -> torch.device:
    w = getattr(module, "weight", None)
    return w.device if isinstance(w, torch.Tensor) and w.device.type != "meta" else torch.device("cpu")


class _QuantPatcherMixin:
    """A ModelPatcher for models with packed layers: LoRA and other weight patches on a packed weight are attached
    to it (a new tensor over the same bytes, restored from ComfyUI's backup on unpatch) and applied in the forward
    pass, instead of being computed into a dense weight and cast back to the weight's dtype."""

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False):
        if key not in self.patches:
            return None
        weight = comfy.utils.get_attr(self.model, key)
        if not isinstance(weight, PackedWeight):
            return super().patch_weight_to_device(key, device_to, inplace_update)
        if key not in self.backup:
            self.backup[key] = collections.namedtuple("Dimension", ["weight", "inplace_update"])(weight, False)
        patched = weight.detach() if device_to is None else weight.detach().to(device_to)
        patched.patches = [(self.patches[key], key)]
        patched.__dict__.pop("lowrank_cache", None)
        comfy.utils.set_attr_param(self.model, key, patched)
        return None


@functools.cache
def _quant_patcher_class(base: type) -> type:
    if issubclass(base, _QuantPatcherMixin):
        return base
    return type(f"Qua2SeDiMo{base.__name__}", (_QuantPatcherMixin, base), {})


def mark_quantized(model) -> None:
    """Make a ModelPatcher (and its clones) patch packed weights on the fly; see ``_QuantPatcherMixin``."""
    model.__class__ = _quant_patcher_class(type(model))


def is_quantized(model) -> bool:
    return isinstance(model, _QuantPatcherMixin)


# ------------------------------------------------------------------------------------- save / load
SAVE_WITH_PATCHES = (
    "this MODEL carries LoRA or other weight patches ({n} layers); Save Quantized writes the packed weights only, "
    "so the file would silently lack them. Save the quantized model before loading the LoRA, or bake the LoRA in: "
    "load it on the full-precision MODEL before Qua2SeDiMo Apply Config."
)


def save_quantized(model, path: Path) -> dict:
    """Write the MODEL's denoiser (packed where quantized) to ``path`` atomically; returns the header."""
    dm = diffusion_model(model)
    if model.patches:
        raise ValueError(SAVE_WITH_PATCHES.format(n=len(model.patches)))
    try:
        layers = layer_entries(dm)
    except ValueError:
        raise ValueError("this MODEL holds no quantized layers: run Qua2SeDiMo Apply Config first") from None
    config = getattr(dm, "qua2sedimo_config", None)
    header = {
        "layers": layers,
        "model_class": type(model.model).__name__,
        "config": config.to_dict() if config is not None else None,
        "source_fingerprint": config.fingerprint if config is not None else None,
    }
    save_quantized_file(path, dm.state_dict(), header)
    return header


def _quant_ops(packed: dict[str, PackedWeight], layers: dict[str, dict]) -> type:
    """:class:`QuantOps` whose layers named in ``packed`` take their packed weight (and bias, ``act_bits``) from
    there while ComfyUI loads the state dict; the dense placeholder ComfyUI allocates first (``torch.empty``: pages
    never touched) is dropped."""

    def load_into(module: nn.Module, sd: dict, prefix: str) -> bool:
        name = prefix[:-1]
        if name not in packed:
            return False
        info = layers[name]
        module.weight = nn.Parameter(packed[name], requires_grad=False)
        bias = sd.get(prefix + "bias")
        module.bias = None if bias is None else nn.Parameter(bias.to(packed[name].packing.dtype), requires_grad=False)
        module.act_bits = int(info.get("act_bits", 16))
        return True

    class Ops(QuantOps):
        class Linear(QuantOps.Linear):
            def _load_from_state_dict(self, sd, prefix, *args, **kwargs):
                if not load_into(self, sd, prefix):
                    super()._load_from_state_dict(sd, prefix, *args, **kwargs)

        class Conv2d(QuantOps.Conv2d):
            def _load_from_state_dict(self, sd, prefix, *args, **kwargs):
                if not load_into(self, sd, prefix):
                    super()._load_from_state_dict(sd, prefix, *args, **kwargs)

    return Ops


def _without_dynamic_vram() -> dict:
    """Keyword for ComfyUI ≥ 0.4's loaders: quantized models use the classic ModelPatcher (its partial loading and
    low-VRAM modes); the dynamic-VRAM caster reinterprets a weight's bytes as a dense tensor of its dtype."""
    accepts = "disable_dynamic" in inspect.signature(comfy.sd.load_diffusion_model_state_dict).parameters
    return {"disable_dynamic": True} if accepts else {}


def load_quantized(path: Path):
    """A MODEL from a quantized file, detected by ComfyUI and built with our custom ops."""
    sd, header = load_quantized_file(path)
    packed = {k.removesuffix(".weight"): v for k, v in sd.items() if isinstance(v, PackedWeight)}
    detect = dict(sd)
    for name, weight in packed.items():  # detection reads weight shapes: give it placeholders
        detect[f"{name}.weight"] = torch.empty(weight.packing.shape, dtype=weight.packing.dtype)
    ops = _quant_ops(packed, header["layers"])
    model = comfy.sd.load_diffusion_model_state_dict(detect, model_options={"custom_operations": ops},
                                                     **_without_dynamic_vram())
    if model is None:
        raise ValueError(f"ComfyUI could not detect the model type of {path.name!r} (unsupported architecture)")
    dm = diffusion_model(model)
    missing = [n for n in packed if not is_quantized_layer(dm.get_submodule(n))]
    if missing:
        raise ValueError(f"{path.name!r}: {len(missing)} quantized layer(s) did not load (e.g. {missing[0]!r})")
    if header.get("config"):
        dm.qua2sedimo_config = QuantConfig.from_dict(header["config"], model=dm, source=path.name)
    model.size = comfy.model_management.module_size(model.model)
    forget_loader(model)
    mark_quantized(model)
    return model


# ------------------------------------------------------------------------------------------- search
def journal_dir() -> Path:
    return config_dir() / "journals"


def search_copy(model) -> nn.Module:
    """A copy of the MODEL's BaseModel whose denoiser module tree is its own (parameters shared, no memory):
    the search swaps quantized layers into it while the MODEL itself keeps serving normal workflows. Layers stored
    in ComfyUI's quantized formats hold their dense weights in the copy (:func:`quantization_source`), so its
    ``diffusion_model`` is also what the option table is built from."""
    base = _copy_tree(model.model, skip="diffusion_model")
    base.diffusion_model = quantization_source(model)
    return base


def quantization_source(model) -> nn.Module:
    """The denoiser as the option table and the search quantize it: a copy of its module tree (parameters
    shared) in which every layer stored in ComfyUI's quantized formats (fp8, comfy_quant) holds its dense weight
    in the model's compute dtype, with the format's own scaling switched off, so it computes what the source
    computes and quantizes to the same codes as Apply Config (:func:`source_weight`). Costs a dense copy of those
    layers only; for a dense model it is just the shared copy."""
    view = _copy_tree(diffusion_model(model))
    dtype = None
    for info in quantizable_layers(view):
        module = view.get_submodule(info.name)
        if stored_format(module) is None:
            continue
        dtype = dtype or compute_dtype(model)
        module._parameters["weight"] = nn.Parameter(source_weight(module, info.name, dtype), requires_grad=False)
        if isinstance(module._parameters.get("scale_weight"), torch.Tensor):  # 0.3.x fp8 ops: weight × scale
            module._parameters["scale_weight"] = nn.Parameter(torch.ones_like(module.scale_weight),
                                                              requires_grad=False)
        if getattr(module, "layout_type", None) is not None:  # 0.33 mixed ops: no quantized matmul on a dense weight
            module.layout_type = None
    return view


def routed(model, fn):
    """A clone of ``model`` whose sampler calls ``fn(apply_model, args)`` for every denoiser call; ``args`` holds
    ``input``, ``timestep``, ``c`` (conditioning kwargs) and ``cond_or_uncond`` (0 = positive, 1 = negative per
    equal chunk of the batch), as ComfyUI's ``model_function_wrapper`` receives them."""
    out = model.clone()
    out.set_model_unet_function_wrapper(fn)
    return out


def empty_latent(model, width: int, height: int, batch: int = 1) -> torch.Tensor:
    """The empty latent of ``batch`` ``width``×``height`` images (video models: one frame, 5-D) in the MODEL's
    latent format: its channels, dimensions and spatial compression (×8, Wan 2.2 ×16, …)."""
    fmt = model.get_model_object("latent_format")
    ratio = int(getattr(fmt, "spacial_downscale_ratio", 8))
    if width % ratio or height % ratio or width < ratio or height < ratio:
        raise ValueError(f"width and height must be positive multiples of {ratio} for this model's latents "
                         f"(got {width}×{height})")
    frames = (1,) if getattr(fmt, "latent_dimensions", 2) == 3 else ()
    return torch.zeros(batch, getattr(fmt, "latent_channels", 4), *frames, height // ratio, width // ratio)


def conditioning_batch(conditioning) -> int:
    """Prompts in a CONDITIONING: the largest batch among its entries' tensors (1 when it has none)."""
    sizes = [int(entry[0].shape[0]) for entry in conditioning or () if isinstance(entry, list | tuple) and entry
             and isinstance(entry[0], torch.Tensor) and entry[0].dim() >= 2]
    return max(sizes, default=1)


def sample_latents(model, positive, negative, *, seed: int, steps: int, cfg: float, sampler_name: str,
                   scheduler: str, width: int, height: int) -> torch.Tensor:
    """ComfyUI's KSampler on an empty latent of ``width``×``height`` pixels (fixed seed, no progress bar): one
    image per prompt of ``positive`` (:func:`conditioning_batch`), so a batch of prompts is sampled whole instead of
    ComfyUI cropping it to the latent's batch of 1."""
    import comfy.sample

    latent = comfy.sample.fix_empty_latent_channels(
        model, empty_latent(model, width, height, batch=conditioning_batch(positive)))
    return _ksampler(model, positive, negative, latent, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name,
                     scheduler=scheduler)


def _ksampler(model, positive, negative, latent: torch.Tensor, *, seed: int, steps: int, cfg: float,
              sampler_name: str, scheduler: str) -> torch.Tensor:
    """ComfyUI's KSampler on ``latent`` with the noise KSampler draws for ``seed`` (no progress bar)."""
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                               seed=seed, disable_pbar=True)


def load_for_eval(model) -> torch.device:
    """Have ComfyUI's model management place the MODEL's weights (shared with the search copy) on its device."""
    comfy.model_management.load_models_gpu([model])
    return model.load_device


def comfy_root() -> Path:
    """The ComfyUI folder this process runs (Ray workers boot the same one)."""
    return Path(comfy.model_management.__file__).resolve().parent.parent


def runs_on_cpu() -> bool:
    """True when ComfyUI computes on the CPU (``--cpu`` or no accelerator)."""
    return comfy.model_management.get_torch_device().type == "cpu"


@dataclasses.dataclass
class ShippedModel:
    """A MODEL as plain parts for another process (a Ray worker): the BaseModel with its modules and weights (and
    none of the patcher's load/offload or dynamic-VRAM state) and what the patcher adds on top of it (LoRA patches,
    object patches, model options). Rebuilt by :func:`rebuild_model` with that process's own patcher and devices,
    so nothing depends on pickling a ModelPatcher or on ComfyUI's config objects round-tripping by ``__setstate__``
    (ComfyUI 0.33's ``BASE.__getattr__`` answers None for any missing attribute)."""

    base: nn.Module
    patches: dict
    object_patches: dict
    weight_wrapper_patches: dict
    model_options: dict
    size: int


def ship_model(model) -> ShippedModel:
    return ShippedModel(base=model.model, patches={k: list(v) for k, v in model.patches.items()},
                        object_patches=dict(model.object_patches),
                        weight_wrapper_patches=dict(getattr(model, "weight_wrapper_patches", {}) or {}),
                        model_options=model.model_options, size=model.size)


def shipping_state(obj) -> dict | None:
    """The attributes to ship of a BaseModel or a model config (rebuilt by setting ``__dict__``), else None."""
    import comfy.model_base
    import comfy.supported_models_base

    if isinstance(obj, comfy.model_base.BaseModel):
        return _without_patcher_state(obj.__dict__)
    if isinstance(obj, comfy.supported_models_base.BASE):
        return dict(obj.__dict__)
    return None


def rebuild_model(shipped: ShippedModel):
    """A MODEL (a plain ModelPatcher on this process's devices) from :func:`ship_model`'s parts."""
    model = comfy.model_patcher.ModelPatcher(shipped.base, comfy.model_management.get_torch_device(),
                                             comfy.model_management.unet_offload_device(), shipped.size)
    model.patches = shipped.patches
    model.object_patches = shipped.object_patches
    model.weight_wrapper_patches = shipped.weight_wrapper_patches
    model.model_options = shipped.model_options
    return model


def interrupted() -> bool:
    """True while the user's Cancel (``/interrupt``) is pending."""
    return comfy.model_management.processing_interrupted()


def progress_bar(node_id: str | None, total: int):
    return comfy.utils.ProgressBar(total, node_id=node_id)


def send_event(event: str, data: dict) -> None:
    """A websocket message to the frontend (no-op outside the server)."""
    try:
        from server import PromptServer

        PromptServer.instance.send_sync(event, data)
    except Exception:
        pass


def load_model_file(path: Path, *, with_clip: bool = False):
    """(MODEL, CLIP or None) from a diffusion-model file or, with ``with_clip``, a full checkpoint."""
    if with_clip:
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=False, output_clip=True)
        if clip is None:
            raise ValueError(f"{path.name!r} holds no text encoder: pass --conditioning instead of prompts")
        return model, clip
    return comfy.sd.load_diffusion_model(str(path)), None


def encode_prompt(clip, text: str) -> list:
    """CONDITIONING for ``text``, as CLIP Text Encode makes it."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


# ------------------------------------------------------------------------------- for the search nodes
def quant_device() -> torch.device:
    """Where option tables are built: ComfyUI's CUDA device, else the CPU."""
    dev = comfy.model_management.get_torch_device()
    return dev if dev.type == "cuda" else torch.device("cpu")


def raise_if_interrupted() -> None:
    """Raise ComfyUI's own interrupt exception while the user's Cancel is pending."""
    comfy.model_management.throw_exception_if_processing_interrupted()


def output_dir() -> Path:
    """ComfyUI's output folder."""
    return Path(folder_paths.get_output_directory())


def model_file(folder: str, name: str) -> Path:
    """The path of ``name`` in one of ComfyUI's model folders (e.g. ``"diffusion_models"``); a clear error if absent."""
    return Path(folder_paths.get_full_path_or_raise(folder, name))


# -------------------------------------------------------------- the trained reference model (nodes/reference_model.py)
def build_diffusion_model(family: str, unet_config: dict):
    """A BaseModel of ``comfy.supported_models.<family>`` built from ``unet_config`` by ComfyUI's own classes, on the
    CPU in fp32 (ComfyUI leaves parameters uninitialised, and persistent buffers such as position embeddings too:
    see :func:`init_position_embedding`)."""
    import comfy.supported_models

    cls = getattr(comfy.supported_models, family, None)
    if cls is None:
        raise ValueError(f"ComfyUI has no supported model {family!r}")
    return cls(dict(unet_config)).get_model({})


def init_position_embedding(dm: nn.Module) -> None:
    """Fill an MMDiT's fixed 2-D sin-cos ``pos_embed`` buffer as SD3's checkpoints hold it."""
    from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed

    pos = getattr(dm, "pos_embed", None)
    if not isinstance(pos, torch.Tensor):
        raise ValueError(f"{type(dm).__name__} has no pos_embed buffer")
    grid = int(round(pos.shape[1] ** 0.5))
    with torch.no_grad():
        pos.copy_(torch.from_numpy(get_2d_sincos_pos_embed(pos.shape[-1], grid)).to(pos.dtype).unsqueeze(0))


def detected_class(state_dict: dict) -> str | None:
    """The ``comfy.supported_models`` class name ComfyUI's detection picks for a diffusion-model state dict."""
    import comfy.model_detection

    detected = comfy.model_detection.model_config_from_unet(state_dict, "")
    return type(detected).__name__ if detected is not None else None


def apply_denoiser(base) -> collections.abc.Callable:
    """``denoise(x_σ, σ, context, pooled) → x̂₀`` through the BaseModel's own ``apply_model`` (its model sampling:
    the input scaling, σ → timestep and the output parameterisation the sampler uses)."""

    def denoise(x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return base.apply_model(x, sigma, c_crossattn=context, y=pooled)

    return denoise


def latent_to_model_space(model_or_family, latent: torch.Tensor) -> torch.Tensor:
    """What the denoiser sees of a LATENT (the latent format's ``process_in``: SD3 scales and shifts)."""
    import comfy.latent_formats

    if isinstance(model_or_family, str):
        return getattr(comfy.latent_formats, model_or_family)().process_in(latent)
    return model_or_family.get_model_object("latent_format").process_in(latent)


def sample_batch(model, positive, negative, *, latent_shape: tuple[int, ...], seed: int, steps: int, cfg: float,
                 sampler_name: str = "euler", scheduler: str = "simple") -> torch.Tensor:
    """ComfyUI's KSampler on an empty latent of ``latent_shape`` (a whole batch from one noise seed, as KSampler
    draws it); returns the LATENT samples."""
    return _ksampler(model, positive, negative, torch.zeros(latent_shape), seed=seed, steps=steps, cfg=cfg,
                     sampler_name=sampler_name, scheduler=scheduler)
