"""The search's evaluations on a Ray cluster: what each worker needs, shipped once, and the executor for it.

The driver (the ComfyUI server or the command line) prepares the search as usual (:func:`.search_jobs.prepare`)
and keeps the journal. :class:`RemoteEvaluate` carries the MODEL as plain parts (:class:`.comfy_bridge.ShippedModel`:
weights moved to the CPU for transport, LoRA patches included), the conditioning, the spec and the FP reference; on a
worker it boots ComfyUI, rebuilds the MODEL with its own patcher, loads the option table (from the shared cache when
the worker is on the same machine, else computed there once) and builds ``evaluate`` with the same code as in-process
(:func:`.search_jobs.build_evaluate`).

Workers need this pack and ComfyUI importable: a local cluster started here gets both paths; on an existing
cluster install the pack (``pip install 'qua2sedimo[ray]'``) and ComfyUI on every node, at the driver's path or
named by ``$QUA2SEDIMO_COMFY_DIR`` on the workers.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import io
import os
import pickle
import sys
import tempfile
from pathlib import Path

import torch

from ..search.ray_executor import RayExecutor, import_ray
from .comfy_boot import boot

CANONICAL = "qua2sedimo"  # the name the pack is imported under on Ray workers


def dumps_on_cpu(obj) -> bytes:
    """cloudpickle ``obj`` with every tensor on the CPU (a worker may have another device, or none); ComfyUI's
    BaseModel and model-config objects travel as their class and attributes (:func:`.comfy_bridge.shipping_state`)."""
    from ray import cloudpickle

    from .comfy_bridge import shipping_state

    class _CpuPickler(cloudpickle.CloudPickler):
        def reducer_override(self, o):
            if isinstance(o, torch.Tensor) and o.device.type != "cpu":
                cpu = o.detach().to("cpu")
                if isinstance(o, torch.nn.Parameter):
                    return torch.nn.Parameter, (cpu, o.requires_grad)
                return _identity, (cpu,)
            if not isinstance(o, type):
                state = shipping_state(o)
                if state is not None:
                    return _with_state, (type(o), state)
            return super().reducer_override(o)

    buf = io.BytesIO()
    _CpuPickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


def _identity(x):
    return x


def _with_state(cls: type, state: dict):
    """An instance of ``cls`` with ``state`` as its attributes (no ``__init__``, no ``__setstate__`` lookup)."""
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


class RemoteEvaluate:
    """Picklable ``factory() → evaluate`` for Ray workers (see the module docstring). Built from the pack imported
    as ``qua2sedimo`` (:func:`ray_executor`), so the classes it ships (itself, ``ShippedModel``) unpickle by that
    name even when the driver loaded the pack under another module name."""

    def __init__(self, model, positive, negative, spec: dict, reference: dict, *, fingerprint: str, comfy_dir: str,
                 cpu: bool, cache_dir: str):
        from .comfy_bridge import ship_model

        self.blob = dumps_on_cpu((ship_model(model), positive, negative, reference))
        self.spec, self.fingerprint = spec, fingerprint
        self.comfy_dir, self.cpu, self.cache_dir = comfy_dir, cpu, cache_dir

    def __call__(self):
        boot(os.environ.get("QUA2SEDIMO_COMFY_DIR") or self.comfy_dir, cpu=self.cpu)
        from ..quant import quantizable_layers
        from ..quant.layer_table import layers_fingerprint
        from ..search.objectives import TrajectoryStates
        from . import comfy_bridge as bridge
        from . import search_jobs

        spec = search_jobs.SearchSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.spec.items()})
        shipped, positive, negative, reference = pickle.loads(self.blob)
        model = bridge.rebuild_model(shipped)
        states = None
        if reference.get("states") is not None:
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "states.safetensors").write_bytes(reference["states"])
                states = TrajectoryStates.load(Path(tmp) / "states.safetensors")
        reference = search_jobs.Reference(states=states, fp_latents=reference.get("fp_latents"))
        dm = bridge.diffusion_model(model)
        found = layers_fingerprint(quantizable_layers(dm))
        if found != self.fingerprint:
            raise ValueError(f"the model rebuilt on this Ray worker has layer fingerprint {found}, the driver's is "
                             f"{self.fingerprint}: use the same ComfyUI version on every node")
        cache = Path(self.cache_dir)
        if not _writable_dir(cache):
            cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qua2sedimo" / "option-tables"
        base, table = search_jobs.search_copy_and_table(model, spec.options, cache)
        evaluate, *_ = search_jobs.build_evaluate(model, positive, negative, spec, table, reference, base)
        return evaluate


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
        return os.access(path, os.W_OK)
    except OSError:
        return False


def _canonical_pack(link_dir: Path) -> tuple[str, str]:
    """This pack importable as ``qua2sedimo`` (the name Ray workers unpickle): ComfyUI loads a custom node under
    its folder's path, which no other process can import. Returns ``(module prefix, folder for PYTHONPATH)``."""
    top = __package__.split(".")[0]
    pack = Path(sys.modules[top].__file__).resolve().parent
    if top == CANONICAL:
        return CANONICAL, str(pack.parent)
    spec = importlib.util.find_spec(CANONICAL)
    if spec is not None and spec.origin and Path(spec.origin).resolve().parent == pack:
        return CANONICAL, str(pack.parent)  # installed (pip install -e) from this very folder
    loaded = sys.modules.get(CANONICAL)
    if loaded is not None and Path(loaded.__file__).resolve().parent != pack:
        raise RuntimeError(f"another qua2sedimo package ({Path(loaded.__file__).parent}) is loaded besides this custom "
                           f"node ({pack}); Ray workers need one: uninstall it, or `pip install -e {pack}`")
    link = link_dir / CANONICAL
    if not (link.is_symlink() and link.resolve() == pack):
        link_dir.mkdir(parents=True, exist_ok=True)
        tmp = link_dir / f".{CANONICAL}-{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(pack, target_is_directory=True)
        os.replace(tmp, link)
    if str(link_dir) not in sys.path:
        sys.path.insert(0, str(link_dir))
    return CANONICAL, str(link_dir)


