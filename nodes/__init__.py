"""ComfyUI nodes (V3 schema) and the bridge to ComfyUI internals.

Importing this package imports nothing from ComfyUI; :mod:`.extension` (the node list, loaded by the pack's
``comfy_entrypoint``) and :mod:`.comfy_bridge` do, and :mod:`.cli` sets ComfyUI up before it does.
"""
