"""`make demo`: the main job end to end, through a real ComfyUI server, on the trained reference model.

Run as ``python -m qua2sedimo.demo --out demo-output`` with ``COMFY_DIR`` pointing at a ComfyUI tree
(``make demo`` installs one, cached). Steps:

1. the reference model (``nodes/reference_model.py``: a class-conditional SD3 trained on scikit-learn's digits
   with ComfyUI's own classes; trained once in a subprocess and cached by version, nothing is downloaded);
   a ComfyUI base directory under ``<out>/comfyui`` with this pack in ``custom_nodes/`` and that model;
2. ``main.py --cpu`` on loopback; the example workflows of ``workflows/`` are queued over HTTP as their
   API twins, with the model's Digit Conditioning / Digit Decode nodes in place of text encoders and VAE:
   uniform W4 → sample, mixed 3/4-bit config → save quantized, load quantized → sample, a search, the report
   and the knapsack config at 3.5 bits → save quantized;
3. quality: FP, uniform W4, uniform W3 and the knapsack 3.5 model sample the same ``--samples`` digits (same
   seeds, ComfyUI's KSampler) → ``digits-grid.png`` (one row each) and FID / class accuracy on a held-out
   classifier's features (``digits-quality.json``, in ``summary.json`` and printed);
4. ``<out>/`` receives the quantized safetensors, the sample images, the config and ``summary.json``.

The test-bed helpers (server control, tiny models, workflow conversion) live in ``tests/``; the demo is a
repository job, not part of the installed package's API.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .quant.atomic import atomic_write_text
from .search.report import STABLE_CONFIGS

REPO = Path(__file__).resolve().parent
TESTS = REPO / "tests"
DEMO_MODEL = "digits_sd3"
DEMO_DIGIT = "7"  # the class the workflows draw
DECODE_SCALE = 12  # 32×32 digits shown at 384×384
QUALITY_ROWS = {"fp": "fp", "uniform-w4": "uaq-4", "uniform-w3": "uaq-3"}  # + knapsack-3.5 (the report's config)
STEMS = {"uniform": "1. Quantize W4 and sample", "mixed": "2. Mixed bits and save",
         "load": "3. Sample a quantized file", "search": "5. Search in background",
         "full": "6. Search report and build"}


def _helpers():
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import comfy_host
    import tiny_models
    import workflow_api

    return comfy_host, tiny_models, workflow_api


def _ui(entry: dict, key: str) -> list:
    return [v for out in (entry.get("outputs") or {}).values() for v in out.get(key, [])]


def _reference_env() -> dict:
    """The subprocesses import this pack as ``qua2sedimo`` (installed, or this folder's parent on the path)."""
    env = dict(os.environ)
    if REPO.name == "qua2sedimo":
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO.parent), env.get("PYTHONPATH")) if p)
    return env


def reference_cache() -> Path:
    comfy_host, _, _ = _helpers()
    return comfy_host.cache_root() / "reference-models"


def train_reference(threads: int = 1) -> dict:
    """Train (once; cached by version and step count) the reference model in a subprocess; its meta + path."""
    cmd = [sys.executable, "-m", "qua2sedimo.nodes.reference_model", "train", "--out", str(reference_cache()),
           "--threads", str(threads)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=_reference_env(), cwd=REPO.parent)
    if res.returncode != 0:
        raise RuntimeError(f"training the reference model failed ({res.returncode}): {' '.join(cmd)}\n"
                           f"{res.stderr[-6000:]}")
    return {**json.loads(res.stdout.strip().splitlines()[-1]), "seconds_here": round(time.perf_counter() - t0, 1)}


def prepare_base(out: Path, model_file: Path) -> Path:
    """``<out>/comfyui``: the reference model (symlinked from its cache), output/, custom_nodes/."""
    comfy_host, _, _ = _helpers()
    base = comfy_host.make_base_dir(out / "comfyui")
    links = {base / "custom_nodes" / "qua2sedimo": REPO,
             base / "custom_nodes" / "qua2sedimo_testnodes": TESTS / "testnodes",
             base / "models" / "diffusion_models" / f"{DEMO_MODEL}.safetensors": model_file}
    for link, target in links.items():
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target, target_is_directory=target.is_dir())
    return base


