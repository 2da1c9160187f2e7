#!/usr/bin/env bash
# The demo: pre-train a tiny MI-MAE on Fashion-MNIST (32 px, patch 4), linear-probe it, and compare with the
# same probe on a randomly initialised encoder and on the raw pixels. Uses a GPU when present; ~10 minutes on 2 CPU
# cores. Flags go to tools/demo.py (--method mae, --output_dir ...).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --fashion-mnist
exec .venv/bin/python tools/demo.py "$@"
