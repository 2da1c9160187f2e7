#!/usr/bin/env bash
# One GPU check: fills the GPU table of docs/PERFORMANCE.md on one H100/H200 in under 8 minutes.
#
#   tools/gpu_check.sh                                     # on the GPU machine, from the repository
#   MAE=/path/to/mae DATA=/path/to/images tools/gpu_check.sh
#   tools/gpu_check.sh --dry-run                           # the CPU, seconds: the same tables, tiny settings
#
# It runs tools/gpu_check.py (the rows and how each is taken are in its docstring): the training step in bf16,
# fp16 (GradScaler) and fp32 with and without TF32, MI-MAE against MAE, ours against the official step
# (tools/compare_official.py; needs MAE=, a checkout of facebookresearch/mae, e.g.
# `git clone https://github.com/facebookresearch/mae`; skipped without it), the data pipeline with 8 and 16 workers
# (tools/benchmark.py --mode data; on DATA=, an image folder, else on synthetic ImageNet-sized JPEGs), the peak
# memory of each step, and the compiled step. stdout: the markdown tables; stderr: the tools' own output.
# Without a CUDA GPU, or with $CI set, it runs the dry mode: CI never occupies a GPU with it.
# PYTHON= picks the interpreter (default: .venv/bin/python, else python); extra flags: tools/gpu_check.py --help.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python
exec "$PYTHON" tools/gpu_check.py "$@"
