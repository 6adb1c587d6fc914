#!/usr/bin/env bash
# The device check of issue 26, for a tool that runs one bash command: the table of tools/gpu_check.py (its
# docstring says what each section measures, the sizes and the time budget). From the repository root, with the
# venv active or `python` on PATH:
#     bash tools/gpu_check.sh --json gpu_check.json     # on one CUDA GPU, under 8 minutes
#     bash tools/gpu_check.sh --dry-run                 # on the CPU, tiny sizes, the same code paths (~3 min)
# PYTHON=/path/to/python picks the interpreter (default: python, else python3, on PATH).
# Exit status 0 when every section passed, 1 otherwise (the table is printed either way).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$(command -v python || command -v python3)}"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # the source tree wins over an installed copy
export PYTHONUNBUFFERED=1
exec "$python" "$repo/tools/gpu_check.py" "$@"
