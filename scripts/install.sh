#!/usr/bin/env bash
# Install evomerge, the search extra and the test tools into the current Python.
# torch comes first, pinned to the CPU build on this machine's disk: pyproject.toml only asks for
# torch>=2.1, which a torch already installed satisfies, so no CUDA wheel is pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
python -m pip install --quiet --disable-pip-version-check -e '.[test]'
