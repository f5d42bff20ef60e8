"""Helpers for running the tests and the demo against a real ComfyUI host (0.3.75, CPU).

The host is installed by ``.ci/install_comfy_host.sh <venv-python>`` (see shared/research/testbed.md).
This module imports nothing outside the standard library at import time; ComfyUI itself is only
imported by :func:`setup_inprocess`.

* :func:`comfy_dir` — the ComfyUI tree (env ``COMFY_DIR``, else the install script's cache path).
* :func:`host_unavailable_reason` — why the host can't be used from this interpreter, or ``None``.
* :func:`setup_inprocess` — make ``import comfy...`` work in this process (CPU, base directory).
* :class:`ComfyServer` — a ``main.py`` subprocess driven over HTTP with ``urllib``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
INSTALL_SCRIPT = REPO_ROOT / ".ci" / "install_comfy_host.sh"

# Modules whose absence means ComfyUI's requirements were not installed into this interpreter.
_REQUIRED_MODULES = (
    "torch", "torchvision", "torchaudio", "safetensors", "aiohttp", "einops", "transformers",
    "torchsde", "yaml", "PIL", "scipy", "requests", "comfyui_frontend_package", "alembic", "sqlalchemy",
)
# ComfyUI top-level names that other code on sys.path must not have taken first.
_COMFY_TOPLEVEL = (
    "comfy", "comfy_api", "comfy_execution", "comfy_extras", "comfy_config", "folder_paths", "nodes",
    "node_helpers", "latent_preview", "execution", "server", "utils", "app", "protocol",
)


class ComfyHostUnavailable(RuntimeError):
    """The ComfyUI host is not installed (or not for this interpreter)."""


class ComfyServerError(RuntimeError):
    """The ComfyUI server failed to start, rejected a prompt, or a prompt failed to execute."""


# ------------------------------------------------------------------------------------------ location


def recipe() -> str:
    """The install script's recipe id (single source of truth: the script itself)."""
    m = re.search(r'^RECIPE="([^"]+)"', INSTALL_SCRIPT.read_text(), re.M)
    if not m:
        raise RuntimeError(f"no RECIPE=... line in {INSTALL_SCRIPT}")
    return m.group(1)


