"""The node list (V3 schema), loaded by the pack's ``comfy_entrypoint``."""

from comfy_api.latest import ComfyExtension, io

from .comfy_bridge import register_folders
from .config_nodes import LoadConfig, RulesConfig, SaveConfig, UniformConfig
from .model_nodes import ApplyConfig, LoadQuantized, SaveQuantized
from .reference_model import node_classes as reference_nodes
from .search_nodes import BuildConfig, Search, SearchStatus, SensitivityReport

NODES: list[type[io.ComfyNode]] = [
    UniformConfig, RulesConfig, LoadConfig, SaveConfig, ApplyConfig, SaveQuantized, LoadQuantized, Search,
    SearchStatus, SensitivityReport, BuildConfig, *reference_nodes(),
]


class Qua2SeDiMoExtension(ComfyExtension):
    async def on_load(self) -> None:
        register_folders()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        register_folders()
        return NODES
