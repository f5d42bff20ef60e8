"""Ahead-of-time compile check of every Triton kernel variant for sm_80 / sm_89 / sm_90, on a machine without a GPU.

The kernel wrappers of :mod:`qua2sedimo.quant.kernels.triton_lut` are called with CPU tensors of the real shapes while
``JITFunction.run`` is replaced by a recorder: each launch's arguments are captured exactly as the wrapper passes them
(tensors, strides, constexprs, ``num_warps``/``num_stages``). Each capture is then bound by Triton's own binder (the
specialisation a launch computes: types, 16-byte divisibility, ``== 1`` integers) and compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` using the bundled ``ptxas``. Per variant:

* registers, stack and local memory from the cubin (``cuobjdump --dump-resource-usage``), spill instructions
  (``STL``/``LDL`` in the SASS), shared memory (the compiled kernel's metadata);
* the MMA kind in the PTX (``wgmma`` / ``mma`` / none);
* static SASS instructions in the main loop (the backward branch's body holding the MMA / the longest one) per weight a
  thread decodes in one iteration (``BLOCK_N × BLOCK_K / threads``: the SASS is what each thread issues).

Fails (exit 1) on a compile error, a spill, a GEMM without tensor-core MMA, or a variant over its per-weight target
on sm_90 (``CompileVariant.max_per_weight``: the table and UAQ decodes on their 16-token main tiles, ≤ 5 at 4 bits,
≤ 6 at 3). Triton < 3.4 (no ``JITFunction._pack_args``) compiles from argument types alone (:data:`PORTABLE`):
there only compile errors and missing MMA fail; spills and counts are reported.
``--quick`` compiles the representative set CI runs; the default compiles every variant dispatch can launch.
``TRITON_INTERPRET`` must be unset.

    python bench/kernel_compile.py --quick [--arch 90] [--out table.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("kernel_compile: unset TRITON_INTERPRET (the check compiles for real GPUs)")

try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime import jit as triton_jit
except ImportError as exc:  # pragma: no cover - exercised where triton is absent
    print(f"kernel_compile: skipped, triton not importable ({exc})")
    sys.exit(0)

ROOT = Path(__file__).resolve().parents[1]
ARCHS = (80, 89, 90)
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@dataclasses.dataclass
class Capture:
    """One launch as the wrapper issued it."""

    fn: object
    args: tuple
    kwargs: dict


@dataclasses.dataclass
class Row:
    """One compiled variant."""

    variant: str
    arch: int
    weights_per_iter: int
    gemm: bool
    max_per_weight: float | None = None
    regs: int = 0
    stack: int = 0
    spill_insts: int = 0
    smem: int = 0
    mma: str = "-"
    loop_insts: int = 0
    threads: int = 0
    error: str = ""

    @property
    def per_weight(self) -> float:
        """SASS instructions a thread issues per weight it decodes (the SASS is per thread)."""
        return self.loop_insts * self.threads / self.weights_per_iter if self.weights_per_iter else 0.0

    def problems(self) -> list[str]:
        out = []
        if self.error:
            out.append(f"compile error: {self.error}")
        if (self.spill_insts or self.stack) and not PORTABLE:
            out.append(f"spills ({self.spill_insts} STL/LDL, {self.stack} B stack)")
        if self.gemm and self.mma == "-":
            out.append("GEMM without tensor-core MMA")
        if self.max_per_weight is not None and self.arch == 90 and not self.error and not PORTABLE and \
                self.per_weight > self.max_per_weight:
            out.append(f"{self.per_weight:.2f} SASS instructions per weight > target {self.max_per_weight}")
        return out


class Recorder:
    """Context manager: ``JITFunction.run`` records launches instead of running them."""

    def __enter__(self) -> list[Capture]:
        self.captured: list[Capture] = []
        self._orig = triton_jit.JITFunction.run

        def run(fn, *args, grid, warmup, **kwargs):
            self.captured.append(Capture(fn, args, kwargs))

        triton_jit.JITFunction.run = run
        return self.captured

    def __exit__(self, *exc) -> None:
        triton_jit.JITFunction.run = self._orig


#: Triton versions before 3.4 have no ``JITFunction._pack_args``: their launches are compiled from a signature built
#: here (argument types only, none of the launch's divisibility specialisation), which checks that every variant
#: compiles on them — the Triton that older torch builds bring (2.6: 3.2, 2.7: 3.3) — but not its code quality
PORTABLE = not hasattr(triton_jit.JITFunction, "_pack_args")
_PTR_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64", "int32": "i32",
              "int64": "i64", "uint8": "u8", "int8": "i8"}


def _portable_source(cap: Capture) -> tuple[ASTSource, dict]:
    """``(ASTSource, options)`` of a launch from its arguments' types (pointers by tensor dtype, ints as i32 or i64,
    floats as fp32) and its constexprs, for Triton versions without the launch binder's internals."""
    fn = cap.fn
    bound = dict(zip(fn.arg_names, cap.args, strict=False))
    bound.update({k: v for k, v in cap.kwargs.items() if k in fn.arg_names})
    constexpr = {p.name for p in fn.params if p.is_constexpr}
    consts, sig = {}, {}
    for name in fn.arg_names:
        v = bound[name]
        if name in constexpr:
            consts[name], sig[name] = v, "constexpr"
        elif hasattr(v, "dtype") and hasattr(v, "data_ptr"):
            sig[name] = "*" + _PTR_TYPES[str(v.dtype).removeprefix("torch.")]
        elif isinstance(v, bool) or not isinstance(v, int | float):
            raise TypeError(f"portable compile: argument {name}={v!r} has no signature type")
        else:
            sig[name] = "fp32" if isinstance(v, float) else "i32" if -(2**31) <= v < 2**31 else "i64"
    kw = "constexprs" if "constexprs" in inspect.signature(ASTSource).parameters else "constants"
    options = {k: cap.kwargs[k] for k in ("num_warps", "num_stages") if k in cap.kwargs}
    return ASTSource(fn, sig, **{kw: consts}), options


