#!/usr/bin/env bash
# The test command: sets up .venv if needed, then runs the whole suite on the CPU, one worker a core (at most 8;
# TEST_WORKERS=0 runs in this process, e.g. for --pdb). --dist loadfile keeps each file on one worker, so a module's
# fixtures (the export checkpoints, the SLURM cluster) are built once.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -n "${TEST_WORKERS:-auto}" --maxprocesses 8 --dist loadfile "${@:--q}"
