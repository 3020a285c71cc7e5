#!/usr/bin/env bash
# The device check of issue 10, as one script for a GPU machine with torch preinstalled and no
# package registry: run from the repository root with PYTHONPATH=src. Prints the gpu tests,
# then the layer table (bf16, the named shapes, HF's Mixtral block where transformers is there)
# and the language model's step and generation on CUDA.
set -uo pipefail
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"
python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -15
python -m moekit bench --device cuda --shapes M,D,O,Q,B,C --dtypes bfloat16 --activations swiglu --no-lm --rounds 5
python -m moekit bench --device cuda --shapes "" --dtypes float32 --rounds 5
