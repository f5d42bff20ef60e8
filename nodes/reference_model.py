"""The trained reference model: a small class-conditional SD3 (MMDiT) trained on the UCI digits, with ComfyUI's
own model class, saved as an fp16 diffusion-model file that ComfyUI's detection loads as ``SD3``.

* Architecture: ``comfy.supported_models.SD3`` at depth 2 (hidden 128 = 64 × depth, 2 heads), patch 2, 16 latent
  channels, a 4×4-token position grid; text-encoder widths of SD3 (context 4096, pooled 2048), so any SD3-shaped
  CONDITIONING fits.
* Latent = pixels (:mod:`..search.digits`): a 32×32 digit is the 16-channel 8×8 latent ``pixel_unshuffle(x, 4)`` in
  the model's space; a LATENT maps there by SD3's latent format (``process_in``). In ComfyUI's ×8 convention the
  latent is that of a 64×64 "image": sample with width = height = 64. The **Digit Decode** node turns a LATENT
  into the 32×32 digits (no VAE); **Digit Conditioning** gives the class (or none) as CONDITIONING.
* Training: rectified flow through the model's own ``apply_model`` (ComfyUI's FLOW/CONST sampling, SD3 shift 3),
  seeded, on one or two CPU threads; weights are the EMA, saved in fp16.
* Cache: ``<dir>/<VERSION>-s<steps>/digits_sd3.safetensors`` (+ ``meta.json``); a file is never rebuilt once there.

Command line::

    python -m qua2sedimo.nodes.reference_model --out DIR [--steps N] [--threads 2]   # train (or reuse) → path
    python -m qua2sedimo.nodes.reference_model evaluate --model FILE --config fp --config uaq-4 \
        --config knapsack=FILE.q.safetensors --out DIR [--samples 500]          # FID / accuracy + digits grid
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..quant.atomic import atomic_write_text, atomic_write_with
from ..search import digits

VERSION = "digits-sd3-v1"  # change whenever the recipe (architecture, data, objective, settings) changes
FAMILY = "SD3"
FILE_NAME = "digits_sd3.safetensors"
DEPTH = 2
UNET_CONFIG = dict(in_channels=16, out_channels=16, patch_size=2, depth=DEPTH, adm_in_channels=2048,
                   input_size=None, num_patches=16, pos_embed_max_size=4, pos_embed_scaling_factor=None,
                   x_block_self_attn_layers=[],
                   context_embedder_config={"target": "torch.nn.Linear",
                                            "params": {"in_features": 4096, "out_features": 64 * DEPTH}})
CONTEXT_DIM, POOLED_DIM, CLASS_TOKENS = 4096, 2048, 4
IMAGE_PX = 32  # the digits' side in pixels
SAMPLE_PX = 64  # width/height to give ComfyUI's empty-latent and sampling nodes (8×8 latents)
DEFAULT_STEPS = 4000
STEPS_ENV = "QUA2SEDIMO_DIGITS_STEPS"  # a shorter training (tests); the cache keys on the step count
SEED = 0
# What the example workflows sample with (ComfyUI's KSampler): guidance 2 draws clean, prototypical digits
SAMPLING = dict(steps=20, cfg=2.0, sampler_name="euler", scheduler="simple")
# What FID / accuracy sample with: no guidance. Guidance moves the model's samples away from the data on purpose
# (measured, 500 digits: FP FID 40.2 at cfg 1, 98 at 1.5, 253 at 2; at cfg 2 quantized configs often score *better*
# than FP), so only at cfg 1 does FID against the real digits measure what quantization breaks.
METRIC_SAMPLING = dict(SAMPLING, cfg=1.0)


def default_steps() -> int:
    value = os.environ.get(STEPS_ENV, "").strip()
    if not value:
        return DEFAULT_STEPS
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"${STEPS_ENV} must be a positive integer (got {value!r})")
    return int(value)


def classes() -> digits.ClassTable:
    """The fixed class-embedding table (seeded): the model's 'text encoder'."""
    return digits.class_table(CONTEXT_DIM, POOLED_DIM, tokens=CLASS_TOKENS, seed=SEED)


def conditioning(labels: torch.Tensor | list[int]) -> list:
    """ComfyUI CONDITIONING for a batch of classes (``digits.NULL_CLASS`` = unconditional)."""
    context, pooled = classes().lookup(torch.as_tensor(labels))
    return [[context, {"pooled_output": pooled}]]


