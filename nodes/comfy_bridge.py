"""Every use of ComfyUI internals (``comfy.*``, ``folder_paths``) lives here; nodes stay thin.

* a quantized *copy* of a MODEL (the input ModelPatcher and its modules are never mutated),
* the option-table cache and config/quantized-file folders under ComfyUI's models folder,
* progress bars and Cancel,
* saving and loading quantized safetensors through ComfyUI's own model detection and custom ops.
"""

from __future__ import annotations

import copy
import functools
import os
import re
from pathlib import Path

import comfy.lora
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.sd
import comfy.utils
import folder_paths
import torch
from torch import nn

from ..quant import QuantConfig, QuantConv2d, QuantLinear, option_table, quantize_
from ..quant.format import load_quantized_file, save_quantized_file
from ..quant.layer_table import dtype_from_name, dtype_name, quantizable_layers
from ..quant.layers import _QuantBase

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


def config_dir() -> Path:
    return Path(folder_paths.folder_names_and_paths[FOLDER][0][0])


def cache_dir() -> Path:
    """Option tables and FP trajectory states (``$QUA2SEDIMO_CACHE_DIR`` overrides models/qua2sedimo/cache)."""
    override = os.environ.get("QUA2SEDIMO_CACHE_DIR")
    return Path(override) if override else config_dir() / "cache"


def list_configs() -> list[str]:
    return folder_paths.get_filename_list(FOLDER)


def list_quantized() -> list[str]:
    return folder_paths.get_filename_list(QUANTIZED_FOLDER)


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