def ray_executor(ctx, *, address: str | None = None, workers: int | None = None, cpus_per_worker: float = 1.0,
                 init_kwargs: dict | None = None) -> RayExecutor:
    """A :class:`RayExecutor` for a prepared search: one actor per GPU when ComfyUI runs on a GPU, else one per
    ``cpus_per_worker`` CPUs; ``address`` ``None``/``""`` starts a local cluster (or reuses the one joined)."""
    from . import comfy_bridge as bridge

    import_ray()
    cpu = bridge.runs_on_cpu()
    reference: dict = {"fp_latents": ctx.reference.fp_latents, "states": None}
    if ctx.reference.states is not None:
        with tempfile.TemporaryDirectory() as tmp:
            ctx.reference.states.save(Path(tmp) / "states.safetensors")
            reference["states"] = (Path(tmp) / "states.safetensors").read_bytes()
    prefix, path = _canonical_pack(bridge.cache_dir().parent / "ray-import")
    remote = importlib.import_module(f"{prefix}.nodes.search_remote")
    factory = remote.RemoteEvaluate(
        ctx.model, ctx.positive, ctx.negative, dataclasses.asdict(ctx.spec), reference,
        fingerprint=ctx.journal_kwargs["model_fingerprint"], comfy_dir=str(bridge.comfy_root()), cpu=cpu,
        cache_dir=str(bridge.cache_dir()))
    kw = dict(init_kwargs or {})
    if not address:  # a local cluster: its workers import this pack and ComfyUI from the driver's paths
        env = dict(kw.get("runtime_env", {}).get("env_vars", {}))
        paths = [path, env.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        env.setdefault("QUA2SEDIMO_COMFY_DIR", str(bridge.comfy_root()))
        kw["runtime_env"] = {**kw.get("runtime_env", {}), "env_vars": env}
    executor_cls = importlib.import_module(f"{prefix}.search.ray_executor").RayExecutor
    return executor_cls(factory, address=address or None, workers=workers, cpus_per_worker=cpus_per_worker,
                        gpus_per_worker=0.0 if cpu else 1.0, init_kwargs=kw)
