"""`make demo`: the main job end to end, through a real ComfyUI server, on a tiny PixArt-Σ.

Run as ``python -m qua2sedimo.demo --out demo-output`` with ``COMFY_DIR`` pointing at a ComfyUI tree
(``make demo`` installs one, cached). Steps:

1. a ComfyUI base directory under ``<out>/comfyui`` with this pack (and the test bed's random-conditioning
   node, since the tiny model has no text encoder) in ``custom_nodes/``, a tiny random-weight PixArt-Σ and
   a random TAESD (built by ComfyUI's own classes, cached; nothing is downloaded);
2. ``main.py --cpu`` on loopback; the example workflows of ``workflows/`` are queued over HTTP as their
   API twins: uniform W4 → sample, mixed 3/4-bit config → save quantized, load quantized → sample;
3. ``<out>/`` receives the quantized safetensors, the sample images, the config and ``summary.json``.

The test-bed helpers (server control, tiny models, workflow conversion) live in ``tests/``; the demo is a
repository job, not part of the installed package's API.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from .quant.atomic import atomic_write_text

REPO = Path(__file__).resolve().parent
TESTS = REPO / "tests"
DEMO_MODEL = "pixart_sigma_d1"
STEMS = {"uniform": "1. Quantize W4 and sample", "mixed": "2. Mixed bits and save",
         "load": "3. Sample a quantized file", "search": "5. Search in background",
         "full": "6. Search report and build"}
SEARCH_CONFIGS = 12


def _helpers():
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import comfy_host
    import tiny_models
    import workflow_api

    return comfy_host, tiny_models, workflow_api


def _ui(entry: dict, key: str) -> list:
    return [v for out in (entry.get("outputs") or {}).values() for v in out.get(key, [])]


def prepare_base(out: Path) -> Path:
    """``<out>/comfyui``: models (symlinked from the tiny-model cache), output/, custom_nodes/."""
    comfy_host, tiny_models, _ = _helpers()
    base = comfy_host.make_base_dir(out / "comfyui")
    for name, target in (("qua2sedimo", REPO), ("qua2sedimo_testnodes", TESTS / "testnodes")):
        link = base / "custom_nodes" / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target, target_is_directory=True)
    tiny_models.ensure_models(base / "models", [DEMO_MODEL])
    return base


def run_workflows(server, out: Path) -> dict:
    """Queue the three example workflows; copy their results into ``out``; return their summaries."""
    _, _, wa = _helpers()
    model = {**wa.TWIN_MODEL, "unet": f"{DEMO_MODEL}.safetensors"}
    results: dict = {}

    t0 = time.perf_counter()
    entry = server.run(wa.to_testbed(wa.twin(STEMS["uniform"]), **model), timeout=600)
    (img,) = server.saved_images(entry)
    shutil.copyfile(img, out / "sample-uniform-w4.png")
    results["uniform_w4"] = {"seconds": round(time.perf_counter() - t0, 2), "image": "sample-uniform-w4.png",
                             **_ui(entry, "qua2sedimo")[0]}

    t0 = time.perf_counter()
    entry = server.run(wa.to_testbed(wa.twin(STEMS["mixed"]), **model), timeout=600)
    apply_summary, saved = _ui(entry, "qua2sedimo")
    shutil.copyfile(server.base / "output" / saved["file"], out / "model-mixed.q.safetensors")
    cfg_text = next(t for t in _ui(entry, "text") if t.startswith("saved ") and t.split()[1].endswith(".json:"))
    cfg_rel = cfg_text.split()[1].rstrip(":")
    shutil.copyfile(server.base / "models" / "qua2sedimo" / cfg_rel, out / "config-mixed.json")
    results["mixed"] = {"seconds": round(time.perf_counter() - t0, 2), "file": "model-mixed.q.safetensors",
                        "file_bytes": saved["bytes"], "config": "config-mixed.json", **apply_summary}

    t0 = time.perf_counter()
    entry = server.run(wa.to_testbed(wa.twin(STEMS["load"]), **{**model, "quantized_file": saved["file"]}),
                       timeout=600)
    (img,) = server.saved_images(entry)
    shutil.copyfile(img, out / "sample-from-quantized.png")
    info = json.loads(next(t for t in _ui(entry, "text") if t.startswith("{")))
    results["load_quantized"] = {"seconds": round(time.perf_counter() - t0, 2), "image": "sample-from-quantized.png",
                                 "avg_bits": info["avg_bits"], "model_class": info["model"]}
    results["search"] = run_search(server, out, model)
    results["report"] = run_report(server, out, model)
    return results


def run_report(server, out: Path, model: dict) -> dict:
    """search (resumed from the demo journal) → report → config at 3.5 bits → apply → sample → save.

    Writes ``out/report.json`` (the node's report with the figure paths made relative to ``out``) and the figures.
    """
    _, _, wa = _helpers()
    graph = wa.to_testbed(wa.twin(STEMS["full"]), **model, search_configs=SEARCH_CONFIGS)
    node = next(n for n in graph.values() if n["class_type"] == "Qua2SeDiMoSearch")
    node["inputs"].update(journal="demo", n_states=8, n_seeds=2, steps=10)
    t0 = time.perf_counter()
    entry = server.run(graph, timeout=1800)
    seconds = time.perf_counter() - t0
    texts = _ui(entry, "text")
    rel = next(t for t in texts if "report: " in t).rsplit("report: ", 1)[1].strip()
    src = server.base / "output" / rel
    report = json.loads(src.read_text())
    figures = {}
    for name, file in report.get("figures", {}).items():
        shutil.copyfile(src.with_name(file), out / f"report-{name}.png")
        figures[name] = f"report-{name}.png"
    report["figures"] = figures
    images = [p for p in server.saved_images(entry) if "knapsack-3.5" in p.name]
    if images:
        shutil.copyfile(images[0], out / "sample-knapsack-3.5.png")
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    _copy_journal(server, out)  # now with the constructed and uniform configs too
    built = next(t for t in texts if t.startswith("knapsack"))
    return {"seconds": round(seconds, 2), "report": "report.json", "build_config": built,
            "image": "sample-knapsack-3.5.png" if images else None}


def _copy_journal(server, out: Path) -> list[tuple]:
    """A consistent copy (WAL included) of the demo journal to ``out/journal.sqlite``; its (objective, b̄) rows."""
    import sqlite3

    src = sqlite3.connect(f"file:{server.base / 'models' / 'qua2sedimo' / 'journals' / 'demo.sqlite'}?mode=ro",
                          uri=True)
    dst_path = out / "journal.sqlite"
    dst_path.unlink(missing_ok=True)
    dst = sqlite3.connect(dst_path)
    try:
        src.backup(dst)
        return dst.execute("SELECT primary_value, avg_bits FROM evals WHERE idx IS NOT NULL "
                           "ORDER BY primary_value").fetchall()
    finally:
        src.close()
        dst.close()


def run_search(server, out: Path, model: dict) -> dict:
    """The search workflow in 'wait' mode (small budget); its journal is copied to ``out/journal.sqlite``."""

    _, _, wa = _helpers()
    graph = wa.to_testbed(wa.twin(STEMS["search"]), **model, search_configs=SEARCH_CONFIGS)
    node = next(n for n in graph.values() if n["class_type"] == "Qua2SeDiMoSearch")
    node["inputs"].update(mode="wait", journal="demo", n_states=8, n_seeds=2, steps=10)
    t0 = time.perf_counter()
    entry = server.run(graph, timeout=900)
    seconds = time.perf_counter() - t0
    (png,) = server.saved_images(entry)
    shutil.copyfile(png, out / "search-pareto.png")
    rows = _copy_journal(server, out)
    status = [t for t in _ui(entry, "text") if "configs evaluated" in t][-1]
    return {"seconds": round(seconds, 2), "evaluated": len(rows), "objective": "denoise_error",
            "best": {"denoise_error": rows[0][0], "avg_bits": rows[0][1]} if rows else None,
            "journal": "journal.sqlite", "pareto_plot": "search-pareto.png", "status": status}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="Qua2SeDiMo demo: the example workflows on a tiny PixArt-Σ, "
                                 "through a real ComfyUI server on loopback")
    ap.add_argument("--out", type=Path, default=Path("demo-output"))
    args = ap.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not os.environ.get("COMFY_DIR"):
        raise SystemExit("COMFY_DIR is not set: run `make demo` (it installs the ComfyUI host and sets it)")
    comfy_host, _, _ = _helpers()

    t_start = time.perf_counter()
    base = prepare_base(out)
    dense_bytes = (base / "models" / "diffusion_models" / f"{DEMO_MODEL}.safetensors").stat().st_size
    t_server = time.perf_counter()
    with comfy_host.ComfyServer(base) as server:
        t_server = time.perf_counter() - t_server
        workflows = run_workflows(server, out)
    summary = {
        "model": f"{DEMO_MODEL} (tiny PixArt-Σ, random weights, fp16 file)",
        "dense_file_bytes": dense_bytes,
        "quantized_file_bytes": workflows["mixed"]["file_bytes"],
        "compression": round(dense_bytes / workflows["mixed"]["file_bytes"], 2),
        "workflows": workflows,
        "seconds": {"server_start": round(t_server, 1), "total": round(time.perf_counter() - t_start, 1)},
        "comfyui_base": str(base),
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    m = workflows["mixed"]
    print(f"Qua2SeDiMo demo ({summary['model']}), outputs in {out}/")
    print(f"  uniform W4: b̄ = {workflows['uniform_w4']['avg_bits']:.3f}, sampled in "
          f"{workflows['uniform_w4']['seconds']:.1f} s → sample-uniform-w4.png")
    print(f"  mixed 3/4-bit: b̄ = {m['avg_bits']:.3f} ({', '.join(f'{k}: {v}' for k, v in m['counts'].items())}); "
          f"file {dense_bytes / 2**20:.1f} MiB → {m['file_bytes'] / 2**20:.1f} MiB → model-mixed.q.safetensors")
    print("  load quantized → sample-from-quantized.png")
    sr = workflows["search"]
    print(f"  search: {sr['evaluated']} configs in {sr['seconds']:.0f} s, best denoise_error "
          f"{sr['best']['denoise_error']:.4g} at b̄ {sr['best']['avg_bits']:.3f} → journal.sqlite, search-pareto.png")
    rp = workflows["report"]
    print(f"  report → report.json ({rp['seconds']:.0f} s); Build Config: {rp['build_config']}")
    print(f"  total {summary['seconds']['total']:.0f} s")
    return summary


if __name__ == "__main__":
    main()
