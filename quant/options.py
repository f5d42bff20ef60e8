"""Names of quantization methods and per-layer options (``method-bits`` or ``fp16``)."""

from __future__ import annotations

METHODS: tuple[str, ...] = ("uaq", "kmeans_c", "kmeans_a")
"""UAQ (uniform affine, per output channel), K-Means-C (codebook per channel), K-Means-A (one per layer)."""

SUPPORTED_BITS: tuple[int, ...] = (2, 3, 4, 8)
SEARCH_BITS: tuple[int, ...] = (3, 4)
FP_OPTION = "fp16"
"""Option that keeps a layer unquantized (in its original dtype, whatever that is)."""

OPTIONS: tuple[str, ...] = tuple(f"{m}-{b}" for b in (4, 3) for m in METHODS)
"""The paper's search space: 3 methods x {4, 3} bits."""


def format_option(method: str, bits: int) -> str:
    """``("kmeans_c", 3)`` → ``"kmeans_c-3"`` (validated)."""
    check_method_bits(method, bits)
    return f"{method}-{bits}"


def check_method_bits(method: str, bits: int, where: str = "") -> None:
    """Raise ``ValueError`` for an unknown method or unsupported bit width."""
    at = f" for layer {where!r}" if where else ""
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}{at}: use one of {', '.join(METHODS)}")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits!r}{at}: use one of {SUPPORTED_BITS}")


def parse_option(option: str, where: str = "") -> tuple[str, int] | None:
    """``"uaq-4"`` → ``("uaq", 4)``; ``"fp16"`` → ``None``; anything else → ``ValueError``."""
    if option == FP_OPTION:
        return None
    at = f" for layer {where!r}" if where else ""
    if not isinstance(option, str) or "-" not in option:
        raise ValueError(
            f"invalid option {option!r}{at}: write 'method-bits' (e.g. 'uaq-4', 'kmeans_c-3') or 'fp16'"
        )
    method, _, bits_text = option.rpartition("-")
    # ASCII digits in canonical form only: 'uaq-03' or 'uaq-٤' would name the same option twice (cache entries,
    # journal keys) under another spelling
    if not (bits_text.isascii() and bits_text.isdigit()) or str(int(bits_text)) != bits_text:
        raise ValueError(f"invalid option {option!r}{at}: the part after '-' must be a bit width written in ASCII "
                         f"digits without leading zeros (e.g. '{method}-4')")
    bits = int(bits_text)
    check_method_bits(method, bits, where)
    return method, bits