def _shallow_copy(module: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter and buffer (no memory)."""
    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = {k: (_shallow_copy(v) if v is not None else None) for k, v in module._modules.items()}
    return new


def _patched_weights(model, dm: nn.Module, config: QuantConfig) -> dict[str, torch.Tensor]:
    """Weights with the MODEL's pending LoRA/weight patches applied, for the layers to quantize."""
    out = {}
    for name, option in config.options.items():
        key = f"diffusion_model.{name}.weight"
        if option != "fp16" and key in model.patches:
            w = dm.get_submodule(name).weight
            # a private fp32 copy: calculate_weight works in place (on the Parameter itself if w is fp32)
            dense = w.detach().to(torch.float32, copy=True)
            out[name] = comfy.lora.calculate_weight(model.patches[key], dense, key).to(w.dtype)
    return out


def apply_config(model, config: QuantConfig, act_bits: int = 16, node_id: str | None = None):
    """A new MODEL whose denoiser holds packed weights as ``config`` says; ``model`` is untouched.

    LoRA/weight patches already on the input are baked into the weights before quantization.
    """
    dm = diffusion_model(model)
    config.check_model(dm)
    new_dm = _shallow_copy(dm)
    patched = _patched_weights(model, dm, config)
    for name, w in patched.items():
        new_dm.get_submodule(name).weight = nn.Parameter(w, requires_grad=False)
    options = sorted({o for o in config.options.values() if o != "fp16"})
    table = None
    if options and not patched:
        table = option_table(dm, options, cache_dir=cache_dir(), device=_quant_device(), progress=Progress(node_id),
                             only=config.options)
    summary = quantize_(new_dm, config, table=table, act_bits=act_bits)
    new_dm.qua2sedimo_config = config
    base = copy.copy(model.model)
    base._modules = dict(model.model._modules)
    base._parameters = dict(model.model._parameters)
    base._buffers = dict(model.model._buffers)
    base.diffusion_model = new_dm
    out = model.clone()
    out.model = base
    out.size = comfy.model_management.module_size(base)
    for key in [k for k in out.patches if k.removeprefix("diffusion_model.").removesuffix(".weight") in patched]:
        del out.patches[key]
    mark_quantized(out)
    return out, summary


LORA_AFTER_QUANT = (
    "LoRA and other weight patches cannot be added to a Qua2SeDiMo-quantized model (its weights are packed "
    "3/4-bit codes). Load the LoRA on the full-precision MODEL and connect that to Qua2SeDiMo Apply Config: "
    "pending patches are baked into the weights before quantization."
)


class _QuantPatcherMixin:
    """Refuses weight patches (LoRA, model merging) with a clear message instead of silently dropping them:
    ComfyUI's LoRA loader only maps keys of dense ``.weight`` tensors, which packed layers do not have."""

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        raise ValueError(LORA_AFTER_QUANT)


@functools.cache
def _quant_patcher_class(base: type) -> type:
    if issubclass(base, _QuantPatcherMixin):
        return base
    return type(f"Qua2SeDiMo{base.__name__}", (_QuantPatcherMixin, base), {})


def mark_quantized(model) -> None:
    """Make a ModelPatcher (and its clones) refuse weight patches; see ``_QuantPatcherMixin``."""
    model.__class__ = _quant_patcher_class(type(model))


def _quant_device() -> torch.device:
    dev = comfy.model_management.get_torch_device()
    return dev if dev.type == "cuda" else torch.device("cpu")


# ------------------------------------------------------------------------------------- save / load
def save_quantized(model, path: Path) -> dict:
    """Write the MODEL's denoiser (packed where quantized) to ``path`` atomically; returns the header."""
    dm = diffusion_model(model)
    layers = {}
    for name, mod in dm.named_modules():
        if isinstance(mod, _QuantBase):
            layers[name] = {"option": mod.option, "kind": mod.kind, "shape": list(mod.weight_shape),
                            "dtype": dtype_name(mod.weight_dtype), "act_bits": mod.act_bits,
                            "group_size": mod.group_size}
    if not layers:
        raise ValueError("this MODEL holds no quantized layers: run Qua2SeDiMo Apply Config first")
    for info in quantizable_layers(dm):
        layers.setdefault(info.name, {"option": "fp16", "kind": info.kind, "shape": list(info.shape),
                                      "dtype": dtype_name(info.dtype)})
    config = getattr(dm, "qua2sedimo_config", None)
    header = {
        "layers": layers,
        "model_class": type(model.model).__name__,
        "config": config.to_dict() if config is not None else None,
        "source_fingerprint": config.fingerprint if config is not None else None,
    }
    sd = {k: v for k, v in dm.state_dict().items()}
    save_quantized_file(path, sd, header)
    return header


def _quant_ops(header: dict):
    """Custom operations: layers stored quantized become QuantLinear/QuantConv2d while the state dict
    loads, taking the packed tensors as they are. The dense placeholders ComfyUI allocates first are
    ``torch.empty`` (pages never touched, so they cost no resident memory) and are dropped here."""
    layers = header["layers"]

    def load_into(module: nn.Module, cls: type, sd: dict, prefix: str) -> bool:
        info = layers.get(prefix[:-1])
        if info is None or info["option"] == "fp16" or prefix + "codes" not in sd:
            return False
        method, bits = info["option"].rsplit("-", 1)
        module._parameters.pop("weight", None)
        module._parameters.pop("bias", None)
        _QuantBase._init_buffers(module, info["shape"], method, int(bits), dtype_from_name(info["dtype"]),
                                 prefix + "bias" in sd, info.get("group_size"), int(info.get("act_bits", 16)))
        module.__class__ = cls
        module.codes = sd[prefix + "codes"]
        module.lut = sd[prefix + "lut"]
        if prefix + "bias" in sd:
            module.bias = sd[prefix + "bias"].to(module.weight_dtype)
        return True

    class Ops(comfy.ops.manual_cast):
        class Linear(comfy.ops.manual_cast.Linear):
            def _load_from_state_dict(self, sd, prefix, *args, **kwargs):
                if not load_into(self, QuantLinear, sd, prefix):
                    super()._load_from_state_dict(sd, prefix, *args, **kwargs)

        class Conv2d(comfy.ops.manual_cast.Conv2d):
            def _load_from_state_dict(self, sd, prefix, *args, **kwargs):
                if not load_into(self, QuantConv2d, sd, prefix):
                    super()._load_from_state_dict(sd, prefix, *args, **kwargs)

    return Ops


def load_quantized(path: Path):
    """A MODEL from a quantized file, detected by ComfyUI and built with our custom ops."""
    sd, header = load_quantized_file(path)
    detect = dict(sd)
    for name, info in header["layers"].items():  # detection reads weight shapes: give it placeholders
        if info["option"] != "fp16":
            detect[f"{name}.weight"] = torch.empty(info["shape"], dtype=dtype_from_name(info["dtype"]))
    model = comfy.sd.load_diffusion_model_state_dict(detect, model_options={"custom_operations": _quant_ops(header)})
    if model is None:
        raise ValueError(f"ComfyUI could not detect the model type of {path.name!r} (unsupported architecture)")
    dm = diffusion_model(model)
    missing = [n for n, i in header["layers"].items() if i["option"] != "fp16"
               and not isinstance(dm.get_submodule(n), _QuantBase)]
    if missing:
        raise ValueError(f"{path.name!r}: {len(missing)} quantized layer(s) did not load (e.g. {missing[0]!r})")
    if header.get("config"):
        dm.qua2sedimo_config = QuantConfig.from_dict(header["config"], model=dm, source=path.name)
    model.size = comfy.model_management.module_size(model.model)
    mark_quantized(model)
    return model


# ------------------------------------------------------------------------------------------- search
def journal_dir() -> Path:
    return config_dir() / "journals"


def search_copy(model) -> nn.Module:
    """A copy of the MODEL's BaseModel whose denoiser module tree is its own (parameters shared, no memory):
    the search swaps quantized layers into it while the MODEL itself keeps serving normal workflows."""
    dm = diffusion_model(model)
    base = copy.copy(model.model)
    base._modules = dict(model.model._modules)
    base._parameters = dict(model.model._parameters)
    base._buffers = dict(model.model._buffers)
    base.diffusion_model = _shallow_copy(dm)
    return base


def routed(model, fn):
    """A clone of ``model`` whose sampler calls ``fn(apply_model, args)`` for every denoiser call; ``args`` holds
    ``input``, ``timestep``, ``c`` (conditioning kwargs) and ``cond_or_uncond`` (0 = positive, 1 = negative per
    equal chunk of the batch), as ComfyUI's ``model_function_wrapper`` receives them."""
    out = model.clone()
    out.set_model_unet_function_wrapper(fn)
    return out


def sample_latents(model, positive, negative, *, seed: int, steps: int, cfg: float, sampler_name: str,
                   scheduler: str, width: int, height: int) -> torch.Tensor:
    """ComfyUI's KSampler on an empty latent of ``width``×``height`` pixels (fixed seed, no progress bar)."""
    import comfy.sample

    channels = getattr(model.model.latent_format, "latent_channels", 4)
    latent = torch.zeros(1, channels, height // 8, width // 8)
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


def adopt(model) -> None:
    """Point a MODEL that was built in another process (unpickled on a Ray worker) at this process's devices."""
    model.load_device = comfy.model_management.get_torch_device()
    model.offload_device = comfy.model_management.unet_offload_device()


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
