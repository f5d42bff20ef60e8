"""Ray workers import the pack as ``qua2sedimo`` even when ComfyUI loaded it under its folder's path (as
0.3.75 does for every custom node)."""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_pack_loaded_under_a_path_name_is_importable_as_qua2sedimo(tmp_path):
    pack = tmp_path / "custom_nodes" / "ComfyUI-Qua2SeDiMo"
    pack.mkdir(parents=True)
    shutil.copy(REPO / "__init__.py", pack)
    for sub in ("quant", "search", "nodes"):
        shutil.copytree(REPO / sub, pack / sub, ignore=shutil.ignore_patterns("__pycache__"))
    script = textwrap.dedent(f"""
        import importlib, importlib.util, sys
        name = {str(pack)!r}  # like ComfyUI 0.3.75: the module is named by its path
        spec = importlib.util.spec_from_file_location(name, name + "/__init__.py", submodule_search_locations=[name])
        mod = importlib.util.module_from_spec(spec); sys.modules[name] = mod; spec.loader.exec_module(mod)
        remote = importlib.import_module(name + ".nodes.search_remote")
        prefix, path = remote._canonical_pack(__import__("pathlib").Path({str(tmp_path / "link")!r}))
        canon = importlib.import_module(prefix + ".nodes.search_remote")
        print(prefix, path, canon.__file__, sep="\\n")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    prefix, path, canon_file = out.stdout.split()
    assert prefix == "qua2sedimo" and Path(canon_file).resolve() == pack / "nodes" / "search_remote.py"
    # a worker (fresh process) with that folder on PYTHONPATH imports this copy, not the installed package
    worker = subprocess.run([sys.executable, "-c", "import qua2sedimo.nodes.search_remote as m; print(m.__file__)"],
                            capture_output=True, text=True, timeout=120, env={"PYTHONPATH": path, "PATH": "/usr/bin"})
    assert worker.returncode == 0, worker.stderr[-2000:]
    assert Path(worker.stdout.strip()).resolve() == pack / "nodes" / "search_remote.py"

