"""Session fixtures for tests that need the real ComfyUI host (in-process or as an HTTP server).

Tests marked ``comfy_inproc`` / ``comfy_server`` are skipped with the reason when the host is not
available (``COMFY_DIR`` unset and nothing installed by ``.ci/install_comfy_host.sh`` for this
interpreter); with env ``QUA2SEDIMO_REQUIRE_HOST`` set (CI) they fail instead. Nothing here imports
ComfyUI (or torch) unless such a fixture is used, so plain unit tests stay ComfyUI-free.

Fixtures (all session-scoped):

* ``comfy_base``  — a ``--base-directory``: models/{diffusion_models,vae_approx,...}, output/, input/,
  custom_nodes/qua2sedimo -> the repository root (or env ``QUA2SEDIMO_PACK_DIR``),
  custom_nodes/qua2sedimo_testnodes -> tests/testnodes.
* ``tiny_models`` — {name: path} of the default tiny models (+ random TAESD) in ``comfy_base``;
  generated once and cached under the host cache root, keyed by a hash of tests/tiny_models.py.
* ``comfy_inproc`` — ComfyUI importable in this process (CPU, folder_paths -> ``comfy_base``).
* ``comfy_server`` — one :class:`comfy_host.ComfyServer` for the session, with both packs loaded.
"""

from __future__ import annotations

import functools
import os
import sys
import types
from pathlib import Path

import pytest

_TESTS_DIR = Path(__file__).resolve().parent
if str(_TESTS_DIR) not in sys.path:  # helpers (comfy_host, tiny_models) import as top-level modules
    sys.path.append(str(_TESTS_DIR))

import comfy_host  # noqa: E402  (stdlib only)

HOST_MARKERS = ("comfy_inproc", "comfy_server")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() not in ("", "0", "false", "no", "off")


def pytest_configure(config: pytest.Config) -> None:
    # option tables / FP states of the tiny models are shared by every test base, the demo and the server
    # (keyed by weight fingerprints, validated on load), and kept between runs next to the host cache
    # (one folder per ComfyUI version: a host may build the same model with other layers or numerics)
    version = comfy_host.host_version() or "no-host"
    os.environ.setdefault("QUA2SEDIMO_CACHE_DIR", str(comfy_host.cache_root() / f"option-tables-{version}"))
    config.addinivalue_line("markers", "comfy_inproc: needs the real ComfyUI host, in-process")
    config.addinivalue_line("markers", "comfy_server: needs the real ComfyUI host, over HTTP")


@functools.cache
def _host_reason() -> str | None:
    return comfy_host.host_unavailable_reason()


def require_host() -> None:
    """Skip (or, with QUA2SEDIMO_REQUIRE_HOST set, fail) when the ComfyUI host is unavailable."""
    reason = _host_reason()
    if reason is None:
        return
    if _truthy(os.environ.get("QUA2SEDIMO_REQUIRE_HOST")):
        pytest.fail(f"QUA2SEDIMO_REQUIRE_HOST is set but the ComfyUI host is unavailable: {reason}",
                    pytrace=False)
    pytest.skip(f"ComfyUI host unavailable: {reason}")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if any(item.get_closest_marker(m) for m in HOST_MARKERS):
        require_host()


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = comfy_host.make_base_dir(tmp_path_factory.mktemp("comfy_base"))
    pack = Path(os.environ.get("QUA2SEDIMO_PACK_DIR") or comfy_host.REPO_ROOT).resolve()
    (base / "custom_nodes" / "qua2sedimo").symlink_to(pack, target_is_directory=True)
    (base / "custom_nodes" / "qua2sedimo_testnodes").symlink_to(_TESTS_DIR / "testnodes",
                                                               target_is_directory=True)
    return base


@pytest.fixture(scope="session")
def tiny_models(comfy_base: Path) -> dict[str, Path]:
    require_host()
    import tiny_models as tm

    files = tm.ensure_models(comfy_base / "models", tm.DEFAULT_MODELS)
    return {n: files[f"diffusion_models/{n}.safetensors"] for n in tm.DEFAULT_MODELS}


@pytest.fixture(scope="session")
def comfy_inproc(comfy_base: Path) -> types.SimpleNamespace:
    require_host()
    cdir = comfy_host.setup_inprocess(comfy_base)
    return types.SimpleNamespace(comfy_dir=cdir, base=comfy_base)


@pytest.fixture(scope="session")
def comfy_server(comfy_base: Path, tiny_models: dict[str, Path]):
    require_host()
    server = comfy_host.ComfyServer(comfy_base)
    server.start()
    try:
        yield server
    finally:
        server.stop()
