"""Nodes that quantize a MODEL, and save/load quantized safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import folder_paths
from comfy_api.latest import io, ui

from ..quant import QuantConfig
from . import comfy_bridge as bridge
from .sockets import CATEGORY, Config

ACT_BITS = ["16", "8", "6"]
NO_FILE = "(none)"


class ApplyConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Qua2SeDiMoApplyConfig",
            display_name="Qua2SeDiMo Apply Config",
            category=CATEGORY,
            description="Quantize the denoiser as the config says: packed 3/4-bit codes + tables in memory. "
            "The input MODEL is not changed. act_bits < 16 simulates token-wise activation quantization.",
            inputs=[
                io.Model.Input("model"),
                Config.Input("config", optional=True, tooltip="a CONFIG from another node; or pick config_file"),
                io.Combo.Input("config_file", options=[NO_FILE, *bridge.list_configs()], default=NO_FILE,
                               optional=True, tooltip="a JSON config in models/qua2sedimo/ (used when no CONFIG "
                               "is connected)"),
                io.Combo.Input("act_bits", options=ACT_BITS, default="16",
                               tooltip="activation bits: 16 = weight-only quantization (what the kernels accelerate); "
                                       "8 or 6 also fake-quantize each layer's input token-wise "
                                       "(a simulation, for studies)"),
            ],
            outputs=[io.Model.Output(tooltip="a quantized copy of the model (packed weights); the input MODEL "
                                             "is unchanged"),
                     io.String.Output(display_name="summary", tooltip="b̄, size before → after, layers per option")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, act_bits: str, config=None, config_file: str = NO_FILE) -> io.NodeOutput:
        if config is None:
            if not config_file or config_file == NO_FILE:
                raise ValueError("Apply Config needs a config: connect a CONFIG (e.g. from Qua2SeDiMo Uniform "
                                 "Config) or pick a config_file from models/qua2sedimo/")
            config = QuantConfig.load(bridge.config_path(config_file))
        out, summary = bridge.apply_config(model, config, int(act_bits), node_id=cls.hidden.unique_id)
        text = (
            f"b̄ = {summary['avg_bits']:.3f} bits; denoiser {summary['bytes_before'] / 2**20:.1f} MiB → "
            f"{summary['bytes_after'] / 2**20:.1f} MiB; " + ", ".join(f"{k}: {v}" for k, v in summary["counts"].items())
        )
        if summary["dense_only"]:
            text += "\nkept dense (a kind of layer that cannot be quantized): " + ", ".join(
                f"{d['name']} ({d['type']}, {d['weights']:,} weights)" for d in summary["dense_only"])
        brief = {k: summary[k] for k in ("bytes_before", "bytes_after", "avg_bits", "avg_bits_stored", "counts",
                                         "act_bits")}
        return io.NodeOutput(out, text, ui={"text": [text], "qua2sedimo": [brief]})


class SaveQuantized(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Qua2SeDiMoSaveQuantized",
            display_name="Qua2SeDiMo Save Quantized",
            category=CATEGORY,
            description="Save the quantized denoiser (packed codes + tables + metadata) as .safetensors in the "
            "output folder; Load Quantized lists it without a restart.",
            inputs=[io.Model.Input("model"), io.String.Input("filename_prefix", default="qua2sedimo/model")],
            outputs=[io.String.Output(display_name="path", tooltip="the written file, relative to its folder")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, filename_prefix: str) -> io.NodeOutput:
        out_dir = folder_paths.get_output_directory()
        path = bridge.new_output_path(filename_prefix, Path(out_dir), "q.safetensors")
        header = bridge.save_quantized(model, path)
        rel = path.relative_to(Path(out_dir).resolve()).as_posix()
        n_q = sum(1 for i in header["layers"].values() if i["option"] != "fp16")
        size = path.stat().st_size
        text = f"saved {rel} ({size / 2**20:.1f} MiB, {n_q} quantized layers)"
        return io.NodeOutput(rel, ui={"text": [text], "qua2sedimo": [{"file": rel, "bytes": size,
                                                                       "quantized_layers": n_q}]})


class LoadQuantized(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Qua2SeDiMoLoadQuantized",
            display_name="Qua2SeDiMo Load Quantized",
            category=CATEGORY,
            description="Load a Qua2SeDiMo quantized .safetensors (from models/qua2sedimo/ or the output "
            "folder); ComfyUI detects the architecture, weights stay packed.",
            inputs=[io.Combo.Input("file", options=bridge.list_quantized())],
            outputs=[io.Model.Output(tooltip="the quantized model, detected by ComfyUI, weights kept packed"),
                     io.String.Output(display_name="info", tooltip="architecture, b̄ and size of the loaded model")],
        )

    @classmethod
    def execute(cls, file: str) -> io.NodeOutput:
        model = bridge.load_quantized(bridge.quantized_path(file))
        dm = bridge.diffusion_model(model)
        cfg = getattr(dm, "qua2sedimo_config", None)
        info = {"file": file, "model": type(model.model).__name__,
                "avg_bits": round(cfg.avg_bits(), 4) if cfg else None}
        return io.NodeOutput(model, json.dumps(info), ui=ui.PreviewText(json.dumps(info)))
