"""Figures and text about a search (matplotlib, Agg backend; no ComfyUI)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from .journal import Record
from .runner import pareto_front


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def pareto_png(records: Sequence[Record], *, objective: str, title: str = "") -> bytes:
    """PNG of every evaluated config (b̄ vs objective, lower is better) with the Pareto front highlighted."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    try:
        finite = [r for r in records if np.isfinite(r.primary)]
        if finite:
            ax.scatter([r.avg_bits for r in finite], [r.primary for r in finite], s=14, alpha=0.6,
                       label=f"evaluated ({len(finite)})")
            front = pareto_front(finite)
            ax.plot([r.avg_bits for r in front], [r.primary for r in front], "r.-", label="Pareto front")
            if min(r.primary for r in finite) > 0:
                ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "no configurations evaluated yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("average bits per weight b̄")
        ax.set_ylabel(f"{objective} (lower is better)")
        ax.set_title(title or "Qua²SeDiMo search")
        ax.grid(alpha=0.3)
        if finite:
            ax.legend(loc="upper right")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


def png_to_array(png: bytes) -> np.ndarray:
    """``H×W×3`` float32 in [0, 1] (what a ComfyUI IMAGE holds per picture)."""
    plt = _figure()
    img = plt.imread(io.BytesIO(png), format="png")
    return np.ascontiguousarray(img[..., :3], dtype=np.float32)


def status_text(records: Sequence[Record], *, objective: str, target: int | None = None, state: str = "") -> str:
    """A few lines: progress, best configs, Pareto front size."""
    finite = [r for r in records if np.isfinite(r.primary)]
    lines = [f"{state + ': ' if state else ''}{len(records)}" + (f"/{target}" if target else "") + " configs evaluated"]
    if finite:
        best = min(finite, key=lambda r: r.primary)
        lines.append(f"best {objective} = {best.primary:.4g} at b̄ = {best.avg_bits:.3f} (config #{best.idx})")
        front = pareto_front(finite)
        lines.append("Pareto front: " + ", ".join(f"b̄ {r.avg_bits:.2f} → {r.primary:.3g}" for r in front[:8]))
        secs = [r.timings.get("evaluate") for r in finite if r.timings.get("evaluate")]
        if secs:
            lines.append(f"{np.mean(secs):.2f} s per evaluation")
    return "\n".join(lines)
