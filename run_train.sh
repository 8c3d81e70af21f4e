#!/usr/bin/env bash
# Train one expert (default REASON) with the memory-optimised QLoRA recipe; extra arguments go to mtg-train.
# Usage: ./run_train.sh [EXPERT | --all] [mtg-train options...]   e.g. ./run_train.sh EXPLAIN --max-samples 16
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup_venv.sh
case "${1:-}" in
  --all | ALL | all) shift; exec .venv/bin/mtg-train --all "$@" ;;
  "" | -*) exec .venv/bin/mtg-train --expert REASON "$@" ;;
  *) expert=$1; shift; exec .venv/bin/mtg-train --expert "$expert" "$@" ;;
esac