def load_trained(root: Path, log=print):
    """``(Trained, MODEL)``: the reference model (trained into ``root`` once, cached) loaded by ComfyUI's loader,
    with the pack's folders registered."""
    from . import comfy_bridge as bridge

    bridge.register_folders()
    trained = train(root, log=log)
    log(f"model {trained.path} ({'cached' if trained.cached else 'trained'}; {trained.meta['train_seconds']} s)")
    model, _ = bridge.load_model_file(trained.path)
    return trained, model


def search_setup(classes_: list[int] | None = None, seed: int = 0):
    """``(positive, negative, SearchSpec)`` of the benchmarks' search on this model: ``denoise_error`` (2 seeds ×
    4 states of 10-step trajectories) sampled like the quality metric (cfg 1), on ``classes_`` as one batch of
    prompts (default: all ten) against 'no class'."""
    from .search_jobs import SearchSpec

    labels = list(range(digits.N_CLASSES)) if classes_ is None else list(classes_)
    spec = SearchSpec(objective="denoise_error", seed=seed, n_seeds=2, n_states=8, steps=10,
                      cfg=METRIC_SAMPLING["cfg"], sampler_name=SAMPLING["sampler_name"],
                      scheduler=SAMPLING["scheduler"], width=SAMPLE_PX, height=SAMPLE_PX)
    return conditioning(labels), conditioning([digits.NULL_CLASS] * len(labels)), spec


def cache_dir(root: Path, steps: int) -> Path:
    return Path(root) / f"{VERSION}-s{steps}"


@dataclass(frozen=True)
class Trained:
    path: Path
    meta: dict
    cached: bool = False  # found in the cache (not trained by this call)


def _init(dm: torch.nn.Module, seed: int) -> None:
    """Seeded init: weights N(0, 1/fan_in), norms 1, biases 0; the final layer and adaLN output zero (DiT's
    zero-init, so training starts from 'predict nothing'); the fixed sin-cos position grid."""
    from . import comfy_bridge as bridge

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in dm.named_parameters():
            if p.dim() >= 2:
                fan_in = max(p[0].numel(), 1)
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        for name, p in dm.named_parameters():
            if name.startswith("final_layer.") or "adaLN_modulation" in name:
                p.zero_()
    bridge.init_position_embedding(dm)


