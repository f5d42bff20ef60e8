"""Custom socket types shared by the nodes."""

from comfy_api.latest import io

Config = io.Custom("QUA2SEDIMO_CONFIG")
CATEGORY = "Qua2SeDiMo"
Search = io.Custom("QUA2SEDIMO_SEARCH")