def digits_graph(api: dict, *, search_configs: int = 4) -> dict:
    """An example workflow's API twin on the reference model: Digit Conditioning for the prompts (positive:
    ``DEMO_DIGIT``, negative: none), Digit Decode for the VAE, 64×64 latents, the model's sampling settings."""
    _, _, wa = _helpers()
    from .nodes.reference_model import SAMPLE_PX, SAMPLING

    graph = wa.to_testbed(api, unet=f"{DEMO_MODEL}.safetensors", arch="sd3", latent_px=SAMPLE_PX // 8,
                          steps=SAMPLING["steps"], search_configs=search_configs)
    negative = {str(n["inputs"]["negative"][0]) for n in graph.values()
                if isinstance(n["inputs"].get("negative"), list)}
    for nid, node in list(graph.items()):
        ct, inp = node["class_type"], node["inputs"]
        if ct == "Qua2SeDiMoTestConditioning":
            node.update(class_type="Qua2SeDiMoDigitConditioning",
                        inputs={"digit": "none" if nid in negative else DEMO_DIGIT})
        elif ct == "VAEDecode":
            node.update(class_type="Qua2SeDiMoDigitDecode", inputs={"samples": inp["samples"],
                                                                     "scale": DECODE_SCALE})
        elif ct == "VAELoader":
            del graph[nid]
        elif ct == "UNETLoader":
            inp["unet_name"] = f"{DEMO_MODEL}.safetensors"
        elif ct == "Qua2SeDiMoRulesConfig":  # most of this small model's weights are its 4096-wide text embedder:
            inp["default"] = "uaq-3"  # with the example's 4-bit default the "3/4-bit" mix would average > 4 bits
        elif ct == "KSampler":
            inp.update(cfg=SAMPLING["cfg"], scheduler=SAMPLING["scheduler"], sampler_name=SAMPLING["sampler_name"])
        elif ct == "Qua2SeDiMoSearch":
            inp.update(cfg=SAMPLING["cfg"])
    return graph


def run_workflows(server, out: Path, search_configs: int) -> dict:
    """Queue the three example workflows; copy their results into ``out``; return their summaries."""
    _, _, wa = _helpers()
    results: dict = {}

    t0 = time.perf_counter()
    entry = server.run(digits_graph(wa.twin(STEMS["uniform"])), timeout=600)
    (img,) = server.saved_images(entry)
    shutil.copyfile(img, out / "sample-uniform-w4.png")
    results["uniform_w4"] = {"seconds": round(time.perf_counter() - t0, 2), "image": "sample-uniform-w4.png",
                             **_ui(entry, "qua2sedimo")[0]}

    t0 = time.perf_counter()
    entry = server.run(digits_graph(wa.twin(STEMS["mixed"])), timeout=600)
    apply_summary, saved = _ui(entry, "qua2sedimo")
    shutil.copyfile(server.base / "output" / saved["file"], out / "model-mixed.q.safetensors")
    cfg_text = next(t for t in _ui(entry, "text") if t.startswith("saved ") and t.split()[1].endswith(".json:"))
    cfg_rel = cfg_text.split()[1].rstrip(":")
    shutil.copyfile(server.base / "models" / "qua2sedimo" / cfg_rel, out / "config-mixed.json")
    results["mixed"] = {"seconds": round(time.perf_counter() - t0, 2), "file": "model-mixed.q.safetensors",
                        "file_bytes": saved["bytes"], "config": "config-mixed.json", **apply_summary}

    t0 = time.perf_counter()
    graph = digits_graph(wa.twin(STEMS["load"]))
    next(n for n in graph.values() if n["class_type"] == "Qua2SeDiMoLoadQuantized")["inputs"]["file"] = saved["file"]
    entry = server.run(graph, timeout=600)
    (img,) = server.saved_images(entry)
    shutil.copyfile(img, out / "sample-from-quantized.png")
    info = json.loads(next(t for t in _ui(entry, "text") if t.startswith("{")))
    results["load_quantized"] = {"seconds": round(time.perf_counter() - t0, 2), "image": "sample-from-quantized.png",
                                 "avg_bits": info["avg_bits"], "model_class": info["model"]}
    results["search"] = run_search(server, out, search_configs)
    results["report"] = run_report(server, out, search_configs)
    return results


def run_report(server, out: Path, search_configs: int) -> dict:
    """search (resumed from the demo journal) → report → config at 3.5 bits → apply → sample → save.

    Writes ``out/report.json`` (the node's report with the figure paths made relative to ``out``) and the figures.
    """
    _, _, wa = _helpers()
    graph = digits_graph(wa.twin(STEMS["full"]), search_configs=search_configs)
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
    saved = next(s["file"] for s in _ui(entry, "qua2sedimo") if "knapsack-3.5" in s.get("file", ""))
    shutil.copyfile(server.base / "output" / saved, out / "model-knapsack-3.5.q.safetensors")
    return {"seconds": round(seconds, 2), "report": "report.json", "build_config": built,
            "warnings": report.get("warnings", []),
            "image": "sample-knapsack-3.5.png" if images else None, "file": "model-knapsack-3.5.q.safetensors"}


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


def run_search(server, out: Path, search_configs: int) -> dict:
    """The search workflow in 'wait' mode (small budget); its journal is copied to ``out/journal.sqlite``."""

    _, _, wa = _helpers()
    graph = digits_graph(wa.twin(STEMS["search"]), search_configs=search_configs)
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