def cache_root() -> Path:
    """Same rule as the install script: $COMFY_HOST_CACHE, else $XDG_CACHE_HOME or ~/.cache."""
    if os.environ.get("COMFY_HOST_CACHE"):
        return Path(os.environ["COMFY_HOST_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "qua2sedimo-comfy-host"


def cached_comfy_dir() -> Path:
    return cache_root() / recipe() / "ComfyUI"


def _install_hint(python: str | None = None) -> str:
    return (f'eval "$(bash {INSTALL_SCRIPT.relative_to(REPO_ROOT)} {python or sys.executable})" '
            "&& export COMFY_DIR")


def _tree_problem(path: Path) -> str | None:
    if not (path / "main.py").is_file() or not (path / "comfy" / "sd.py").is_file():
        return f"{path} is not a ComfyUI tree (no main.py / comfy/sd.py)"
    return None


def find_comfy_dir() -> Path | None:
    """The ComfyUI tree if one is present (no check of this interpreter's packages)."""
    env = os.environ.get("COMFY_DIR")
    if env:
        p = Path(env).expanduser().resolve()
        return None if _tree_problem(p) else p
    p = cached_comfy_dir()
    return p if (p / ".complete").is_file() and not _tree_problem(p) else None


def host_version() -> str:
    """The version of the ComfyUI tree in use (``COMFY_DIR`` or the cached 0.3.75 tree); "" when there is none.
    Caches of things built with a host's classes (tiny models, option tables) are keyed by it."""
    found = find_comfy_dir()
    if found is None or not (found / "comfyui_version.py").is_file():
        return ""
    m = re.search(r'__version__\s*=\s*"([^"]+)"', (found / "comfyui_version.py").read_text())
    return m.group(1) if m else ""


def host_unavailable_reason() -> str | None:
    """``None`` if the host can be used from this interpreter, else a human-readable reason."""
    env = os.environ.get("COMFY_DIR")
    if env:
        problem = _tree_problem(Path(env).expanduser().resolve())
        if problem:
            return f"COMFY_DIR: {problem}"
    elif find_comfy_dir() is None:
        return (f"ComfyUI host not installed (COMFY_DIR unset and no tree at {cached_comfy_dir()}); "
                f"install it with: {_install_hint()}")
    missing = [m for m in _REQUIRED_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        return (f"ComfyUI's requirements are missing from {sys.executable} ({', '.join(missing)}); "
                f"install them with: {_install_hint()}")
    return None


def comfy_dir() -> Path:
    """The ComfyUI tree to use; raises :class:`ComfyHostUnavailable` with instructions if missing."""
    reason = host_unavailable_reason()
    if reason:
        raise ComfyHostUnavailable(reason)
    found = find_comfy_dir()
    assert found is not None
    return found


# ---------------------------------------------------------------------------------------- in-process

_inproc: dict[str, Any] = {}


def make_base_dir(base_dir: str | os.PathLike) -> Path:
    """Create the folders ComfyUI expects under a ``--base-directory``."""
    base = Path(base_dir).resolve()
    for sub in ("custom_nodes", "models/diffusion_models", "models/checkpoints", "models/vae_approx",
                "models/vae", "output", "input", "temp", "user"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    return base


def _check_shadowing(cdir: Path) -> None:
    for name in _COMFY_TOPLEVEL:
        mod = sys.modules.get(name)
        if mod is None:
            continue
        f = getattr(mod, "__file__", None) or next(iter(getattr(mod, "__path__", []) or []), None)
        if f is None or not Path(f).resolve().is_relative_to(cdir):
            raise RuntimeError(
                f"module {name!r} is already imported from {f!r}, not from ComfyUI at {cdir}: something "
                "imported a same-named module first (use relative imports inside the pack)")


def _rebase_folder_paths(folder_paths: Any, new_base: Path) -> None:
    """Point an already-imported ``folder_paths`` at another base directory."""
    old = os.path.abspath(folder_paths.base_path)
    new = str(new_base)

    def swap(p: str) -> str:
        ap = os.path.abspath(p)
        if ap == old or ap.startswith(old + os.sep):
            return new + ap[len(old):]
        return p

    for attr in ("base_path", "models_dir", "output_directory", "temp_directory", "input_directory",
                 "user_directory"):
        setattr(folder_paths, attr, swap(getattr(folder_paths, attr)))
    for key, (paths, exts) in list(folder_paths.folder_names_and_paths.items()):
        folder_paths.folder_names_and_paths[key] = ([swap(p) for p in paths], exts)
    folder_paths.filename_list_cache.clear()


def setup_inprocess(base_dir: str | os.PathLike | None = None,
                    comfy_path: str | os.PathLike | None = None) -> Path:
    """Make ComfyUI importable in this process, on CPU, with ``base_dir`` as its base directory.

    Idempotent. Must run before anything imports ``comfy.model_management`` (which asserts CUDA
    unless ``args.cpu`` is set). ComfyUI's root is put first on ``sys.path``; its top-level
    ``nodes``/``utils``/``server``/``execution`` then shadow same-named absolute imports — code of
    our pack must use relative imports. Returns the ComfyUI directory.
    """
    cdir = Path(comfy_path).resolve() if comfy_path else comfy_dir()
    prev = _inproc.get("comfy_dir")
    if prev is not None and prev != cdir:
        raise RuntimeError(f"ComfyUI already set up in-process from {prev}, not {cdir}")
    if prev is None:
        _check_shadowing(cdir)
        if "comfy.model_management" in sys.modules:
            raise RuntimeError("comfy.model_management was imported before setup_inprocess()")
    if str(cdir) in sys.path:
        sys.path.remove(str(cdir))
    sys.path.insert(0, str(cdir))

    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args

    args = comfy.cli_args.args
    args.cpu = True
    args.disable_api_nodes = True
    base = make_base_dir(base_dir) if base_dir is not None else None
    if base is not None:
        args.base_directory = str(base)
        if "folder_paths" in sys.modules:
            import folder_paths

            if Path(folder_paths.base_path).resolve() != base:
                _rebase_folder_paths(folder_paths, base)
    import comfy.model_management  # noqa: F401  (with args.cpu set: CPU device, no CUDA assert)
    import folder_paths

    if base is not None:
        assert Path(folder_paths.base_path).resolve() == base, folder_paths.base_path
        assert Path(folder_paths.get_output_directory()).resolve() == base / "output"
    _inproc["comfy_dir"] = cdir
    _inproc["base"] = base
    return cdir


# -------------------------------------------------------------------------------------------- server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """ComfyUI ``main.py`` as a subprocess, with a small stdlib HTTP client.

    >>> with ComfyServer(base) as srv:
    ...     entry = srv.wait(srv.post_prompt(graph), timeout=120)

    The server log goes to ``log_path`` (default ``<base>/logs/comfy-server-<port>.log``); errors
    raised by this class include its tail.
    """

    def __init__(self, base_dir: str | os.PathLike, *, comfy_path: str | os.PathLike | None = None,
                 python: str | None = None, port: int | None = None, extra_args: list[str] | tuple = (),
                 log_path: str | os.PathLike | None = None, startup_timeout: float = 180.0,
                 env: dict[str, str] | None = None):
        self.base = make_base_dir(base_dir)
        self.comfy_path = Path(comfy_path).resolve() if comfy_path else comfy_dir()
        self.python = python or sys.executable
        self.fixed_port = port
        self.port: int | None = None
        self.extra_args = list(extra_args)
        self.log_path_arg = Path(log_path) if log_path else None
        self.log_path: Path | None = None
        self.startup_timeout = startup_timeout
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.client_id = uuid.uuid4().hex
        self.startup_seconds: float | None = None

    # -- lifecycle
    def __enter__(self) -> ComfyServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ComfyServer:
        last_err: Exception | None = None
        for _attempt in range(3):  # a free port may be taken between probing and binding
            try:
                self._start_once()
                return self
            except ComfyServerError as e:
                last_err = e
                self.stop()
                if self.fixed_port is not None or "address already in use" not in self.log_tail(60).lower():
                    raise
        raise last_err  # type: ignore[misc]

    def _start_once(self) -> None:
        self.port = self.fixed_port or free_port()
        self.log_path = self.log_path_arg or (self.base / "logs" / f"comfy-server-{self.port}.log")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--disable-api-nodes",
               # default is <ComfyUI>/user/comfyui.db: keep the (read-only) tree untouched
               "--database-url", f"sqlite:///{self.base / 'user' / 'comfyui.db'}", *self.extra_args]
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            log.write(("$ " + " ".join(cmd) + "\n").encode())
            log.flush()
            self.proc = subprocess.Popen(cmd, cwd=self.comfy_path, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env=env, preexec_fn=_die_with_parent)
        while True:
            if self.proc.poll() is not None:
                raise ComfyServerError(self._with_log(
                    f"ComfyUI server exited with code {self.proc.returncode} during startup"))
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() - t0 > self.startup_timeout:
                raise ComfyServerError(self._with_log(
                    f"ComfyUI server not ready after {self.startup_timeout:.0f} s"))
            time.sleep(0.2)
        self.startup_seconds = time.monotonic() - t0

    def stop(self, timeout: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- log
    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _with_log(self, msg: str, lines: int = 40) -> str:
        return f"{msg}\n--- server log tail ({self.log_path}) ---\n{self.log_tail(lines)}"

    def import_failures(self) -> list[str]:
        """Lines of the startup log reporting a custom node pack that failed to import."""
        return [ln.strip() for ln in self.log_text().splitlines() if "IMPORT FAILED" in ln]

    def custom_node_errors(self, pack: str) -> str:
        """The log's error lines (with tracebacks) about loading ``custom_nodes/<pack>``; "" if none."""
        lines = self.log_text().splitlines()
        pat = re.compile(rf"custom_nodes[/\\]{re.escape(pack)}(?![\w.-])")
        out: list[str] = []
        tb_start: int | None = None
        for i, ln in enumerate(lines):
            if ln.startswith("Traceback (most recent call last):"):
                tb_start = i
            if pat.search(ln) and any(k in ln for k in ("Cannot import", "Error while calling", "Skip ",
                                                         "IMPORT FAILED", "did not return", "not callable")):
                if "Cannot import" in ln and tb_start is not None:
                    out.extend(lines[tb_start:i])
                out.append(ln)
                tb_start = None
        return "\n".join(out)

    # -- HTTP
    def request(self, method: str, path: str, body: Any = None, timeout: float = 60.0) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            msg = f"{method} {path} -> HTTP {e.code}: {detail[:4000]}"
            raise ComfyServerError(self._with_log(msg)) from e
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            raise ComfyServerError(self._with_log(f"{method} {path} failed: {e}")) from e
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw

    def get(self, path: str, timeout: float = 60.0) -> Any:
        return self.request("GET", path, timeout=timeout)

    def post(self, path: str, body: Any, timeout: float = 60.0) -> Any:
        return self.request("POST", path, body, timeout=timeout)

    def object_info(self, node_class: str | None = None) -> dict:
        if node_class is None:
            return self.get("/object_info")
        return self.get("/object_info/" + urllib.parse.quote(node_class)).get(node_class)

    def system_stats(self) -> dict:
        return self.get("/system_stats")

    def post_prompt(self, graph: dict) -> str:
        """Queue an API-format graph; returns the prompt id (HTTP 400 -> ComfyServerError)."""
        resp = self.post("/prompt", {"prompt": graph, "client_id": self.client_id})
        if not isinstance(resp, dict) or "prompt_id" not in resp:
            raise ComfyServerError(self._with_log(f"unexpected /prompt response: {resp!r}"))
        if resp.get("node_errors"):
            raise ComfyServerError(self._with_log(f"prompt has node errors: {resp['node_errors']}"))
        return resp["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 300.0, poll: float = 0.1) -> dict:
        """Wait for a prompt to finish; return its history entry or raise with the node's traceback."""
        t0 = time.monotonic()
        while True:
            hist = self.get(f"/history/{prompt_id}")
            entry = hist.get(prompt_id) if isinstance(hist, dict) else None
            if entry is not None:
                status = entry.get("status") or {}
                if status.get("status_str") == "error" or not status.get("completed", True):
                    raise ComfyServerError(self._with_log(_format_execution_error(prompt_id, status)))
                return entry
            if not self.is_running():
                raise ComfyServerError(self._with_log(f"server died while running prompt {prompt_id}"))
            if time.monotonic() - t0 > timeout:
                raise ComfyServerError(self._with_log(f"prompt {prompt_id} not done after {timeout:.0f} s"))
            time.sleep(poll)

    def run(self, graph: dict, timeout: float = 300.0) -> dict:
        """``post_prompt`` + ``wait``."""
        return self.wait(self.post_prompt(graph), timeout=timeout)

    def saved_images(self, entry: dict, node_id: str | None = None) -> list[Path]:
        """Paths of the images a history entry's SaveImage/PreviewImage outputs point to."""
        roots = {"output": self.base / "output", "temp": self.base / "temp", "input": self.base / "input"}
        out: list[Path] = []
        for nid, node_out in (entry.get("outputs") or {}).items():
            if node_id is not None and nid != node_id:
                continue
            for img in node_out.get("images", []):
                out.append(roots.get(img.get("type", "output"), roots["output"]) / img.get("subfolder", "")
                           / img["filename"])
        return out


def _die_with_parent() -> None:
    """In the child (Linux): get SIGTERM when the parent dies, so a killed test run leaves no server."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            import signal

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        except Exception:
            pass


def _format_execution_error(prompt_id: str, status: dict) -> str:
    lines = [f"prompt {prompt_id} failed: status={status.get('status_str')!r}"]
    for kind, data in status.get("messages") or []:
        if kind in ("execution_error", "execution_interrupted"):
            lines.append(f"{kind} in node {data.get('node_id')} ({data.get('node_type')}): "
                         f"{data.get('exception_type')}: {data.get('exception_message')}")
            tb = data.get("traceback") or []
            lines.append("".join(tb) if isinstance(tb, list) else str(tb))
    return "\n".join(lines)
