#!/usr/bin/env bash
# Creates .venv and installs the project with its test tools.
# torch and torchvision are pinned as a pair that imports together (constraints/torch.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -c constraints/torch.txt -e ".[dev]"