def compile_capture(cap: Capture, arch: int):
    """Bind ``cap`` with Triton's launch binder for ``sm_<arch>`` and compile it (mirrors ``JITFunction.run``;
    :data:`PORTABLE`: from :func:`_portable_source`)."""
    target = GPUTarget("cuda", arch, 32)
    if PORTABLE:
        src, options = _portable_source(cap)
        return triton.compile(src, target=target, options=options)
    backend = make_backend(target)
    fn = cap.fn
    kwargs = dict(cap.kwargs)
    kwargs.setdefault("debug", False)
    binder = triton_jit.create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*cap.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__)


_INST = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*?);")
_BRA_TARGET = re.compile(r"^\s*0x([0-9a-f]+)")


def sass_of(cubin: bytes) -> tuple[str, str]:
    """``(SASS listing, resource usage)`` of a cubin via the bundled ``cuobjdump``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        exe = str(BIN / "cuobjdump")
        sass = subprocess.run([exe, "-sass", path], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([exe, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    return sass, res


def main_loop(sass: str) -> list[str]:
    """Opcodes of the main loop: the body of each backward branch (cuobjdump prints absolute addresses); the one
    holding an MMA, else the longest."""
    ops = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in map(_INST.search, sass.splitlines()) if m]
    loops = []
    for addr, op, rest in ops:
        t = _BRA_TARGET.match(rest) if op == "BRA" else None
        if t and int(t.group(1), 16) < addr:
            lo = int(t.group(1), 16)
            loops.append([o for a, o, _ in ops if lo <= a <= addr and o != "NOP"])
    if not loops:
        return []
    with_mma = [lp for lp in loops if any("MMA" in o for o in lp)]
    return max(with_mma or loops, key=len)


def measure(cap: Capture, variant: str, arch: int, weights_per_iter: int, gemm: bool,
            max_per_weight: float | None = None) -> Row:
    row = Row(variant, arch, weights_per_iter, gemm, max_per_weight)
    try:
        kernel = compile_capture(cap, arch)
    except Exception as exc:  # a compile error is a finding, reported per variant
        row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        return row
    ptx = kernel.asm["ptx"]
    row.mma = "wgmma" if "wgmma.mma_async" in ptx else ("mma" if re.search(r"\bmma\.sync", ptx) else "-")
    row.smem = int(getattr(kernel.metadata, "shared", 0))
    row.threads = 32 * int(kernel.metadata.num_warps)
    sass, res = sass_of(kernel.asm["cubin"])
    reg = re.search(r"REG:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    row.regs = int(reg.group(1)) if reg else -1
    row.stack = int(stack.group(1)) if stack else 0
    row.spill_insts = len(re.findall(r"\b(STL|LDL)(\.\w+)*\s", sass))
    row.loop_insts = len(main_loop(sass))
    return row


def _measure_arch(job: tuple[bool, int]) -> list[Row]:
    """All variants for one architecture (a worker process: captures are rebuilt there, not pickled)."""
    quick, arch = job
    return [measure(cap, name, arch, wpi, gemm, target) for name, cap, wpi, gemm, target in variants(quick)]


def variants(quick: bool) -> list[tuple[str, Capture, int, bool, float | None]]:
    """``(name, capture, weights decoded per main-loop iteration, is a GEMM, per-weight target on sm_90)`` of every
    launch to check."""
    sys.path.insert(0, str(ROOT.parent))
    from qua2sedimo.quant.kernels import triton_lut as tri  # noqa: PLC0415

    out = []
    for spec in tri.compile_variants(quick):
        with Recorder() as caps:
            spec.launch()
        for cap in caps:
            out.append((spec.name, cap, spec.weights_per_iter, spec.gemm, spec.max_per_weight))
    return out


def table(rows: list[Row]) -> str:
    head = ("| variant | sm | regs | spill insts | stack B | smem B | MMA | loop insts | insts/weight | status |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r.variant} | {r.arch} | {r.regs} | {r.spill_insts} | {r.stack} | {r.smem} | {r.mma} | {r.loop_insts} "
        f"| {r.per_weight:.2f} | {'; '.join(r.problems()) or 'ok'} |\n"
        for r in rows
    )
    return head + body


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="the representative set CI compiles")
    ap.add_argument("--arch", type=int, action="append", help="compute capability (repeatable; default 80 89 90)")
    ap.add_argument("--out", type=Path, help="also write the markdown table here")
    ap.add_argument("--report-only", action="store_true", help="exit 0 even on violations (for the 'before' table)")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (one architecture each)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    jobs = [(args.quick, arch) for arch in (args.arch or ARCHS)]
    if args.jobs > 1:
        import multiprocessing  # noqa: PLC0415

        with multiprocessing.get_context("spawn").Pool(min(args.jobs, len(jobs))) as pool:
            per_arch = pool.map(_measure_arch, jobs)
    else:
        per_arch = [_measure_arch(j) for j in jobs]
    rows = sorted((r for rows in per_arch for r in rows), key=lambda r: (r.variant, r.arch))
    text = (f"triton {triton.__version__}, {len(rows)} compiles in {time.perf_counter() - t0:.0f} s"
            + (" (portable signature: compile errors and MMA checked; spills and per-weight targets only reported)"
               if PORTABLE else "") + "\n\n" + table(rows))
    print(text)
    if args.out:
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.out)
    bad = [f"{r.variant} sm_{r.arch}: {p}" for r in rows for p in r.problems()]
    if bad:
        print("kernel_compile: FAILED\n" + "\n".join(bad), file=sys.stderr)
        return 0 if args.report_only else 1
    print("kernel_compile: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
