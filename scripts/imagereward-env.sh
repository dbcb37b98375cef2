#!/usr/bin/env bash
# Build, or reuse, the side environment in which `python -m trainer evaluate --imagereward ...` runs ImageReward.
# ImageReward's model code (the image-reward package) needs timm 0.6 and transformers 4, which clash with
# ComfyUI's; so it gets a venv of its own holding only those, and borrows everything else (torch with your GPU
# build, torchvision, numpy, Pillow, ...) from the ComfyUI environment through a .pth line placed after its own
# packages. Idempotent: a second run only checks.
#
#   bash scripts/imagereward-env.sh [TARGET]     default TARGET: .venv-imagereward in the repository
#   VENV=/path/to/comfyui/venv                   the environment to borrow torch from (default: .venv)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET=${1:-$ROOT/.venv-imagereward}
VENV=${VENV:-$ROOT/.venv}
HOST_PY="$VENV/bin/python"
PINS=(image-reward==1.5 timm==0.6.13 transformers==4.46.3 tokenizers==0.20.3 huggingface_hub==0.26.5
      fairscale==0.4.13)
say() { printf '[imagereward-env] %s\n' "$*" >&2; }

[ -x "$HOST_PY" ] || { say "no Python at $HOST_PY: build the host first (make host) or set VENV"; exit 1; }
base=$("$HOST_PY" -c 'import sys; print(sys._base_executable)')
host_site=$("$HOST_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
stamp="$TARGET/.mole-stamp"
want="${PINS[*]} $host_site"
check() { "$TARGET/bin/python" "$ROOT/trainer/benchmarks/imagereward_worker.py" --check; }
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && check 2>/dev/null; then
  exit 0
fi
if [ ! -x "$TARGET/bin/python" ]; then
  say "creating $TARGET with $base"
  "$base" -m venv "$TARGET"
fi
say "installing ${PINS[*]} (without their other requirements: torch and the rest come from $VENV)"
"$TARGET/bin/python" -m pip install -q --no-deps "${PINS[@]}" \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
site=$("$TARGET/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$host_site" > "$site/zz_comfyui_host.pth"        # read after this venv's own packages
check
echo "$want" > "$stamp"
say "ready: --imagereward_python $TARGET/bin/python"
