#!/usr/bin/env bash
# Set up, then lint, type-check and run the whole test suite (real-model tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check costeer_sdk tests bench examples
ruff format --check costeer_sdk tests bench examples
mypy
HF_HUB_OFFLINE=1 python -m pytest -ra "$@"
