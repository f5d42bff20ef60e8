"""Nodes that make, load and save mixed-precision configurations."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..quant import OPTIONS, QuantConfig
from ..quant.config import rule_matches
from ..quant.options import FP_OPTION
from ..search.graph import layer_tags
from . import comfy_bridge as bridge
from .sockets import CATEGORY, CONFIG_OUT, OPTION_TOOLTIP, Config


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
                io.Combo.Input("option", options=list(OPTIONS), default="uaq-4", tooltip=OPTION_TOOLTIP),
                io.String.Input("keep", default="", tooltip="comma-separated layer names or globs kept in fp16"),
            ],
            outputs=[Config.Output(display_name="config", tooltip=CONFIG_OUT)],
        )

    @classmethod
    def execute(cls, model, option: str, keep: str) -> io.NodeOutput:
        cfg = QuantConfig.uniform(bridge.diffusion_model(model), option, keep=_keep_patterns(keep))
        return io.NodeOutput(cfg, ui=ui.PreviewText(_describe(cfg)))


DEFAULT_RULES = """# pattern = option, first match wins; unmatched layers get 'default'.
# A pattern is @ + an op type or block category (@feedforward, @self-attn, @cross-attn, @modulation,
# @single-stream, @FF-2, @SA-QKV, @t-embed ...) or a glob over layer names (*.mlp.fc2, double_blocks.*).
@feedforward = kmeans_c-3
@self-attn = uaq-4
@cross-attn = uaq-4
"""


class RulesConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Qua2SeDiMoRulesConfig",
            display_name="Qua2SeDiMo Rules Config",
            category=CATEGORY,
            description="A mixed config from 'pattern = option' lines (first match wins); unmatched layers get "
            "the default option. A pattern is @ + an op type or block category (@feedforward, @self-attn, "
            "@modulation, …: works on every architecture) or a glob over layer names. Patterns that match no "
            "layer are ignored only if 'strict' is off.",
            inputs=[
                io.Model.Input("model"),
                io.String.Input("rules", default=DEFAULT_RULES, multiline=True,
                                tooltip="'pattern = option' per line: @category / @op-type or a layer-name glob; "
                                        "options: uaq-3/4, kmeans_c-3/4, kmeans_a-3/4, fp16"),
                io.Combo.Input("default", options=[*OPTIONS, FP_OPTION], default="uaq-4",
                               tooltip="the option of layers no rule matches. " + OPTION_TOOLTIP),
                io.Boolean.Input("strict", default=False,
                                 tooltip="fail when a rule matches no layer (off: such rules are skipped)"),
            ],
            outputs=[Config.Output(display_name="config", tooltip=CONFIG_OUT)],
        )

    @classmethod
    def execute(cls, model, rules: str, default: str, strict: bool) -> io.NodeOutput:
        dm = bridge.diffusion_model(model)
        parsed = QuantConfig.parse_rules(rules)
        tags = layer_tags(dm)
        skipped = []
        if not strict:
            skipped = [p for p, _ in parsed if not any(rule_matches(p, n, tags) for n in tags)]
            parsed = [(p, o) for p, o in parsed if p not in skipped]
        cfg = QuantConfig.from_rules(dm, parsed, default=default, tags=tags)
        text = _describe(cfg) + (f"; rules matching no layer (skipped): {', '.join(skipped)}" if skipped else "")
        return io.NodeOutput(cfg, ui=ui.PreviewText(text))


class LoadConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Qua2SeDiMoLoadConfig",
            display_name="Qua2SeDiMo Load Config",
            category=CATEGORY,
            description="A JSON config from models/qua2sedimo/.",
            inputs=[io.Combo.Input("config_name", options=bridge.list_configs())],
            outputs=[Config.Output(display_name="config", tooltip=CONFIG_OUT)],
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
            inputs=[Config.Input("config"), io.String.Input("filename_prefix", default="config")],
            outputs=[io.String.Output(display_name="path", tooltip="the written file, relative to models/qua2sedimo/")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, config: QuantConfig, filename_prefix: str) -> io.NodeOutput:
        path = bridge.new_output_path(filename_prefix, bridge.config_dir(), "config.json")
        config.save(path)
        rel = path.relative_to(bridge.config_dir().resolve()).as_posix()
        return io.NodeOutput(rel, ui=ui.PreviewText(f"saved {rel}: {_describe(config)}"))
