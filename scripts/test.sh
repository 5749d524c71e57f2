#!/usr/bin/env bash
# Install, then run the test suite, one pytest-xdist worker per core (-n auto), each test file on one worker
# (--dist loadfile: the module-scoped fixtures, trained models among them, are built once). Arguments are
# passed on to pytest: `-m "not slow"` for the fast suite, `-n 0` to run in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m pytest -q -p no:cacheprovider -n auto --dist loadfile "$@"
