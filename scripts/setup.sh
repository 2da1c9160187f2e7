#!/usr/bin/env bash
# Idempotent set-up used by scripts/demo.sh and scripts/test.sh: a .venv with requirements.txt (first a torch build
# for CUDA 12.6 where a GPU is older than the default build's sm_75, as a V100; util/cuda_build.py decides),
# and Debian's Fashion-MNIST files when asked for (`scripts/setup.sh --fashion-mnist`).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv"
    "${PYTHON:-python3}" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision, timm, numpy, tensorboard, submitit, yaml, pytest, xdist" 2>/dev/null; then
    # A GPU older than the default torch build's oldest architecture (a V100: sm_70) needs another build first.
    TORCH_INDEX="$("${PYTHON:-python3}" util/cuda_build.py --pip-index)"
    if [ -n "$TORCH_INDEX" ]; then
        echo "[setup] a GPU here needs a torch build with older architectures: pip install torch torchvision $TORCH_INDEX"
        # shellcheck disable=SC2086
        .venv/bin/pip install --quiet --disable-pip-version-check torch torchvision $TORCH_INDEX
    fi
    echo "[setup] installing requirements.txt into .venv"
    .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
fi

if [ "${1:-}" = "--fashion-mnist" ] && [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    echo "[setup] installing Debian's dataset-fashion-mnist"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi
