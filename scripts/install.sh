#!/usr/bin/env bash
# Install evomerge and its dependencies into the current Python (CPU torch 2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python -m pip install --quiet --disable-pip-version-check -e '.[test]'
