"""Qua²SeDiMo for ComfyUI: mixed-precision 3/4-bit weight quantization of diffusion models.

This folder is both a ComfyUI custom-node pack (ComfyUI calls :func:`comfy_entrypoint`) and the Python
package ``qua2sedimo``. Nothing from ComfyUI is imported at module import time, so ``qua2sedimo.quant``
and ``qua2sedimo.search`` work without ComfyUI.
"""

__version__ = "0.1.0"

# The web extension (web/js/): shows each node's text on the node. ComfyUI reads this module attribute for V1
# and V3 (comfy_entrypoint) packs alike, before it looks at the node list.
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    """ComfyUI V3 entry point: the extension that lists this pack's nodes."""
    from .nodes.extension import Qua2SeDiMoExtension

    return Qua2SeDiMoExtension()
