#!/usr/bin/env bash
# Creates .venv and installs the project with its test tools.
# On a CPU machine that has the local CPU torch wheel, torch is pinned to it
# (constraints/cpu.txt) so pip never pulls the CUDA build; elsewhere pip takes
# the registry's torch.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
constraint=()
if .venv/bin/python -m pip install -q --dry-run --no-deps "torch==2.13.0+cpu" >/dev/null 2>&1; then
    constraint=(-c constraints/cpu.txt)
fi
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q "${constraint[@]}" -e ".[dev]"
