#!/usr/bin/env bash
# The core install is the device side: a venv with costeer-sdk alone (no extras) must run
# a PersonalLLM over SessionRemote with a local model, against a `costeer serve` run
# from the full .venv. Run by scripts/test.sh after the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
core="$work/core-venv"
python3 -m venv "$core"
"$core/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
"$core/bin/python" -m pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
"$core/bin/python" -m pip install -q . 2>&1 | grep -v "is ignored" || true
"$core/bin/python" tests/core_client.py .venv/bin/python
