"""Test-only ComfyUI custom-node pack (V3 API): random CONDITIONING without text encoders.

Symlinked into ``custom_nodes/`` (as ``qua2sedimo_testnodes``) next to our pack by the server tests
and the demo. ``Qua2SeDiMoTestConditioning`` returns random conditioning with the shapes the real
text encoders of each architecture produce (table in ``tests/tiny_models.py``), so KSampler runs the
real denoiser code of the tiny models. Never shipped to users.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from comfy_api.latest import ComfyExtension, io


def _load_tiny_models():
    # Loaded by file path: this folder is imported by ComfyUI as a top-level custom node module.
    name = "qua2sedimo_tests_tiny_models"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parent.parent / "tiny_models.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    return mod


_tiny = _load_tiny_models()


class Qua2SeDiMoTestConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Qua2SeDiMoTestConditioning",
            display_name="Qua2SeDiMo test conditioning (random)",
            category="qua2sedimo/testing",
            description="Random CONDITIONING shaped like the given architecture's text encoder output "
                        "(test-only; no text encoder needed).",
            inputs=[
                io.Combo.Input("arch", options=list(_tiny.ARCHES), default="sd15"),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, arch: str, seed: int) -> io.NodeOutput:
        return io.NodeOutput(_tiny.conditioning_for(arch, seed))


class Qua2SeDiMoTestNodes(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [Qua2SeDiMoTestConditioning]


async def comfy_entrypoint() -> Qua2SeDiMoTestNodes:
    return Qua2SeDiMoTestNodes()
