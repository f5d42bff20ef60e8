"""Custom socket types shared by the nodes."""

from comfy_api.latest import io

Config = io.Custom("QUA2SEDIMO_CONFIG")
CATEGORY = "Qua2SeDiMo"
Search = io.Custom("QUA2SEDIMO_SEARCH")

# What the option names mean, for every node that offers them.
OPTION_TOOLTIP = ("method-bits: uaq = uniform affine (per output channel), kmeans_c = k-means per output channel, "
                  "kmeans_a = k-means over the whole layer; 3 or 4 bits per weight (packed codes + lookup table); "
                  "fp16 = keep the layer dense")
CONFIG_OUT = "a per-layer choice of options (CONFIG): connect to Apply Config or Save Config"
