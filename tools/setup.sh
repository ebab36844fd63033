#!/usr/bin/env bash
# One-command setup: Python dependencies, this package with its compiled operators,
# detectron2 from source, a self-check, then the quick start: a small DI-MaskDINO trained on
# the built-in synthetic dataset on the CPU (a few minutes), its box and mask AP, and the
# demo on its validation images (output/quick_start/).
#
#   bash tools/setup.sh
#
# Environment:
#   DETECTRON2_SOURCE=/path/to/detectron2   install detectron2 from this local checkout
#                                           (for machines that cannot reach its repository)
#   PANOPTICAPI_SOURCE=/path/to/panopticapi the same for panopticapi (COCO PQ)
#   FORCE_CUDA=1                            compile the CUDA kernels without a visible GPU
#   TORCH_CUDA_ARCH_LIST="8.0;9.0"          GPU architectures to compile for
#   TORCH_VARIANT=cpu | cuda | auto         torch/torchvision build (default auto: cpu when no
#                                           NVIDIA GPU is visible and FORCE_CUDA is not set).
#                                           cpu installs the pinned versions of requirements.txt
#                                           from PyTorch's CPU index (about 1 GB instead of 5.5 GB)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

pinned() { sed -n "s/^$1==\([^ ]*\).*/\1/p" requirements.txt; }
variant=${TORCH_VARIANT:-auto}
if [ "$variant" = auto ]; then
    if [ -n "${FORCE_CUDA:-}" ] || nvidia-smi -L >/dev/null 2>&1; then variant=cuda; else variant=cpu; fi
fi

echo "== [1/5] Python dependencies (requirements.txt; torch build: $variant)"
if [ "$variant" = cpu ] && ! "$PYTHON" -c "import torch, sys; sys.exit(torch.version.cuda is not None)" 2>/dev/null; then
    if ! "$PYTHON" -m pip install "torch==$(pinned torch)" "torchvision==$(pinned torchvision)" \
        --index-url https://download.pytorch.org/whl/cpu; then
        echo "The CPU builds could not be fetched from PyTorch's index (no access from this machine?);" >&2
        echo "installing the default builds from the package index instead (CUDA, about 5.5 GB)." >&2
    fi
fi
"$PYTHON" -m pip install -r requirements.txt
# the stage explorer (Gradio) and its browser tests' driver (Playwright); optional
"$PYTHON" -m pip install -r requirements-explorer.txt playwright ||
    echo "Gradio or Playwright could not be installed: tools/explorer.py and its tests will say so" >&2

echo "== [2/5] di_maskdino and its compiled operators (csrc/)"
"$PYTHON" -m pip install --no-build-isolation --no-deps -e .

echo "== [3/5] detectron2"
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

# --- panopticapi (COCO PQ for panoptic segmentation; not on PyPI): from its repository, or
# PANOPTICAPI_SOURCE=/path/to/panopticapi; without it PQ is computed by hotcoco (requirements.txt)
if ! "$PYTHON" -c "import panopticapi" 2>/dev/null; then
    if [ -n "${PANOPTICAPI_SOURCE:-}" ]; then
        "$PYTHON" -m pip install --no-build-isolation "$PANOPTICAPI_SOURCE"
    elif ! "$PYTHON" -m pip install --no-build-isolation "git+https://github.com/cocodataset/panopticapi.git"; then
        echo "panopticapi could not be installed (no access to its repository?): PQ will use hotcoco" >&2
    fi
fi
# ---

echo "== [4/5] self-check"
"$PYTHON" tools/check_install.py

if [ "$detectron2_missing" = 0 ]; then
    echo "== [5/5] quick start: synthetic dataset, training on the CPU, evaluation, demo"
    export DETECTRON2_DATASETS=${DETECTRON2_DATASETS:-datasets}
    "$PYTHON" datasets/make_synthetic.py --output "$DETECTRON2_DATASETS/synthetic"
    "$PYTHON" tools/train_net.py --config-file configs/quick_start.yaml
    "$PYTHON" - <<'PY'
import json
metrics = json.load(open("output/quick_start/metrics_synthetic_val.json"))
print(f"quick start on synthetic_val: box AP {metrics['bbox']['AP']:.1f}, mask AP {metrics['segm']['AP']:.1f}")
PY
    "$PYTHON" tools/demo.py --config-file configs/quick_start.yaml --input "$DETECTRON2_DATASETS/synthetic/val" \
        --output output/quick_start/demo --json output/quick_start/demo/instances.json \
        MODEL.WEIGHTS output/quick_start/model_final.pth
    echo "The trained weights: output/quick_start/model_final.pth (all that resuming or evaluating needs)."
fi

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
