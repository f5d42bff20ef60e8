"""The search (pure PyTorch/NumPy, no ComfyUI): layer graph and units, objectives, journal, sampling, runner,
report figures. It reaches a model only through ``evaluate(options) -> {objective: value}``."""

from .graph import LayerGraph, trace_graph
from .journal import Journal, JournalError, JournalLocked, Record
from .objectives import DenoiseError, ImageDistance, StateRecorder, TrajectoryStates, frechet_distance
from .runner import InProcessExecutor, SearchProgress, SearchResult, pareto_front, run_search
from .sampling import ConfigSampler, config_key, option_set

__all__ = [
    "ConfigSampler",
    "DenoiseError",
    "ImageDistance",
    "InProcessExecutor",
    "Journal",
    "JournalError",
    "JournalLocked",
    "LayerGraph",
    "Record",
    "SearchProgress",
    "SearchResult",
    "StateRecorder",
    "TrajectoryStates",
    "config_key",
    "frechet_distance",
    "option_set",
    "pareto_front",
    "run_search",
    "trace_graph",
]