def measure_quality(base: Path, model_file: Path, knapsack: Path, out: Path, samples: int) -> dict:
    """FP, uniform W4/W3 and the knapsack model: the same seeds through KSampler, FID / accuracy, one grid."""
    cmd = [sys.executable, "-m", "qua2sedimo.nodes.reference_model", "evaluate", "--model", str(model_file),
           "--out", str(out), "--samples", str(samples), "--base-directory", str(base), "--threads", "1",
           *[a for name, spec in QUALITY_ROWS.items() for a in ("--config", f"{name}={spec}")],
           "--config", f"knapsack-3.5={knapsack}"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=_reference_env(), cwd=REPO.parent)
    if res.returncode != 0:
        raise RuntimeError(f"measuring the quality failed ({res.returncode}): {' '.join(cmd)}\n{res.stderr[-6000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="Qua2SeDiMo demo: the example workflows on the trained reference "
                                 "model (digits), through a real ComfyUI server on loopback; FID / accuracy of FP, "
                                 "uniform W4/W3 and the searched knapsack config")
    ap.add_argument("--out", type=Path, default=Path("demo-output"))
    ap.add_argument("--samples", type=int, default=500, help="digits sampled per configuration for FID / accuracy")
    ap.add_argument("--search-configs", type=int, default=STABLE_CONFIGS,
                    help="configs the demo's search evaluates (the report warns below its default)")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not os.environ.get("COMFY_DIR"):
        raise SystemExit("COMFY_DIR is not set: run `make demo` (it installs the ComfyUI host and sets it)")
    comfy_host, _, _ = _helpers()

    t_start = time.perf_counter()
    trained = train_reference()
    model_file = Path(trained["path"])
    base = prepare_base(out, model_file)
    dense_bytes = model_file.stat().st_size
    t_server = time.perf_counter()
    with comfy_host.ComfyServer(base) as server:
        t_server = time.perf_counter() - t_server
        workflows = run_workflows(server, out, args.search_configs)
    t_quality = time.perf_counter()
    quality = measure_quality(base, model_file, out / workflows["report"]["file"], out, args.samples)
    quality_rows = {name: {k: v[k] for k in ("avg_bits", "fid", "accuracy", "n")}
                    for name, v in quality["variants"].items()}
    summary = {
        "model": f"{DEMO_MODEL} (reference SD3, {trained['params']:,} parameters, trained on scikit-learn's digits, "
                 f"{trained['version']}, {trained['train']['steps']} steps; fp16 file)",
        "training": {"steps": trained["train"]["steps"], "seconds": trained["train_seconds"],
                     "threads": trained["threads"], "final_loss": trained["final_loss"],
                     "cached": trained["cached"]},
        "dense_file_bytes": dense_bytes,
        "quantized_file_bytes": workflows["mixed"]["file_bytes"],
        "compression": round(dense_bytes / workflows["mixed"]["file_bytes"], 2),
        "quality": {"samples": quality["samples"], "seed": quality["seed"], "sampling": quality["sampling"],
                    "classifier_real_accuracy": quality["classifier_real_accuracy"], "grid": quality["grid"],
                    "grid_rows": quality["rows"], "configs": quality_rows,
                    "seconds": round(time.perf_counter() - t_quality, 1)},
        "workflows": workflows,
        "seconds": {"server_start": round(t_server, 1), "total": round(time.perf_counter() - t_start, 1)},
        "comfyui_base": str(base),
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    m = workflows["mixed"]
    print(f"Qua2SeDiMo demo ({summary['model']}), outputs in {out}/")
    tr = summary["training"]
    print(f"  training: {tr['steps']} steps in {tr['seconds']:.0f} s on {tr['threads']} threads"
          f"{' (cached)' if tr['cached'] else ''}, final loss {tr['final_loss']:.4f}")
    print(f"  uniform W4: b̄ = {workflows['uniform_w4']['avg_bits']:.3f}, sampled in "
          f"{workflows['uniform_w4']['seconds']:.1f} s → sample-uniform-w4.png")
    print(f"  mixed 3/4-bit: b̄ = {m['avg_bits']:.3f} ({', '.join(f'{k}: {v}' for k, v in m['counts'].items())}); "
          f"file {dense_bytes / 2**20:.2f} MiB → {m['file_bytes'] / 2**20:.2f} MiB → model-mixed.q.safetensors")
    print("  load quantized → sample-from-quantized.png")
    sr = workflows["search"]
    print(f"  search: {sr['evaluated']} configs in {sr['seconds']:.0f} s, best denoise_error "
          f"{sr['best']['denoise_error']:.4g} at b̄ {sr['best']['avg_bits']:.3f} → journal.sqlite, search-pareto.png")
    rp = workflows["report"]
    print(f"  report → report.json ({rp['seconds']:.0f} s); Build Config: {rp['build_config']}")
    for w in rp["warnings"]:
        print(f"  report WARNING: {w}")
    q = summary["quality"]
    print(f"  quality, {q['samples']} digits per config (same seeds, cfg {q['sampling']['cfg']:g}; classifier on "
          f"real digits: {q['classifier_real_accuracy']:.3f}) → {q['grid']} (rows: {', '.join(q['grid_rows'])})")
    for name, row in q["configs"].items():
        bits = "16" if row["avg_bits"] is None else f"{row['avg_bits']:.3f}"
        print(f"    {name:13s} b̄ {bits:>6s}  FID {row['fid']:8.3f}  accuracy {row['accuracy']:.3f}")
    print(f"  total {summary['seconds']['total']:.0f} s")
    return summary


if __name__ == "__main__":
    main()
