"""UI-format workflows (``workflows/*.json``, what users drag into ComfyUI) → API-format graphs.

``ui_to_api`` does what the ComfyUI frontend does when it queues a workflow: widget values are matched
to the node's inputs in the order the server's ``/object_info`` gives (required, then optional; a seed
with ``control_after_generate`` carries one extra UI-only value), links become ``[node_id, slot]``.
It refuses anything it cannot map (unknown node type, too few or too many widget values), so a workflow
that drifts from the nodes' schemas fails here rather than in the user's browser.

``to_testbed`` swaps what needs real weights (checkpoint, text encoders, VAE) for the test bed's
tiny model, random-conditioning node and TAESD; the results are the API-format twins under
``tests/workflows_api/``, used by the server tests and by ``make demo``.

Standard library only: imported by the tests and by the demo (``demo.py``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
UI_DIR = REPO / "workflows"
TWIN_DIR = Path(__file__).resolve().parent / "workflows_api"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = {"seed", "noise_seed"}


class WorkflowError(ValueError):
    pass


def _is_widget(spec: list) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def _has_control_widget(name: str, spec: list) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    control = opts.get("control_after_generate")  # the frontend: explicit value, else seeds get one
    return spec[0] == "INT" and bool(control if control is not None else name in SEED_NAMES)


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """The API-format graph the frontend would queue for UI-format ``ui`` (muted nodes dropped)."""
    links = {link[0]: link for link in ui.get("links", [])}
    api: dict[str, dict] = {}
    for node in ui["nodes"]:
        if node.get("mode", 0) == 2:  # muted
            continue
        if node.get("mode", 0) == 4:
            raise WorkflowError(f"node {node['id']} ({node['type']}) is bypassed: not supported by this converter")
        info = object_info.get(node["type"])
        if info is None:
            raise WorkflowError(f"node {node['id']}: type {node['type']!r} is not installed on this server")
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        order = info.get("input_order") or {k: list(v) for k, v in info["input"].items() if k != "hidden"}
        names = list(order.get("required", [])) + list(order.get("optional", []))
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs: dict = {}
        for name in names:
            spec = specs[name]
            if _is_widget(spec):
                if not values:
                    raise WorkflowError(f"node {node['id']} ({node['type']}): no widget value for {name!r}")
                value = values.pop(0)
                if _has_control_widget(name, spec):
                    values.pop(0)
                if name not in linked:
                    inputs[name] = value
            if name in linked:
                link = linked[name]
                inputs[name] = [str(link[1]), link[2]]
        if values:
            raise WorkflowError(f"node {node['id']} ({node['type']}): {len(values)} widget value(s) left over")
        unknown = set(linked) - set(names)
        if unknown:
            raise WorkflowError(f"node {node['id']} ({node['type']}): links to unknown inputs {sorted(unknown)}")
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                "_meta": {"title": node.get("title", node["type"])}}
    return api


def to_testbed(api: dict, *, unet: str, arch: str, latent_px: int, steps: int = 2,
               quantized_file: str | None = None, search_configs: int = 4) -> dict:
    """Swap checkpoint/text-encoder/VAE nodes for the tiny test model, random conditioning and TAESD."""
    out = copy.deepcopy(api)
    vae_of: dict[str, list] = {}
    next_id = max((int(k) for k in api if k.isdigit()), default=0) + 1
    for nid, node in list(out.items()):
        ct, inp = node["class_type"], node["inputs"]
        if ct == "CheckpointLoaderSimple":
            node.update(class_type="UNETLoader", inputs={"unet_name": unet, "weight_dtype": "default"})
            vae_id, next_id = str(next_id), next_id + 1  # a fresh id: never one the graph already uses
            out[vae_id] = {"class_type": "VAELoader", "inputs": {"vae_name": "taesd"},
                           "_meta": {"title": "VAE (TAESD)"}}
            vae_of[nid] = [vae_id, 0]
        elif ct == "CLIPLoader":
            del out[nid]
        elif ct == "VAELoader":
            inp["vae_name"] = "taesd"
        elif ct == "EmptyLatentImage":
            inp.update(width=latent_px * 8, height=latent_px * 8)
        elif ct == "KSampler":
            inp["steps"] = steps
        elif ct == "Qua2SeDiMoLoadQuantized" and quantized_file is not None:
            inp["file"] = quantized_file
        elif ct == "Qua2SeDiMoSearch":  # a small search: a few configs, few states, short trajectories
            inp.update(configs=search_configs, steps=steps, width=latent_px * 8, height=latent_px * 8, n_states=2,
                       n_seeds=1)
    seed = 1
    for node in out.values():
        if node["class_type"] == "CLIPTextEncode":
            node.update(class_type="Qua2SeDiMoTestConditioning", inputs={"arch": arch, "seed": seed})
            seed += 1
        for name, value in node["inputs"].items():
            if isinstance(value, list) and value[0] in vae_of and value[1] == 2:
                node["inputs"][name] = vae_of[value[0]]
    return out


def ui_workflows() -> dict[str, dict]:
    """``{stem: UI-format workflow}`` for every file under ``workflows/``."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(UI_DIR.glob("*.json"))}


def twin(stem: str) -> dict:
    """The checked-in API-format twin of ``workflows/<stem>.json``."""
    path = TWIN_DIR / f"{stem}.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: regenerate with QUA2SEDIMO_WRITE_TWINS=1 make test")
    return json.loads(path.read_text())


# The tiny model the twins are made for (PixArt-Σ, the paper's model family).
TWIN_MODEL = {"unet": "pixart_sigma_d1.safetensors", "arch": "pixart", "latent_px": 48,
              "quantized_file": "qua2sedimo/mixed_00001_q.safetensors"}
