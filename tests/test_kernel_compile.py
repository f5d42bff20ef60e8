"""Ahead-of-time compile check of the Triton kernels (``bench/kernel_compile.py``) in its own processes, without a
GPU: every representative variant for sm_80/89/90 must compile without spills and, for GEMMs, with tensor-core MMA —
under the Triton this environment installs and under Triton 3.6 (``.venv-triton36``); and it must compile, with MMA,
under Triton 3.3 and 3.2 (``.venv-triton33``/``.venv-triton32``: what torch 2.7 and 2.6 bring). ``make tritons``
builds those venvs."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "kernel_compile.py"
VENV36 = Path(os.environ.get("QUA2SEDIMO_TRITON36_VENV", ROOT / ".venv-triton36"))
PY36 = VENV36 / "bin" / "python"
#: older Tritons: compile errors and MMA only (their launch binder differs: ``kernel_compile.PORTABLE``)
OLD_TRITONS = {"triton 3.3": ROOT / ".venv-triton33" / "bin" / "python",
               "triton 3.2": ROOT / ".venv-triton32" / "bin" / "python"}

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                                   reason="triton not installed: no compile check")]


def _env() -> dict[str, str]:
    """The subprocess environment: this process's import path without its interpreter's own directories (the
    stdlib, site-packages): those would put this environment's Triton ahead of the other venv's own."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    own = [p for p in sys.path if p and "site-packages" not in p and not p.startswith((sys.prefix, sys.base_prefix))]
    env.update(TRITON_DEFAULT_FP_FUSION="1", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT.parent)] + own))
    return env


def _start(python: str) -> subprocess.Popen:
    return subprocess.Popen([python, str(SCRIPT), "--quick"], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_kernels_compile_without_spills_with_mma():
    """Both Triton versions at once (two processes); the table of each is printed on failure."""
    procs = {"ci triton": _start(sys.executable)}
    if PY36.exists():
        procs["triton 3.6"] = _start(str(PY36))
    elif os.environ.get("QUA2SEDIMO_REQUIRE_HOST"):
        pytest.fail(f"Triton 3.6 compile check: {PY36} is missing (CI builds it with `make triton36`)")
    results = {name: (p.wait(timeout=900), p.stdout.read()) for name, p in procs.items()}
    for name, (rc, out) in results.items():
        assert rc == 0 and "kernel_compile: ok" in out, f"{name}:\n{out[-6000:]}"
    if "triton 3.6" in procs:  # the other venv's own Triton ran, not this environment's
        assert results["triton 3.6"][1].startswith("triton 3.6."), results["triton 3.6"][1][:200]
    if "triton 3.6" not in procs:
        pytest.skip(f"Triton 3.6 compile check skipped: no {PY36} (`make triton36` builds it)")


def test_kernels_compile_on_older_triton():
    """Triton 3.3 and 3.2: every representative variant compiles, GEMMs with MMA (3.3 rejected the kernel's chained
    ``A or B or C``; 3.2 takes no tuple arguments, so its table decodes keep the gather)."""
    present = {name: py for name, py in OLD_TRITONS.items() if py.exists()}
    missing = sorted(set(OLD_TRITONS) - set(present))
    if missing and os.environ.get("QUA2SEDIMO_REQUIRE_HOST"):
        pytest.fail(f"{missing} compile check: venv missing (CI builds it with `make tritons`)")
    procs = {name: _start(str(py)) for name, py in present.items()}
    results = {name: (p.wait(timeout=900), p.stdout.read()) for name, p in procs.items()}
    for name, (rc, out) in results.items():
        assert out.startswith(name + "."), f"{name}: another Triton ran: {out[:200]}"
        assert rc == 0 and "kernel_compile: ok" in out and "portable signature" in out, f"{name}:\n{out[-6000:]}"
    if missing:
        pytest.skip(f"compile check skipped for {missing}: no venv (`make tritons` builds them)")


def test_per_weight_target_fails_the_check(monkeypatch):
    """A variant over its sm_90 per-weight target is a problem (the check exits 1); other architectures and variants
    without a target are only reported."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    spec = importlib.util.spec_from_file_location("kernel_compile_under_test", SCRIPT)
    kc = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, kc)
    spec.loader.exec_module(kc)

    def row(arch, loop_insts, target):
        return kc.Row("fused 16x128x128 4b affine", arch, 128 * 128, True, target, mma="wgmma", loop_insts=loop_insts,
                      threads=128)

    assert row(90, 640, 5.0).problems() == []  # 640 * 128 / 16384 = 5.0
    assert "target 5.0" in " ".join(row(90, 641, 5.0).problems())
    assert row(80, 800, 5.0).problems() == [] and row(90, 800, None).problems() == []
