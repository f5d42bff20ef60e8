"""Quantization core (pure PyTorch, no ComfyUI): quantizers, packing, configs, option tables."""

from .accounting import average_bits, option_nbytes, paper_nbytes, stored_nbytes
from .api import module_nbytes, quantize_
from .config import QuantConfig
from .layer_table import LayerInfo, layers_fingerprint, quantizable_layers, weights_fingerprint
from .layers import QuantConv2d, QuantLinear
from .options import FP_OPTION, METHODS, OPTIONS, SUPPORTED_BITS, format_option, parse_option
from .packing import pack_codes, packed_length, unpack_codes
from .quantizers import QuantizedWeight, quantize_weight
from .swap import ConfigSwapper
from .table import OptionTable, OptionTableCancelled, option_table

__all__ = [
    "ConfigSwapper",
    "FP_OPTION",
    "METHODS",
    "OPTIONS",
    "SUPPORTED_BITS",
    "LayerInfo",
    "OptionTable",
    "OptionTableCancelled",
    "QuantConfig",
    "QuantConv2d",
    "QuantLinear",
    "QuantizedWeight",
    "average_bits",
    "format_option",
    "layers_fingerprint",
    "module_nbytes",
    "option_nbytes",
    "option_table",
    "pack_codes",
    "packed_length",
    "paper_nbytes",
    "parse_option",
    "quantizable_layers",
    "quantize_",
    "quantize_weight",
    "stored_nbytes",
    "unpack_codes",
    "weights_fingerprint",
]
