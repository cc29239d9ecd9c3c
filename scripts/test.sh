#!/usr/bin/env bash
# Set up, then lint, type-check, run the whole test suite (real-model tests and the
# LangChain standard suites included) and build the docs strictly.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
ruff format --check .
mypy
mypy integrations/langchain-costeer/langchain_costeer
HF_HUB_OFFLINE=1 python -m pytest -ra "$@"
bash scripts/core_check.sh  # the core install alone steers a remote cloud
NO_MKDOCS_2_WARNING=1 mkdocs build --strict --site-dir "$(mktemp -d)"
