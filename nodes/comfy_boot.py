"""Start ComfyUI's runtime in a process ComfyUI did not start (the command line, a Ray worker).

Puts the ComfyUI folder first on ``sys.path`` and sets the launch arguments ``main.py`` would (device, base
directory) before anything imports ``comfy.model_management``. The rest of the pack reaches ComfyUI through
:mod:`.comfy_bridge`, which can be imported once this has run.
"""

from __future__ import annotations

import sys
from pathlib import Path


def boot(comfy_dir: str | Path | None, *, cpu: bool, base_directory: str | Path | None = None) -> Path:
    """Make ``import comfy…`` work here with ComfyUI's ``--cpu`` / ``--base-directory``; idempotent."""
    if "comfy.model_management" in sys.modules:  # already running (inside ComfyUI, or booted before)
        return Path(sys.modules["comfy.model_management"].__file__).resolve().parent.parent
    if not comfy_dir or not (Path(comfy_dir) / "comfy" / "sd.py").exists():
        raise ValueError(f"{comfy_dir!r} is not a ComfyUI folder (the one with main.py and comfy/): pass "
                         "--comfy-dir or set $COMFY_DIR (on Ray workers: $QUA2SEDIMO_COMFY_DIR)")
    root = Path(comfy_dir).resolve()
    if str(root) in sys.path:
        sys.path.remove(str(root))
    sys.path.insert(0, str(root))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu
    if base_directory:
        comfy.cli_args.args.base_directory = str(Path(base_directory).resolve())
    import comfy.model_management  # noqa: F401  (picks the device from the arguments above)
    import folder_paths  # noqa: F401  (reads the base directory)

    return root
