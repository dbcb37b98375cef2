#!/usr/bin/env bash
# Build, or reuse, the side environment in which `python -m trainer prepare --detect/--closeups/--require` runs its
# detector (trainer/training/detector_worker.py): mediapipe 0.10.21, the last release that ships its face, hand and
# pose models inside the wheel (later ones download them at run time). It pins numpy<2 and protobuf<5, which clash
# with ComfyUI's environment, so it gets a venv of its own holding only what it imports (no torch). Installed
# without mediapipe's other requirements (jax, sounddevice, sentencepiece, opencv-contrib): the solutions used here
# do not import them. Idempotent: a second run only checks.
#
#   bash scripts/detector-env.sh [TARGET]     default TARGET: .venv-detector in the repository
#   VENV=/path/to/comfyui/venv                the Python to create it with (default: .venv's base Python)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TARGET=${1:-$ROOT/.venv-detector}
VENV=${VENV:-$ROOT/.venv}
HOST_PY="$VENV/bin/python"
PINS=(mediapipe==0.10.21 numpy==1.26.4 protobuf==4.25.9 absl-py==2.5.1 attrs==26.1.0 flatbuffers==25.12.19
      opencv-python-headless==4.10.0.84 matplotlib==3.11.2 contourpy==1.3.3 cycler==0.12.1 fonttools==4.68.0
      kiwisolver==1.5.1 packaging==26.4 pillow==13.0.0 pyparsing==3.3.3 python-dateutil==4.0.0 six==1.17.0)
say() { printf '[detector-env] %s\n' "$*" >&2; }

[ -x "$HOST_PY" ] || { say "no Python at $HOST_PY: build the host first (make host) or set VENV"; exit 1; }
base=$("$HOST_PY" -c 'import sys; print(sys._base_executable)')
stamp="$TARGET/.mole-stamp"
want="${PINS[*]}"
check() { "$TARGET/bin/python" "$ROOT/trainer/training/detector_worker.py" --check; }
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && check 2>/dev/null; then
  exit 0
fi
if [ ! -x "$TARGET/bin/python" ]; then
  say "creating $TARGET with $base"
  "$base" -m venv "$TARGET"
fi
say "installing ${PINS[*]}"
"$TARGET/bin/python" -m pip install -q --no-deps "${PINS[@]}" \
  2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
check
echo "$want" > "$stamp"
say "ready: --detector_python $TARGET/bin/python"
