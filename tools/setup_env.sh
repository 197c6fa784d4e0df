#!/usr/bin/env bash
# Create (or reuse) the project's Python environment and link it as ./.venv.
#
# The environment is keyed by a hash of requirements*.txt and this script and lives in a cache
# outside the clone ($MASKD_ENV_CACHE, default ~/.cache/maskd-env/<hash>), so fresh clones (CI)
# reuse it. A second call is a fast no-op while the hash is unchanged; a change builds a new env.
# The project itself is installed editable (`pip install -e .`) for the clone that calls this.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
CACHE="${MASKD_ENV_CACHE:-$HOME/.cache/maskd-env}"

HASH="$(cat requirements.txt requirements-detectron2.txt tools/setup_env.sh | sha256sum | cut -c1-16)"
ENV_DIR="$CACHE/$HASH"
STAMP="$ENV_DIR/.maskd-env-complete"

mkdir -p "$CACHE"
exec 9>"$CACHE/$HASH.lock"
flock 9   # one builder per hash; concurrent callers wait for it

if [ ! -f "$STAMP" ]; then
    echo "[setup] building environment $ENV_DIR (requirements hash $HASH)"
    rm -rf "$ENV_DIR"
    "$PYTHON" -m venv "$ENV_DIR"
    "$ENV_DIR/bin/python" -m pip install --quiet --upgrade pip
    "$ENV_DIR/bin/python" -m pip install --quiet -r requirements.txt
    SP="$("$ENV_DIR/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    # The wheel is tagged cp310; its Python code is version-independent.
    "$ENV_DIR/bin/python" -m pip install --quiet --no-deps --only-binary=:all: \
        --python-version 3.10 --implementation cp --target "$SP" --upgrade \
        -r requirements-detectron2.txt
    # The wheel also drops a top-level `tools` package and a cp310-only `_C` extension.
    rm -rf "$SP/tools" "$SP"/detectron2/_C*.so
    "$ENV_DIR/bin/python" -c "import detectron2, torch, torchvision; print('[setup] detectron2', detectron2.__version__, 'torch', torch.__version__)"
    touch "$STAMP"
else
    echo "[setup] environment up to date ($ENV_DIR)"
fi

# The editable install points at one clone; redo it (a few seconds) when another clone calls.
WHERE="$("$ENV_DIR/bin/python" -c 'import importlib.util as u; s = u.find_spec("maskd"); print(s.origin if s else "")')"
if [ "$WHERE" != "$ROOT/projects/MasKD/maskd/__init__.py" ]; then
    echo "[setup] installing maskd (editable) from $ROOT"
    "$ENV_DIR/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$ROOT"
fi

if [ -e .venv ] && [ ! -L .venv ]; then
    echo "[setup] error: $ROOT/.venv exists and is not a link made by this script;" \
         "move it away and run again" >&2
    exit 1
fi
ln -sfn "$ENV_DIR" .venv