def train(root: Path, steps: int | None = None, threads: int | None = None, log=print) -> Trained:
    """Train the reference model into the cache under ``root`` (or return the cached one)."""
    steps = default_steps() if steps is None else int(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (got {steps})")
    folder = cache_dir(root, steps)
    path, meta_path = folder / FILE_NAME, folder / "meta.json"
    if path.is_file() and meta_path.is_file():
        return Trained(path, json.loads(meta_path.read_text()), cached=True)
    from safetensors.torch import save_file

    from . import comfy_bridge as bridge

    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(SEED)
    t0 = time.perf_counter()
    base = bridge.build_diffusion_model(FAMILY, UNET_CONFIG)
    dm = base.diffusion_model
    _init(dm, SEED)
    data = digits.load_digits_data(IMAGE_PX, seed=SEED)
    settings = digits.TrainSettings(steps=steps, seed=SEED)
    every = max(1, steps // 10)

    def progress(step: int, loss: float) -> None:
        if step % every == 0 or step == steps:
            log(f"  step {step}/{steps}  loss {loss:.4f}  {time.perf_counter() - t0:.0f} s")

    result = digits.train_flow(dm, bridge.apply_denoiser(base), data, classes(), settings, progress)
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in dm.state_dict().items()}
    detected = bridge.detected_class(sd)
    if detected != FAMILY:
        raise RuntimeError(f"ComfyUI detects the trained model as {detected!r}, not {FAMILY!r}: the recipe no "
                           "longer matches this ComfyUI's model detection")
    meta = {"version": VERSION, "family": FAMILY, "unet_config": UNET_CONFIG, "train": asdict(settings),
            "train_seconds": round(result.seconds, 1), "total_seconds": round(time.perf_counter() - t0, 1),
            "threads": torch.get_num_threads(), "final_loss": round(result.final_loss, 5),
            "loss_by_tenth": [round(x, 5) for x in result.losses],
            "params": sum(p.numel() for p in dm.parameters()), "image_px": IMAGE_PX, "sample_px": SAMPLE_PX}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_with(path, lambda tmp: save_file(sd, str(tmp), metadata={"qua2sedimo_reference": VERSION}))
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    return Trained(path, meta)


# ------------------------------------------------------------------------------------------------ evaluation
@dataclass(frozen=True)
class Evaluated:
    name: str
    quality: digits.Quality
    avg_bits: float | None
    seconds: float


def decode(model_or_family, latent: torch.Tensor) -> torch.Tensor:
    """A LATENT of the reference model → digits ``[N, 1, 32, 32]`` in [-1, 1]."""
    from . import comfy_bridge as bridge

    return digits.latent_to_image(bridge.latent_to_model_space(model_or_family, latent.float())).clamp(-1, 1)


def sample_digits(model, labels: torch.Tensor, seed: int, chunk: int = 250,
                  sampling: dict | None = None) -> torch.Tensor:
    """Class-conditional samples by ComfyUI's KSampler (``METRIC_SAMPLING`` unless told; the negative is
    'no class')."""
    from . import comfy_bridge as bridge

    out = []
    for i in range(0, len(labels), chunk):
        lab = labels[i:i + chunk]
        lat = bridge.sample_batch(model, conditioning(lab), conditioning([digits.NULL_CLASS] * len(lab)),
                                  latent_shape=(len(lab), 16, SAMPLE_PX // 8, SAMPLE_PX // 8), seed=seed + i,
                                  **(sampling or METRIC_SAMPLING))
        out.append(decode(model, lat))
    return torch.cat(out)


def load_variant(model_path: Path, spec: str):
    """``fp`` (the file), an option (``uaq-4``: that option on every layer) or a quantized file → (MODEL, b̄)."""
    from ..quant import QuantConfig
    from . import comfy_bridge as bridge

    base, _ = bridge.load_model_file(model_path)
    if spec == "fp":
        return base, None
    if spec.endswith(".safetensors"):
        model = bridge.load_quantized(Path(spec))
        cfg = getattr(bridge.diffusion_model(model), "qua2sedimo_config", None)
        return model, (cfg.avg_bits() if cfg is not None else None)
    cfg = QuantConfig.uniform(bridge.diffusion_model(base), spec)
    model, _ = bridge.apply_config(base, cfg)
    return model, cfg.avg_bits()


def evaluate(model_path: Path, variants: dict[str, str], out: Path, samples: int = 500, seed: int = 0,
             grid_columns: int = 20, log=print) -> dict:
    """Sample ``samples`` digits per variant (same seeds), score them, write ``digits-grid.png`` and
    ``digits-quality.json`` into ``out``; return that JSON."""
    from PIL import Image

    if samples < 2:
        raise ValueError("samples must be >= 2 (FID needs a covariance)")
    t0 = time.perf_counter()
    metric = digits.build_metric(digits.load_digits_data(IMAGE_PX, seed=SEED), seed=SEED)
    log(f"  classifier: {metric.real_accuracy:.3f} accuracy on the training split ({time.perf_counter() - t0:.1f} s)")
    labels = digits.sample_labels(samples)
    rows, results = [], {}
    for name, spec in variants.items():
        t1 = time.perf_counter()
        model, bits = load_variant(model_path, spec)
        images = sample_digits(model, labels, seed)
        q = metric.score(images, labels)
        results[name] = {"spec": spec if spec == "fp" or not spec.endswith(".safetensors") else Path(spec).name,
                         "avg_bits": None if bits is None else round(bits, 4), **q.to_dict(),
                         "seconds": round(time.perf_counter() - t1, 1)}
        rows.append(images[:grid_columns])
        log(f"  {name:12s} b̄ {'16' if bits is None else f'{bits:.3f}':>6s}  FID {q.fid:8.3f}  "
            f"accuracy {q.accuracy:.3f}  ({results[name]['seconds']:.0f} s)")
    out.mkdir(parents=True, exist_ok=True)
    pic = Image.fromarray(digits.grid(rows))
    pic = pic.resize((pic.width * 3, pic.height * 3), Image.NEAREST)
    atomic_write_with(out / "digits-grid.png", lambda tmp: pic.save(tmp, format="PNG"))
    summary = {"model": str(model_path), "samples": samples, "seed": seed, "sampling": METRIC_SAMPLING,
               "classifier_real_accuracy": round(metric.real_accuracy, 4), "rows": list(variants),
               "grid": "digits-grid.png", "variants": results, "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_text(out / "digits-quality.json", json.dumps(summary, indent=2) + "\n")
    return summary


# ------------------------------------------------------------------------------------------------ nodes
def _node_classes():
    from comfy_api.latest import io

    from .sockets import CATEGORY

    class DigitConditioning(io.ComfyNode):
        @classmethod
        def define_schema(cls) -> io.Schema:
            return io.Schema(
                node_id="Qua2SeDiMoDigitConditioning", display_name="Qua2SeDiMo Digit Conditioning",
                category=f"{CATEGORY}/reference model",
                description="The reference digits model's 'text encoder': CONDITIONING for one digit class "
                            "(or 'none', the unconditional entry for the negative).",
                inputs=[io.Combo.Input("digit", options=[str(i) for i in range(10)] + ["none"], default="3",
                                       tooltip="the class to draw; 'none' = unconditional (use it as negative)")],
                outputs=[io.Conditioning.Output(tooltip="for the reference digits model (SD3-shaped: 4 tokens "
                                                        "× 4096 + a pooled 2048 vector)")])

        @classmethod
        def execute(cls, digit: str) -> io.NodeOutput:
            return io.NodeOutput(conditioning([digits.NULL_CLASS if digit == "none" else int(digit)]))

    class DigitDecode(io.ComfyNode):
        @classmethod
        def define_schema(cls) -> io.Schema:
            return io.Schema(
                node_id="Qua2SeDiMoDigitDecode", display_name="Qua2SeDiMo Digit Decode",
                category=f"{CATEGORY}/reference model",
                description="The reference digits model's decoder: its latent is the pixels (16 channels = "
                            "4×4 pixel blocks), so a LATENT becomes 32×32 digits, shown at 'scale'×.",
                inputs=[io.Latent.Input("samples", tooltip=f"sampled at width = height = {SAMPLE_PX}"),
                        io.Int.Input("scale", default=4, min=1, max=16, tooltip="nearest-neighbour upscale")],
                outputs=[io.Image.Output(tooltip="the digits, 32·scale pixels wide")])

        @classmethod
        def execute(cls, samples: dict, scale: int) -> io.NodeOutput:
            latent = samples["samples"]
            if latent.dim() != 4 or latent.shape[1] != 16:
                raise ValueError(f"Digit Decode expects the reference model's 16-channel 2-D latents, got "
                                 f"{tuple(latent.shape)}: sample at width = height = {SAMPLE_PX}")
            img = (decode(FAMILY, latent) + 1) / 2
            img = torch.nn.functional.interpolate(img, scale_factor=scale, mode="nearest")
            return io.NodeOutput(img.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).contiguous())

    return [DigitConditioning, DigitDecode]


def node_classes() -> list:
    """The reference model's nodes (Digit Conditioning, Digit Decode), built once."""
    global _NODES
    if _NODES is None:
        _NODES = _node_classes()
    return _NODES


_NODES: list | None = None


# ------------------------------------------------------------------------------------------------ CLI
def _variant(text: str) -> tuple[str, str]:
    name, _, spec = text.partition("=")
    return (name, spec) if spec else (text if not text.endswith(".safetensors") else Path(text).stem, text)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("train", "evaluate") else "train"
    ap = argparse.ArgumentParser(prog="python -m qua2sedimo.nodes.reference_model " + command,
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfy-dir", default=os.environ.get("COMFY_DIR"), help="the ComfyUI folder (default $COMFY_DIR)")
    ap.add_argument("--base-directory", help="ComfyUI --base-directory (option-table cache of the evaluation)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    if command == "train":
        ap.add_argument("--out", type=Path, required=True, help="cache folder (a version/steps subfolder is used)")
        ap.add_argument("--steps", type=int, default=None, help=f"training steps (default ${STEPS_ENV} or "
                                                                f"{DEFAULT_STEPS})")
    else:
        ap.add_argument("--model", type=Path, required=True, help="the trained model file")
        ap.add_argument("--config", action="append", required=True, metavar="[NAME=]SPEC",
                        help="fp | an option on every layer (uaq-4, kmeans_c-3, …) | a quantized .safetensors file")
        ap.add_argument("--out", type=Path, required=True)
        ap.add_argument("--samples", type=int, default=500)
        ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    from .comfy_boot import boot

    boot(args.comfy_dir, cpu=True, base_directory=args.base_directory)
    if args.threads:
        torch.set_num_threads(args.threads)
    if command == "train":
        t = train(args.out, args.steps, args.threads, log=lambda m: print(m, file=sys.stderr))
        print(json.dumps({"path": str(t.path), "cached": t.cached, **t.meta}))
    else:
        from . import comfy_bridge as bridge

        bridge.register_folders()
        variants = dict(_variant(c) for c in args.config)
        summary = evaluate(args.model, variants, args.out, args.samples, args.seed,
                           log=lambda m: print(m, file=sys.stderr))
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
