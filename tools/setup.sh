#!/usr/bin/env bash
# One-command setup: Python dependencies, this package with its compiled operators,
# detectron2 from source, then a self-check of the installation.
#
#   bash tools/setup.sh
#
# Environment:
#   DETECTRON2_SOURCE=/path/to/detectron2   install detectron2 from this local checkout
#                                           (for machines that cannot reach its repository)
#   FORCE_CUDA=1                            compile the CUDA kernels without a visible GPU
#   TORCH_CUDA_ARCH_LIST="8.0;9.0"          GPU architectures to compile for
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

echo "== [1/4] Python dependencies (requirements.txt)"
"$PYTHON" -m pip install -r requirements.txt

echo "== [2/4] di_maskdino and its compiled operators (csrc/)"
"$PYTHON" -m pip install --no-build-isolation --no-deps -e .

echo "== [3/4] detectron2"
detectron2_missing=0
if "$PYTHON" -c "import detectron2" 2>/dev/null; then
    echo "detectron2 is already installed: $("$PYTHON" -c 'import detectron2, os; print(os.path.dirname(detectron2.__file__))')"
elif [ -n "${DETECTRON2_SOURCE:-}" ]; then
    if [ ! -f "$DETECTRON2_SOURCE/setup.py" ]; then
        echo "DETECTRON2_SOURCE=$DETECTRON2_SOURCE is not a detectron2 checkout (no setup.py there)." >&2
        exit 2
    fi
    "$PYTHON" -m pip install --no-build-isolation -e "$DETECTRON2_SOURCE"
elif ! "$PYTHON" -m pip install --no-build-isolation "git+https://github.com/facebookresearch/detectron2.git"; then
    detectron2_missing=1
fi

echo "== [4/4] self-check"
"$PYTHON" tools/check_install.py

if [ "$detectron2_missing" = 1 ]; then
    cat >&2 <<'MSG'

SETUP INCOMPLETE: detectron2 could not be installed from its repository (no access from
this machine?). Everything else is installed, and the model core and its tests work
without detectron2; training, evaluation and the demo need it. To finish:
  1. bring a detectron2 checkout onto this machine (git clone of
     facebookresearch/detectron2, or a copy of one), then
  2. DETECTRON2_SOURCE=/path/to/detectron2 bash tools/setup.sh
MSG
    exit 3
fi
echo "Setup complete."
