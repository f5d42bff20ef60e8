"""Tiny random-weight diffusion models built with ComfyUI's own classes (testbed.md §5.2-5.4).

Each model is the real architecture code of ComfyUI (``comfy.supported_models`` configs) with as few
blocks as ComfyUI's detection allows, random weights, saved as fp16 safetensors in ComfyUI's native
key format; :func:`build_and_save` asserts that ComfyUI's real loader detects it as the intended
class. A random TAESD (``taesd``/``taesdxl``) stands in for the VAE and :func:`conditioning_for`
returns random CONDITIONING of the right shapes, so no text encoder is needed.

Command line (the demo uses it; DIR is a ComfyUI ``models/`` folder)::

    python tests/tiny_models.py --out DIR [names...]      # DIR/diffusion_models/<name>.safetensors
                                                          # DIR/vae_approx/taesd{,xl}_{encoder,decoder}
    python tests/tiny_models.py --out DIR --cached        # link from the per-user cache (generate once)
    python tests/tiny_models.py --list

Importing this module needs only torch (ComfyUI is imported lazily by the builders).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:  # so the helpers import each other however this file was loaded
    sys.path.append(str(_HERE))

import comfy_host  # noqa: E402

# --------------------------------------------------------------------------------------------- specs

_U = dict(use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False, in_channels=4,
          out_channels=4, use_temporal_resblock=False, use_temporal_attention=False)
_SDXL_NARROW = dict(_U, adm_in_channels=2816, num_classes="sequential", model_channels=320,
                    num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 1, 1, 2, 2],
                    transformer_depth_output=[0] * 9, channel_mult=[1, 1, 1], transformer_depth_middle=-2,
                    use_linear_in_transformer=True, context_dim=2048)


_WAN = dict(image_model="wan2.1", model_type="t2v", dim=128, ffn_dim=256, num_heads=1, num_layers=2, in_dim=16,
            out_dim=16, text_dim=4096, freq_dim=256, patch_size=(1, 2, 2), window_size=(-1, -1), qk_norm=True,
            cross_attn_norm=True, eps=1e-6)
# MMDiT: detection reads hidden = 64 * depth from the patch embedder
_MMDIT = dict(in_channels=16, out_channels=16, patch_size=2, depth=2, adm_in_channels=2048, input_size=None,
              context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096,
                                                                               "out_features": 128}},
              num_patches=256, pos_embed_max_size=16, pos_embed_scaling_factor=None, x_block_self_attn_layers=[])
_HUNYUAN_VIDEO = dict(image_model="hunyuan_video", in_channels=16, out_channels=16, patch_size=[1, 2, 2],
                      vec_in_dim=768, axes_dim=[16, 56, 56], meanflow=False, context_in_dim=4096, hidden_size=128,
                      mlp_ratio=4.0, num_heads=1, depth=1, depth_single_blocks=1, theta=256, qkv_bias=True,
                      byt5=False, guidance_embed=True, use_cond_type_embedding=False, vision_in_dim=None)
_FLUX = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=128,
             mlp_ratio=4.0, num_heads=1, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000,
             patch_size=2, qkv_bias=True, guidance_embed=True)


@dataclass(frozen=True)
class Spec:
    cls: str                 # comfy.supported_models class that detection must pick
    config: dict             # unet_config given to that class
    arch: str                # conditioning family (COND_SHAPES)
    model_base: str          # comfy.model_base class of the loaded model
    vae: str                 # TAESD matching the latent format: taesd (SD15) | taesdxl (SDXL)
    image_px: int            # smallest convenient image side for sampling (PixArt needs >= ~264)
    extra: dict = field(default_factory=dict)
    host_config: dict = field(default_factory=dict)  # ComfyUI version prefix -> extra unet_config keys it needs
    hosts: tuple[str, ...] = ()  # version prefixes whose detection accepts this width (empty: every host)

    @property
    def latent_px(self) -> int:
        return self.image_px // 8

    def config_for(self, version: str) -> dict:
        """The unet_config for ComfyUI ``version`` (newer hosts added required parameters)."""
        extra = next((v for k, v in self.host_config.items() if version.startswith(k)), {})
        return {**self.config, **extra}

    def available_on(self, version: str) -> bool:
        return not self.hosts or any(version.startswith(h) for h in self.hosts)


SPECS: dict[str, Spec] = {
    "sd15_tiny": Spec("SD15", dict(
        _U, adm_in_channels=None, model_channels=320, num_res_blocks=[1], transformer_depth=[1],
        transformer_depth_output=[1, 1], channel_mult=[1], transformer_depth_middle=1,
        use_linear_in_transformer=False, context_dim=768), "sd15", "BaseModel", "taesd", 64),
    "sdxl_vega_narrow": Spec("Segmind_Vega", dict(_SDXL_NARROW), "sdxl", "SDXL", "taesdxl", 64),
    "sdxl_narrow": Spec("SDXL", dict(_SDXL_NARROW, transformer_depth=[0, 0, 2, 2, 10, 10]),
                        "sdxl", "SDXL", "taesdxl", 64),
    "pixart_alpha_d1": Spec("PixArtAlpha", dict(
        image_model="pixart_alpha", depth=1, num_heads=16, patch_size=2, hidden_size=1152, in_channels=4,
        micro_condition=True, model_max_length=120), "pixart", "PixArt", "taesd", 384),
    "pixart_sigma_d1": Spec("PixArtSigma", dict(
        image_model="pixart_sigma", depth=1, num_heads=16, patch_size=2, hidden_size=1152, in_channels=4,
        micro_condition=False, model_max_length=300), "pixart", "PixArt", "taesdxl", 384),
    "hydit_tiny": Spec("HunyuanDiT", dict(image_model="hydit", depth=2, hidden_size=256),
                       "hydit", "HunyuanDiT", "taesdxl", 64),
    "hydit1_d1": Spec("HunyuanDiT1", dict(image_model="hydit1", depth=1, hidden_size=1408, size_cond=True,
                                          use_style_cond=True), "hydit", "HunyuanDiT", "taesdxl", 64),
    # video (5-D latents): Wan 2.1 text-to-video at the smallest width detection allows (heads = dim // 128)
    "wan21_tiny": Spec("WAN21_T2V", dict(_WAN), "wan", "WAN21", "taesd", 64),
    # 2025-26 architectures at the smallest width their detection allows (see tests/test_architectures.py)
    "wan22_tiny": Spec("WAN22_T2V", dict(_WAN, in_dim=48, out_dim=48), "wan", "WAN22", "taesd", 64),
    "sd3_tiny": Spec("SD3", dict(_MMDIT), "sd3", "SD3", "taesd", 64),
    "sd35_tiny": Spec("SD3", dict(_MMDIT, qk_norm="rms", x_block_self_attn_layers=[0]), "sd3", "SD3", "taesd", 64),
    "hunyuan_video_tiny": Spec("HunyuanVideo", dict(_HUNYUAN_VIDEO), "hunyuan_video", "HunyuanVideo", "taesd", 64,
                               host_config={"0.33": {"meanflow_sum": False}}),
    # Flux at hidden 128 (1 head): 0.33 derives the heads from the width; 0.3.75 fixes 24 heads (hidden 3072)
    "flux_dev_tiny": Spec("Flux", dict(_FLUX), "flux", "Flux", "taesd", 64,
                          host_config={"0.33": {"txt_ids_dims": []}}, hosts=("0.33",)),
    "flux_schnell_tiny": Spec("FluxSchnell", dict(_FLUX, guidance_embed=False), "flux", "Flux", "taesd", 64,
                              host_config={"0.33": {"txt_ids_dims": []}}, hosts=("0.33",)),
}
# Architectures whose detection fixes the width (Qwen-Image 3072, Chroma 3072 + a 5120-wide approximator, Lumina 2
# 2304, Z-Image 3840; Flux 3072 on 0.3.75): 0.2-0.9 B weights even at one block, too big to sample in the tests, so
# they are built on the meta device (no memory) for detection and layer-table checks only.
_FULL_FLUX = dict(_FLUX, hidden_size=3072, num_heads=24)
FULL_WIDTH: dict[str, Spec] = {
    "flux_dev_full": Spec("Flux", _FULL_FLUX, "flux", "Flux", "taesd", 64, host_config={"0.33": {"txt_ids_dims": []}}),
    "chroma_full": Spec("Chroma", dict(
        {k: v for k, v in _FULL_FLUX.items() if k not in ("vec_in_dim", "guidance_embed")}, image_model="chroma",
        in_channels=64, out_channels=64, in_dim=64, out_dim=3072, hidden_dim=5120, n_layers=5, patch_size=1),
        "flux", "Chroma", "taesd", 64, host_config={"0.33": {"txt_ids_dims": [], "vec_in_dim": None}}),
    "qwen_image_full": Spec("QwenImage", dict(image_model="qwen_image", in_channels=64, num_layers=1), "qwen",
                            "QwenImage", "taesd", 64),
    "lumina2_full": Spec("Lumina2", dict(
        image_model="lumina2", patch_size=2, in_channels=16, dim=2304, cap_feat_dim=2304, n_layers=1, qk_norm=True,
        n_heads=24, n_kv_heads=8, axes_dims=[32, 32, 32], axes_lens=[300, 512, 512], rope_theta=10000.0,
        ffn_dim_multiplier=4.0), "lumina2", "Lumina2", "taesd", 64),
    "zimage_full": Spec("ZImage", dict(
        image_model="lumina2", patch_size=2, in_channels=16, dim=3840, cap_feat_dim=2560, n_layers=1, qk_norm=True,
        n_heads=30, n_kv_heads=30, axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512], rope_theta=256.0,
        ffn_dim_multiplier=8.0 / 3.0, z_image_modulation=True, time_scale=1000.0, pad_tokens_multiple=32),
        "lumina2", "Lumina2", "taesd", 64),
}


def build_meta(name: str) -> tuple[Any, str]:
    """(diffusion model on the meta device, class name ComfyUI's detection picks for its state dict) of a
    :data:`FULL_WIDTH` or :data:`SPECS` model: no weights are allocated."""
    comfy_host.setup_inprocess()
    import comfy.model_detection
    import comfy.supported_models as sm

    spec = FULL_WIDTH.get(name) or SPECS[name]
    with torch.device("meta"):
        dm = getattr(sm, spec.cls)(spec.config_for(comfy_host.host_version())).get_model({}).diffusion_model
    detected = comfy.model_detection.model_config_from_unet(dm.state_dict(), "")
    return dm, type(detected).__name__ if detected is not None else "None"


# What the tests and the demo use by default: one model per target family (SDXL: the smaller Vega).
DEFAULT_MODELS = ("sd15_tiny", "sdxl_vega_narrow", "pixart_alpha_d1", "pixart_sigma_d1", "hydit_tiny")
TAESD_NAMES = ("taesd", "taesdxl")

# ------------------------------------------------------------------------------------- conditioning

# arch -> (cond shape, {extra key: shape}); "ones" extras are attention masks.
COND_SHAPES: dict[str, tuple[tuple[int, ...], dict[str, tuple[int, ...]]]] = {
    "sd15": ((1, 77, 768), {}),
    "sdxl": ((1, 77, 2048), {"pooled_output": (1, 1280)}),
    "pixart": ((1, 120, 4096), {}),
    "wan": ((1, 32, 4096), {}),
    "sd3": ((1, 77, 4096), {"pooled_output": (1, 2048)}),
    "flux": ((1, 32, 4096), {"pooled_output": (1, 768)}),
    "hunyuan_video": ((1, 32, 4096), {"pooled_output": (1, 768)}),
    "qwen": ((1, 32, 3584), {}),
    "lumina2": ((1, 32, 2304), {}),
    "zimage": ((1, 32, 2560), {}),
    "hydit": ((1, 77, 1024), {"attention_mask": (1, 77), "conditioning_mt5xl": (1, 256, 2048),
                              "attention_mask_mt5xl": (1, 256)}),
}
ARCHES = tuple(COND_SHAPES)


def conditioning_for(arch: str, seed: int = 0, batch: int = 1) -> list:
    """Random ComfyUI CONDITIONING ``[[cond, extras]]`` of the shapes ``arch``'s text encoders give."""
    if arch not in COND_SHAPES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHES}")
    shape, extra_shapes = COND_SHAPES[arch]
    g = torch.Generator().manual_seed(int(seed))
    cond = torch.randn((batch, *shape[1:]), generator=g)
    extras: dict[str, Any] = {}
    for key, eshape in extra_shapes.items():
        eshape = (batch, *eshape[1:])
        is_mask = key.startswith("attention_mask")
        extras[key] = torch.ones(eshape) if is_mask else torch.randn(eshape, generator=g)
    return [[cond, extras]]


