"""Nodes that make, load and save mixed-precision configurations."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..quant import OPTIONS, QuantConfig
from . import comfy_bridge as bridge
from .sockets import CATEGORY, Config


def _keep_patterns(text: str) -> list[str]:
    return [p.strip() for p in (text or "").replace("\n", ",").split(",") if p.strip()]


def _describe(cfg: QuantConfig) -> str:
    counts = ", ".join(f"{o}: {n}" for o, n in sorted(cfg.counts().items()))
    return f"{len(cfg.layers)} layers, b̄ = {cfg.avg_bits():.3f} bits ({counts})"


class UniformConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Qua2SeDiMoUniformConfig",
            display_name="Qua2SeDiMo Uniform Config",
            category=CATEGORY,
            description="Every quantizable layer of the model gets one option; layers matching 'keep' stay fp16.",
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("option", options=list(OPTIONS), default="uaq-4"),
                io.String.Input("keep", default="", tooltip="comma-separated layer names or globs kept in fp16"),
            ],
            outputs=[Config.Output(display_name="config")],
        )

    @classmethod
    def execute(cls, model, option: str, keep: str) -> io.NodeOutput:
        cfg = QuantConfig.uniform(bridge.diffusion_model(model), option, keep=_keep_patterns(keep))
        return io.NodeOutput(cfg, ui=ui.PreviewText(_describe(cfg)))


class LoadConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Qua2SeDiMoLoadConfig",
            display_name="Qua2SeDiMo Load Config",
            category=CATEGORY,
            description="A JSON config from models/qua2sedimo/.",
            inputs=[io.Combo.Input("config_name", options=bridge.list_configs())],
            outputs=[Config.Output(display_name="config")],
        )

    @classmethod
    def execute(cls, config_name: str) -> io.NodeOutput:
        cfg = QuantConfig.load(bridge.config_path(config_name))
        return io.NodeOutput(cfg, ui=ui.PreviewText(_describe(cfg)))


class SaveConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Qua2SeDiMoSaveConfig",
            display_name="Qua2SeDiMo Save Config",
            category=CATEGORY,
            description="Write the config as JSON into models/qua2sedimo/ (listed by Load Config).",
            inputs=[Config.Input("config"), io.String.Input("filename_prefix", default="qua2sedimo/config")],
            outputs=[io.String.Output(display_name="path")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, config: QuantConfig, filename_prefix: str) -> io.NodeOutput:
        path = bridge.new_output_path(filename_prefix, bridge.config_dir(), "config.json")
        config.save(path)
        rel = path.relative_to(bridge.config_dir().resolve()).as_posix()
        return io.NodeOutput(rel, ui=ui.PreviewText(f"saved {rel}: {_describe(config)}"))
