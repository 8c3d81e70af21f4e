#!/usr/bin/env bash
# Create .venv at the repository root and install mtg_core and the five experts into it.
# Idempotent: when nothing it installs from has changed, a second call installs nothing.
# Usage: scripts/setup_venv.sh [test]   ("test" adds pytest and hypothesis)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"
extra=${1:-}
stamp="$venv/.mtg-installed${extra:+-$extra}"
want=$(cat "$root"/pyproject.toml "$root"/mtg_expert_*/pyproject.toml "$0" | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$venv/bin/python" ] || "${PYTHON:-python3}" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  # A bare "torch" requirement pulls a multi-GB CUDA build: only a GPU machine should get one.
  if [ -n "${TORCH_SPEC:-}" ]; then
    torch_spec=$TORCH_SPEC
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    torch_spec="torch>=2.4"
  else
    torch_spec="torch==2.13.0"  # on this project's CPU machines: the CPU build, from local disk
  fi
  echo "setup: installing $torch_spec into .venv" >&2
  "${pip[@]}" "$torch_spec"
fi
echo "setup: installing mtg_core and the experts into .venv" >&2
"${pip[@]}" --config-settings editable_mode=compat -e "$root${extra:+[$extra]}"
for expert in "$root"/mtg_expert_*/; do
  "${pip[@]}" --no-deps --config-settings editable_mode=compat -e "$expert"
done
echo "$want" > "$stamp"
