#!/usr/bin/env bash
# The main job on the bundled default: build the tiny demo models (cached in .cache/),
# evolve a merge of the two specialists, export it, and print the held-out comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python -m evolve.demo "$@"
