#!/usr/bin/env bash
# The main job: set up, then a personalized generation on the embedded default models:
# the cloud-only answer, then the CoSteer answer, each streamed as it is decided, then
# the stats of both. The first run assembles and converts the models (a few minutes);
# later runs load the cached conversion.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/costeer demo "$@"