# ---------------------------------------------------------------------------------------- building


def init_params(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Deterministic random init (ComfyUI's ops allocate with ``torch.empty`` and skip init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                fan_in = max(math.prod(p.shape[1:]), 1)
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif name.endswith("weight") or "scale" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return module


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def build_and_save(name: str, path: str | os.PathLike, seed: int = 0, check: bool = True) -> dict:
    """Build model ``name`` of :data:`SPECS`, save it (fp16) and assert ComfyUI detects it correctly.

    Needs the in-process host (:func:`comfy_host.setup_inprocess` is called if it was not).
    Returns a summary dict (class, params, bytes, seconds).
    """
    comfy_host.setup_inprocess()
    import comfy.sd
    import comfy.supported_models as sm

    spec = SPECS[name] if name in SPECS else FULL_WIDTH[name]
    version = comfy_host.host_version()
    if not spec.available_on(version):
        raise ValueError(f"{name} cannot be built on ComfyUI {version}: its detection accepts this width only on "
                         f"{', '.join(spec.hosts)}")
    cls = getattr(sm, spec.cls)
    path = Path(path)
    t0 = time.perf_counter()
    dm = init_params(cls(spec.config_for(version)).get_model({}).diffusion_model, seed)
    sd = {k: v.detach().to(torch.float16) for k, v in dm.state_dict().items()}
    params = sum(p.numel() for p in dm.parameters())
    del dm
    _atomic_save(sd, path, metadata={"qua2sedimo_tiny_model": name, "seed": str(seed)})
    del sd
    info = {"name": name, "class": spec.cls, "params": params, "bytes": path.stat().st_size,
            "build_s": round(time.perf_counter() - t0, 2)}
    if check:
        t1 = time.perf_counter()
        mp = comfy.sd.load_diffusion_model(str(path))
        got_cls = type(mp.model.model_config).__name__
        got_base = type(mp.model).__name__
        if type(mp.model.model_config) is not cls or got_base != spec.model_base:
            raise AssertionError(f"{name}: ComfyUI detected {got_cls}/{got_base}, "
                                 f"expected {spec.cls}/{spec.model_base}")
        info["load_s"] = round(time.perf_counter() - t1, 2)
        del mp
    return info


def save_taesd(vae_approx_dir: str | os.PathLike, seed: int = 0,
               names: tuple[str, ...] = TAESD_NAMES) -> list[Path]:
    """Random TAESD encoder/decoder files so ``VAELoader`` offers ``taesd``/``taesdxl``."""
    from comfy.taesd.taesd import Decoder, Encoder

    out = []
    for i, name in enumerate(names):
        for j, (part, ctor) in enumerate((("encoder", Encoder), ("decoder", Decoder))):
            m = init_params(ctor(4), seed + 10 * i + j)
            p = Path(vae_approx_dir) / f"{name}_{part}.safetensors"
            _atomic_save({k: v.detach().float() for k, v in m.state_dict().items()}, p)
            out.append(p)
    return out


def generate(models_dir: str | os.PathLike, names: tuple[str, ...] | list[str] = DEFAULT_MODELS,
             taesd: bool = True, seed: int = 0, log=print) -> list[dict]:
    """Generate ``names`` (+ TAESD) into a ComfyUI ``models/`` folder, in this process."""
    comfy_host.setup_inprocess()
    models_dir = Path(models_dir)
    infos = []
    for name in names:
        info = build_and_save(name, models_dir / "diffusion_models" / f"{name}.safetensors", seed=seed)
        log(json.dumps(info))
        infos.append(info)
    if taesd:
        save_taesd(models_dir / "vae_approx", seed=seed)
    return infos


# ------------------------------------------------------------------------------------------- caching


def cache_key() -> str:
    """Changes whenever this file, the host recipe, the ComfyUI version in use or the torch version changes."""
    h = hashlib.sha256(Path(__file__).read_bytes())
    h.update(comfy_host.recipe().encode())
    h.update(comfy_host.host_version().encode())
    h.update(torch.__version__.encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    return comfy_host.cache_root() / "tiny-models" / cache_key()


@contextlib.contextmanager
def _locked(path: Path):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _model_files(names) -> list[str]:
    return ([f"diffusion_models/{n}.safetensors" for n in names]
            + [f"vae_approx/{t}_{p}.safetensors" for t in TAESD_NAMES for p in ("encoder", "decoder")])


def ensure_models(models_dir: str | os.PathLike, names: tuple[str, ...] | list[str] = DEFAULT_MODELS,
                  python: str | None = None, use_cache: bool | None = None, log=None) -> dict[str, Path]:
    """Make ``names`` (+ TAESD) available in the ComfyUI ``models/`` folder ``models_dir``.

    With the cache (default; disable with ``use_cache=False`` or env ``QUA2SEDIMO_TINY_CACHE=0``) the
    files are generated once per :func:`cache_key` under the host cache root, by a subprocess
    running this file (keeps the caller's memory low and its imports clean), then symlinked.
    Returns {relative path: path in models_dir}.
    """
    if use_cache is None:
        use_cache = os.environ.get("QUA2SEDIMO_TINY_CACHE", "1") not in ("0", "false", "no", "")
    models_dir = Path(models_dir)
    rel_files = _model_files(names)
    src_root = cache_dir() if use_cache else models_dir
    with _locked(src_root.parent / f".lock-{src_root.name}"):
        missing = [n for n in names if not (src_root / "diffusion_models" / f"{n}.safetensors").is_file()]
        need_taesd = any(not (src_root / f).is_file() for f in rel_files if f.startswith("vae_approx/"))
        if missing or need_taesd:
            cmd = [python or sys.executable, str(Path(__file__).resolve()), "--out", str(src_root),
                   *(missing or ["--no-models"])]
            t0 = time.perf_counter()
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"tiny model generation failed ({res.returncode}): {' '.join(cmd)}\n"
                                   f"{res.stdout[-4000:]}\n{res.stderr[-8000:]}")
            if log:
                log(f"generated {missing} (+taesd) into {src_root} in {time.perf_counter() - t0:.1f} s")
        if use_cache:
            os.utime(src_root)
            _prune_cache(src_root)
    out = {}
    for rel in rel_files:
        dst = models_dir / rel
        if use_cache:
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.is_symlink() or dst.exists():
                if dst.resolve() != (src_root / rel).resolve():
                    dst.unlink()
            if not dst.exists():
                dst.symlink_to(src_root / rel)
        out[rel] = dst
    return out


def _prune_cache(keep: Path, max_age_s: float = 3 * 86400) -> None:
    """Drop tiny-model caches of other keys not used for ``max_age_s`` (old versions of this file)."""
    now = time.time()
    for d in keep.parent.iterdir():
        if d.is_dir() and d != keep and now - d.stat().st_mtime > max_age_s:
            shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path,
                    help="a ComfyUI models/ folder (diffusion_models/, vae_approx/ inside)")
    ap.add_argument("names", nargs="*", help=f"models to build (default: {' '.join(DEFAULT_MODELS)}; "
                                             f"all: {' '.join(SPECS)})")
    ap.add_argument("--no-models", action="store_true", help="only write the TAESD files")
    ap.add_argument("--no-taesd", action="store_true", help="do not write the TAESD files")
    ap.add_argument("--cached", action="store_true",
                    help="generate into the per-user cache once and symlink into --out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--list", action="store_true", help="list the available models and exit")
    a = ap.parse_args(argv)
    if a.list:
        for n, s in SPECS.items():
            print(f"{n:18s} {s.cls:14s} arch={s.arch:6s} vae={s.vae:8s} image_px={s.image_px}"
                  f"{'  (default)' if n in DEFAULT_MODELS else ''}")
        return 0
    if a.out is None:
        ap.error("--out is required")
    names = [] if a.no_models else (a.names or list(DEFAULT_MODELS))
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {list(SPECS)}")
    t0 = time.perf_counter()
    if a.cached:
        if a.seed != 0 or a.no_taesd:
            ap.error("--cached supports only the default seed, with TAESD")
        files = ensure_models(a.out, names, log=lambda m: print(m, file=sys.stderr))
        for rel, p in files.items():
            print(f"{rel} -> {p.resolve()}")
    else:
        # setup_inprocess() needs a ComfyUI tree (COMFY_DIR or the install cache).
        generate(a.out, names, taesd=not a.no_taesd, seed=a.seed)
    print(f"done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
