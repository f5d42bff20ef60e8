"""diffusers denoisers through the library API (the one module that imports ``diffusers``; ``pip install
'qua2sedimo[diffusers]'``).

* **Apply**: ``quantize_(pipe.transformer or pipe.unet, config)`` needs nothing from here: a diffusers denoiser is
  a plain ``nn.Module`` and ``QuantConfig`` names its layers as diffusers does (``transformer_blocks.0.attn1.to_q``).
* **File**: :func:`save_quantized` writes our quantized safetensors format plus the model's class and diffusers
  config; :func:`load_quantized` builds the model from that config with its parameters on the meta device and
  fills the packed layers and dense tensors from the file (no dense copy of a quantized layer ever exists).
* **Search**: :func:`prepare_search` records FP trajectory states with a diffusers scheduler and the model's own
  conditioning (forward kwargs such as ``class_labels`` or ``encoder_hidden_states``), builds the option table
  and a :class:`~..quant.swap.ConfigSwapper`; :func:`run_diffusers_search` journals random configs
  (``search.runner.run_search``); :func:`analyse` traces the layer graph, trains the predictor, scores units,
  builds knapsack/paper-rule configs, measures them and returns the report. ``python -m qua2sedimo search
  --diffusers <folder>`` runs the same code.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..quant.api import quantize_
from ..quant.atomic import atomic_write_text
from ..quant.config import QuantConfig
from ..quant.format import layer_entries, load_quantized_file, save_quantized_file
from ..quant.layer_table import layers_fingerprint, quantizable_layers
from ..quant.layers import QuantConv2d, QuantLinear
from ..quant.options import FP_OPTION
from ..quant.quantizers import QUANTIZER_VERSION
from ..quant.swap import ConfigSwapper
from ..quant.table import OptionTable, option_table
from .construct import Construction, evaluate_constructions, paper_rule
from .graph import LayerGraph, trace_graph
from .journal import Journal, Record, conditioning_digest
from .journal_file import JournalFile
from .marginal import predicted_knapsack
from .objectives import DenoiseError, StateRecorder, TrajectoryStates, states_cache_key
from .predictor import PredictorConfig
from .quality import train_and_compare
from .report import STABLE_CONFIGS, Report, build_report, report_dumps
from .runner import SearchProgress, SearchResult, config_size, run_search
from .sampling import ConfigSampler, config_key, option_set
from .scores import UnitScore, unit_scores

__all__ = [  # QuantConfig and quantize_ re-exported: one import for the diffusers user
    "DiffusersAnalysis", "DiffusersSearch", "DiffusersSpec", "QuantConfig", "analyse", "denoise_fn", "denoiser",
    "load_folder", "load_quantized", "prepare_search", "quantize_", "record_states", "run_diffusers_search",
    "save_quantized", "search_folder",
]

INSTALL_HINT = "install the optional extra: pip install 'qua2sedimo[diffusers]'"
PRIMARY = "denoise_error"


def require_diffusers():
    """The ``diffusers`` module, or an ImportError that says how to get it."""
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(f"diffusers is not installed ({e}); {INSTALL_HINT}") from None
    return diffusers


def denoiser(obj: Any) -> nn.Module:
    """The denoiser of a diffusers pipeline (``pipe.transformer`` or ``pipe.unet``), or the model itself."""
    if isinstance(obj, nn.Module):
        return obj
    for attr in ("transformer", "unet"):
        model = getattr(obj, attr, None)
        if isinstance(model, nn.Module):
            return model
    raise ValueError(f"{type(obj).__name__} is neither a diffusers denoiser nor a pipeline with a 'transformer' or "
                     "'unet': pass pipe.transformer / pipe.unet")


def _diffusers_config(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "from_config"):
        raise ValueError(f"{type(model).__name__} is not a diffusers model (no config/from_config): save_quantized "
                         "is for diffusers denoisers; ComfyUI models use the Save Quantized node")
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


# ================================================================================================== file
def _buffer_names(model: nn.Module) -> list[str]:
    """Non-persistent buffers (not in ``state_dict``, e.g. PatchEmbed's ``pos_embed``): stored too, so loading
    never has to recompute them."""
    persistent = set(model.state_dict())
    return [n for n, _ in model.named_buffers() if n not in persistent]


def save_quantized(model: Any, path: str | os.PathLike, config: QuantConfig | None = None) -> dict:
    """Write a quantized diffusers denoiser (``quantize_`` applied) to ``path`` atomically; returns the header."""
    model = denoiser(model)
    try:
        layers = layer_entries(model)
    except ValueError:
        raise ValueError("this model holds no quantized layers: run quantize_(model, config) first") from None
    config = config if config is not None else getattr(model, "qua2sedimo_config", None)
    buffers = _buffer_names(model)
    named_buffers = dict(model.named_buffers())
    tensors = {**model.state_dict(), **{n: named_buffers[n] for n in buffers}}
    header = {
        "layers": layers,
        "model_class": type(model).__name__,
        "diffusers": {"class": type(model).__name__, "config": _diffusers_config(model), "buffers": buffers},
        "config": config.to_dict() if config is not None else None,
        "source_fingerprint": config.fingerprint if config is not None else None,
    }
    save_quantized_file(path, tensors, header)
    return header


def _quant_layer(dense: nn.Module, packed: torch.Tensor, bias: torch.Tensor | None, act_bits: int) -> nn.Module:
    """The quantized layer standing in for ``dense`` (built on the meta device, then given the file's tensors)."""
    p = packed.packing
    if isinstance(dense, nn.Conv2d):
        mod = QuantConv2d(dense.in_channels, dense.out_channels, dense.kernel_size, p.method, p.bits, dense.stride,
                          dense.padding, dense.dilation, dense.groups, bias is not None, dense.padding_mode, p.dtype,
                          p.group_size, act_bits, device="meta")
    elif isinstance(dense, nn.Linear):
        mod = QuantLinear(dense.in_features, dense.out_features, p.method, p.bits, bias is not None, p.dtype,
                          p.group_size, act_bits, device="meta")
    else:
        raise ValueError(f"cannot load a quantized {type(dense).__name__}: only Linear and Conv2d layers")
    if mod.packing != p:
        raise ValueError(f"the file's packed weight {p.option} {list(p.shape)} does not fit the model's layer")
    mod.weight = nn.Parameter(packed, requires_grad=False)
    mod.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    return mod


def load_quantized(path: str | os.PathLike, device: torch.device | str | None = None) -> nn.Module:
    """A diffusers denoiser from a file written by :func:`save_quantized`: built from its stored config with every
    parameter on the meta device, then filled from the file (packed layers hold the file's packed bytes)."""
    diffusers = require_diffusers()
    path = Path(path)
    tensors, header = load_quantized_file(path)
    info = header.get("diffusers")
    if not isinstance(info, dict) or not isinstance(info.get("config"), dict):
        raise ValueError(f"{path.name!r} was not saved from a diffusers model (no 'diffusers' header): load it with "
                         "the Load Quantized node in ComfyUI")
    cls = getattr(diffusers, str(info.get("class")), None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and hasattr(cls, "from_config")):
        raise ValueError(f"{path.name!r}: diffusers {diffusers.__version__} has no model class {info.get('class')!r}"
                         " (update diffusers)")
    with torch.device("meta"):
        model = cls.from_config(info["config"])
    for name, layer in header["layers"].items():
        packed = tensors.pop(f"{name}.weight", None)
        if layer.get("option", FP_OPTION) == FP_OPTION:
            if packed is not None:
                tensors[f"{name}.weight"] = packed
            continue
        parent_name, _, attr = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
            getattr(parent, attr)
        except AttributeError:
            raise ValueError(f"{path.name!r}: quantized layer {name!r} is not a layer of {cls.__name__} built from the "
                             "file's config (file edited, or written by another diffusers version)") from None
        bias = tensors.pop(f"{name}.bias", None)
        setattr(parent, attr, _quant_layer(getattr(parent, attr), packed, bias, int(layer.get("act_bits", 16))))
    buffers = {n: tensors.pop(n) for n in info.get("buffers", [])}
    result = model.load_state_dict(tensors, strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(f"{path.name!r}: {len(result.unexpected_keys)} tensor(s) the model does not have, e.g. "
                         f"{result.unexpected_keys[0]!r} (saved from another diffusers version or edited)")
    for name, value in buffers.items():
        owner, _, attr = name.rpartition(".")
        (model.get_submodule(owner) if owner else model)._buffers[attr] = value
    empty = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        raise ValueError(f"{path.name!r}: {len(empty)} tensor(s) of the model are not in the file, e.g. {empty[0]!r}"
                         " (file written by another diffusers version: save it again)")
    if header.get("config"):
        model.qua2sedimo_config = QuantConfig.from_dict(header["config"], model=model, source=path.name)
    model.eval()
    return model.to(device) if device is not None else model


# ================================================================================================ search
@dataclass(frozen=True)
class DiffusersSpec:
    """What a diffusers search measures; everything here except the budget keys its journal run."""

    seed: int = 0  # sampler stream and sampling seeds
    n_seeds: int = 2  # FP trajectories recorded
    n_states: int = 8  # trajectory states kept in total
    steps: int = 10
    guidance_scale: float = 1.0  # > 1 needs negative conditioning (DiT: the null class)
    latent_size: int | None = None  # default: the model config's sample_size
    options: tuple[str, ...] = field(default_factory=lambda: option_set())
    keep: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("n_seeds", "n_states", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


def denoise_fn(model: nn.Module) -> Callable[..., torch.Tensor]:
    """``(x, t, **cond) → out``: one call of a diffusers denoiser (the timestep by keyword: PixArt's second
    positional argument is ``encoder_hidden_states``)."""

    def call(x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        return model(x, timestep=t, **cond, return_dict=False)[0]

    return call


def _check_conditioning(model: nn.Module, cond: Mapping[str, Any], what: str) -> dict[str, Any]:
    params = inspect.signature(model.forward).parameters
    unknown = [k for k in cond if k not in params]
    if unknown:
        accepted = [k for k in params if k not in ("self", "hidden_states", "sample", "timestep", "return_dict")]
        raise ValueError(f"{what} conditioning has {unknown[0]!r}, which {type(model).__name__}.forward does not take"
                         f" (it takes {', '.join(accepted)})")
    cond = dict(cond)
    if "added_cond_kwargs" in params and "added_cond_kwargs" not in cond and hasattr(model, "adaln_single"):
        cond["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}  # PixArt without size conditioning
    return cond


def _batch(cond: Mapping[str, Any]) -> int:
    sizes = {int(v.shape[0]) for v in cond.values() if isinstance(v, torch.Tensor) and v.dim() >= 1}
    if len(sizes) > 1:
        raise ValueError(f"conditioning tensors have different batch sizes {sorted(sizes)}: give one row per sample")
    return sizes.pop() if sizes else 1


def record_states(model: nn.Module, scheduler: Any, conditioning: Mapping[str, Any], spec: DiffusersSpec,
                  negative: Mapping[str, Any] | None = None) -> TrajectoryStates:
    """Sample ``spec.n_seeds`` FP trajectories with ``scheduler`` and keep ``spec.n_states`` denoiser calls of
    the conditional branch (inputs, conditioning, FP outputs). A learned-variance output (DiT: 2× the input
    channels) is split; its first half is the noise prediction the scheduler steps with."""
    if spec.guidance_scale != 1.0 and negative is None:
        raise ValueError(f"guidance_scale {spec.guidance_scale} needs negative conditioning (DiT: class_labels = "
                         "num_classes, the null class; text models: the empty prompt's embeddings)")
    cfg = model.config
    size = spec.latent_size or cfg.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    channels = cfg.in_channels
    batch = _batch(conditioning)
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    device, dtype = (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
    fn = denoise_fn(model)
    rec = StateRecorder(fn, per_trajectory=max(1, -(-spec.n_states // spec.n_seeds)))
    with torch.inference_mode():
        for i in range(spec.n_seeds):
            rec.new_trajectory()
            g = torch.Generator("cpu").manual_seed(spec.seed + i)
            latents = torch.randn((batch, channels, h, w), generator=g).to(device, dtype) * scheduler.init_noise_sigma
            scheduler.set_timesteps(spec.steps)
            for t in scheduler.timesteps:
                x = scheduler.scale_model_input(latents, t)
                tt = t.reshape(1).expand(batch).to(device)
                out = rec(x, tt, **conditioning)
                if out.shape[1] == 2 * channels:
                    out = out[:, :channels]
                if negative is not None and spec.guidance_scale != 1.0:
                    un = fn(x, tt, **negative)
                    un = un[:, :channels] if un.shape[1] == 2 * channels else un
                    out = un + spec.guidance_scale * (out - un)
                latents = scheduler.step(out, t, latents).prev_sample
    return rec.states(meta={"spec": _spec_json(spec)})


def _spec_json(spec: DiffusersSpec) -> dict:
    d = asdict(spec)
    d["options"], d["keep"] = list(spec.options), list(spec.keep)
    return d


@dataclass
class DiffusersSearch:
    """Everything an evaluation needs, prepared once per model, conditioning and spec by :func:`prepare_search`."""

    model: nn.Module
    layers: list
    table: OptionTable
    swapper: ConfigSwapper
    states: TrajectoryStates
    metric: DenoiseError
    sampler: ConfigSampler
    journal_kwargs: dict
    device: torch.device | None = None
    primary: str = PRIMARY

    def evaluate(self, options: Mapping[str, str]) -> dict:
        """Swap ``options`` into the model and measure the denoise error (the model keeps them until
        :meth:`restore`)."""
        self.swapper.apply(dict(options))
        with torch.inference_mode():
            return self.metric(denoise_fn(self.model))

    def forward_once(self) -> torch.Tensor:
        st = self.states[0]

        def move(v: Any) -> Any:
            if isinstance(v, torch.Tensor):
                return v.to(self.device) if self.device is not None else v
            if isinstance(v, dict):
                return {k: move(x) for k, x in v.items()}
            return type(v)(move(x) for x in v) if isinstance(v, list | tuple) else v

        return denoise_fn(self.model)(move(st.x), move(st.t), **move(st.cond))

    def restore(self) -> None:
        """Put the model's own dense layers back."""
        self.swapper.restore()

    def open_journal(self, path: str | os.PathLike | JournalFile, **kwargs: Any) -> Journal:
        return Journal.open(path, **self.journal_kwargs, **kwargs)


def prepare_search(model: Any, scheduler: Any, conditioning: Mapping[str, Any], *, spec: DiffusersSpec | None = None,
                   negative: Mapping[str, Any] | None = None, cache_dir: str | os.PathLike | None = None,
                   progress: Callable[[int, int, str], None] | None = None) -> DiffusersSearch:
    """Record the FP states, build the option table (cached in ``cache_dir`` when given) and the swapper.

    ``conditioning``: the denoiser's forward kwargs for the conditional branch, batch first (DiT:
    ``{"class_labels": tensor([207, 360])}``; PixArt/SD: ``{"encoder_hidden_states": …}``).
    """
    spec = spec or DiffusersSpec()
    model = denoiser(model)
    layers = quantizable_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no quantizable Linear/Conv2d layers: nothing to search")
    conditioning = _check_conditioning(model, conditioning, "the")
    negative = None if negative is None else _check_conditioning(model, negative, "the negative")
    fingerprint = layers_fingerprint(layers)
    settings = {**_spec_json(spec), "conditioning": conditioning_digest(conditioning, negative),
                "scheduler": type(scheduler).__name__, "quantizer": QUANTIZER_VERSION, "host": "diffusers"}
    states = None
    cache = None
    if cache_dir is not None:
        cache = Path(cache_dir) / f"states-{states_cache_key(fingerprint, settings)}.safetensors"
        states = TrajectoryStates.load(cache) if cache.exists() else None
    if states is None:
        states = record_states(model, scheduler, conditioning, spec, negative)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            states.save(cache)
    table = option_table(model, spec.options, cache_dir=cache_dir, progress=progress)
    swapper = ConfigSwapper(model, table, check_weights=False)
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = param.device if param is not None else None
    metric = DenoiseError(states, device=device)
    sampler = ConfigSampler([la.name for la in layers], seed=spec.seed, options=spec.options, keep=spec.keep)
    journal_kwargs = dict(model_fingerprint=fingerprint, objective=PRIMARY,
                          settings={**settings, "sampler": sampler.settings()},
                          layer_names=[la.name for la in layers])
    return DiffusersSearch(model, layers, table, swapper, states, metric, sampler, journal_kwargs, device)


@contextlib.contextmanager
def _restored(ctx: DiffusersSearch) -> Iterator[None]:
    try:
        yield
    finally:
        ctx.restore()


def run_diffusers_search(ctx: DiffusersSearch, journal: str | os.PathLike | JournalFile, *,
                         max_configs: int | None = None, max_seconds: float | None = None,
                         progress: Callable[[SearchProgress], None] | None = None) -> SearchResult:
    """Evaluate random configs into ``journal`` (created or resumed); the model is restored afterwards."""
    with _restored(ctx), ctx.open_journal(journal) as j:
        return run_search(j, ctx.sampler, ctx.evaluate, ctx.layers, primary=ctx.primary, max_configs=max_configs,
                          max_seconds=max_seconds, progress=progress)


@dataclass
class DiffusersAnalysis:
    """What :func:`analyse` produced: the traced graph, unit scores, constructions (as configs too), the report."""

    graph: LayerGraph
    scores: list[UnitScore]
    constructions: list[Construction]
    configs: dict[str, QuantConfig]
    records: list[Record]
    report: Report
    seconds: dict[str, float]


def analyse(ctx: DiffusersSearch, journal: str | os.PathLike, *, targets: Sequence[float] = (3.5, 4.0),
            seed: int = 0, folds: int = 5, epochs: int = 300) -> DiffusersAnalysis:
    """Graph, predictor (GNN + ridge baseline), unit scores, predicted knapsack at each target and the paper rule,
    measured with the real objective into the journal (with uniform UAQ-4/UAQ-3 baselines), and the report."""
    with ctx.open_journal(journal, create=False) as j:
        random = j.records(source="random")
    if len(random) < 2 * folds:
        raise ValueError(f"the journal holds {len(random)} evaluated configs; the predictor needs at least "
                         f"{2 * folds} ({STABLE_CONFIGS} for a stable ranking): run the search longer")
    seconds: dict[str, float] = {}
    t = time.perf_counter()

    def step(name: str) -> None:
        nonlocal t
        seconds[name] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()

    with _restored(ctx):
        ctx.restore()
        graph = trace_graph(ctx.model, ctx.forward_once)
        step("graph")
        trained = train_and_compare(graph, ctx.table, random, PredictorConfig(folds=folds, seed=seed, epochs=epochs))
        ensemble, quality = trained.ensemble, trained.quality
        step("predictor")
        scores = unit_scores(ensemble, graph, level="op") + unit_scores(ensemble, graph, level="block",
                                                                        max_variants=1296)
        op_scores = [s for s in scores if s.level == "op"]
        constructions = [predicted_knapsack(ensemble, op_scores, ctx.layers, target_bits=tb) for tb in targets]
        constructions.append(paper_rule(op_scores, ctx.layers))
        step("construct")
        with ctx.open_journal(journal) as j:
            evaluate_constructions(j, constructions, ctx.evaluate, primary=ctx.primary)
            for option in ("uaq-4", "uaq-3"):
                options = {la.name: option for la in ctx.layers}
                if not j.has(config_key(options)):
                    t0 = time.perf_counter()
                    values = ctx.evaluate(options)
                    bits, nbytes = config_size(ctx.layers, options)
                    j.add(options, avg_bits=bits, nbytes=nbytes, values=values, primary=values[ctx.primary],
                          timings={"evaluate": time.perf_counter() - t0}, source="uniform")
            records = j.records()
        step("measure")
    op_types = {la.name: la.op_type for la in graph.layers}
    report = build_report(unit_scores=scores, records=records, constructions=constructions, predictor_quality=quality,
                          op_types=op_types, objective=ctx.primary, targets=targets, evaluated=len(random))
    step("report")
    configs = {c.label: c.to_config(ctx.layers) for c in constructions}
    return DiffusersAnalysis(graph, scores, constructions, configs, records, report, seconds)


# ======================================================================================== local folders
def load_folder(folder: str | os.PathLike, *, dtype: torch.dtype | None = None) -> tuple[nn.Module, Any]:
    """``(denoiser, scheduler)`` from a local diffusers folder: a pipeline folder (``transformer/`` or ``unet/``,
    ``scheduler/``) or a model folder (``config.json``; DDIM is the scheduler then). Nothing is downloaded."""
    diffusers = require_diffusers()
    folder = Path(folder)
    sub = next((s for s in ("transformer", "unet") if (folder / s / "config.json").is_file()), None)
    model_dir = folder / sub if sub else folder
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{str(folder)!r} is not a diffusers folder: expected transformer/config.json, "
                         "unet/config.json or config.json")
    try:
        name = json.loads((model_dir / "config.json").read_text())["_class_name"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{str(model_dir / 'config.json')!r} has no readable '_class_name' ({e!s})") from None
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and hasattr(cls, "from_pretrained")):
        raise ValueError(f"diffusers {diffusers.__version__} has no model class {name!r} (update diffusers)")
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    # safetensors only: a pickled .bin checkpoint is never loaded (torch.load of a user's file runs its code)
    model = cls.from_pretrained(str(model_dir), local_files_only=True, use_safetensors=True, **kwargs).eval()
    sched_dir = folder / "scheduler"
    if (sched_dir / "scheduler_config.json").is_file():
        sname = json.loads((sched_dir / "scheduler_config.json").read_text()).get("_class_name", "DDIMScheduler")
        scheduler_cls = getattr(diffusers, str(sname), None)
        if not (isinstance(scheduler_cls, type) and issubclass(scheduler_cls, diffusers.SchedulerMixin)):
            raise ValueError(f"{str(sched_dir / 'scheduler_config.json')!r}: {sname!r} is not a diffusers scheduler "
                             f"of diffusers {diffusers.__version__}")
        scheduler = scheduler_cls.from_pretrained(str(sched_dir), local_files_only=True)
    else:
        scheduler = diffusers.DDIMScheduler()
    return model, scheduler


def _float_list(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers, got {text!r}") from None


def folder_conditioning(model: nn.Module, *, conditioning: str | os.PathLike | None = None,
                        class_labels: str | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(conditioning, negative)`` for a local model: class ids (DiT; the negative is the null class) or a
    safetensors file of forward kwargs (``negative.<kwarg>`` for the unconditional branch)."""
    if (conditioning is None) == (class_labels is None):
        raise ValueError("give the model's conditioning: --class-labels (class-conditional DiT) or --conditioning "
                         "(a safetensors file of forward kwargs such as 'encoder_hidden_states')")
    if class_labels is not None:
        try:
            labels = [int(v) for v in str(class_labels).split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"--class-labels must be comma-separated integers, got {class_labels!r}") from None
        n = getattr(model.config, "num_embeds_ada_norm", None)
        if not labels or n is None or any(not 0 <= v < n for v in labels):
            raise ValueError(f"class labels {labels} do not fit {type(model).__name__} (classes 0..{n}; only "
                             "class-conditional models such as DiT take --class-labels)")
        return {"class_labels": torch.tensor(labels)}, {"class_labels": torch.full((len(labels),), n)}
    from safetensors.torch import load_file

    tensors = load_file(str(conditioning))
    pos = {k: v for k, v in tensors.items() if not k.startswith("negative.")}
    neg = {k.removeprefix("negative."): v for k, v in tensors.items() if k.startswith("negative.")}
    return pos, (neg or None)


def search_folder(folder: str | os.PathLike, journal: str | os.PathLike, *, conditioning: str | None = None,
                  class_labels: str | None = None, configs: int = 100, minutes: float = 0, seed: int = 0,
                  steps: int = 10, n_states: int = 8, n_seeds: int = 2, cfg: float = 1.0,
                  latent_size: int | None = None, report_dir: str | os.PathLike | None = None,
                  targets: str | Sequence[float] = (3.5, 4.0), export_jsonl: str | None = None,
                  cache_dir: str | os.PathLike | None = None, log: Callable[[str], None] = lambda m: None) -> dict:
    """The command line's ``--diffusers <folder>``: search (resumable journal), then optionally the report and the
    constructed configs in ``report_dir``; returns a JSON-able summary. The journal's writer lock is taken first: a
    journal another search writes fails at once (:class:`JournalLocked`), before loading and preparing."""
    journal = Path(journal).resolve()
    journal.parent.mkdir(parents=True, exist_ok=True)
    journal_file = JournalFile(journal)
    journal_file.acquire_lock()
    try:
        return _search_folder(folder, journal_file, conditioning=conditioning, class_labels=class_labels,
                              configs=configs, minutes=minutes, seed=seed, steps=steps, n_states=n_states,
                              n_seeds=n_seeds, cfg=cfg, latent_size=latent_size, report_dir=report_dir,
                              targets=targets, export_jsonl=export_jsonl, cache_dir=cache_dir, log=log)
    finally:
        journal_file.release_lock()  # idempotent: the journal took it over and released it when it closed


def _search_folder(folder: str | os.PathLike, journal_file: JournalFile, *, conditioning: str | None,
                   class_labels: str | None, configs: int, minutes: float, seed: int, steps: int, n_states: int,
                   n_seeds: int, cfg: float, latent_size: int | None, report_dir: str | os.PathLike | None,
                   targets: str | Sequence[float], export_jsonl: str | None, cache_dir: str | os.PathLike | None,
                   log: Callable[[str], None]) -> dict:
    journal = journal_file.path
    model, scheduler = load_folder(folder)
    pos, neg = folder_conditioning(model, conditioning=conditioning, class_labels=class_labels)
    guidance = cfg if neg is not None else 1.0
    if neg is None and cfg != 1.0:
        log(f"no negative conditioning: states are recorded without CFG (cfg {cfg} ignored)")
    spec = DiffusersSpec(seed=seed, n_seeds=n_seeds, n_states=n_states, steps=steps, guidance_scale=guidance,
                         latent_size=latent_size)
    cache = Path(cache_dir) if cache_dir is not None else journal.parent / "qua2sedimo-cache"
    ctx = prepare_search(model, scheduler, pos, spec=spec, negative=neg if guidance != 1.0 else None,
                         cache_dir=cache, progress=lambda d, t, label="": log(f"option table {d}/{t} {label}"))
    res = run_diffusers_search(ctx, journal_file, max_configs=configs, max_seconds=minutes * 60 or None,
                               progress=lambda p: log(p.text()))
    summary: dict[str, Any] = {
        "status": res.status, "done": res.done, "new": res.new, "seconds": round(res.seconds, 2),
        "journal": str(journal), "objective": PRIMARY, "model": type(model).__name__,
        "best": {"value": res.best.primary, "avg_bits": res.best.avg_bits, "idx": res.best.idx} if res.best else None,
    }
    if report_dir is not None:
        tb = _float_list(targets, "--target-bits") if isinstance(targets, str) else list(targets)
        analysis = analyse(ctx, journal, targets=tb, seed=seed)
        out = Path(report_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "report.json", report_dumps(analysis.report))
        written = []
        for label, qc in analysis.configs.items():
            path = out / f"config-{''.join(c if c.isalnum() or c in '.-' else '_' for c in label)}.json"
            qc.save(path)
            written.append(str(path))
        summary["report"] = {"json": str(out / "report.json"), "configs": written}
    if export_jsonl:
        with ctx.open_journal(journal, readonly=True) as j:
            summary["jsonl"] = str(j.export_jsonl(export_jsonl))
    return summary
