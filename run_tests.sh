#!/usr/bin/env bash
# Set up .venv (as run_train.sh does, plus pytest and hypothesis) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup_venv.sh test
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
