"""Qua²SeDiMo for ComfyUI: mixed-precision 3/4-bit weight quantization of diffusion models.

This folder is both a ComfyUI custom-node pack (ComfyUI calls :func:`comfy_entrypoint`) and the Python
package ``qua2sedimo``. Nothing from ComfyUI is imported at module import time, so ``qua2sedimo.quant``
and ``qua2sedimo.search`` work without ComfyUI.
"""

__version__ = "0.1.0"


async def comfy_entrypoint():
    """ComfyUI V3 entry point: the extension that lists this pack's nodes."""
    from .nodes.extension import Qua2SeDiMoExtension

    return Qua2SeDiMoExtension()
