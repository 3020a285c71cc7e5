#!/usr/bin/env bash
# The device check of issue 10, as one script for a GPU machine with torch preinstalled and no
# package registry: run from the repository root. Prints the gpu tests, the layer table (bf16,
# the named shapes, HF's Mixtral block where transformers is there), the language model's step
# and generation on CUDA, then where the time goes (scripts/gpu_profile.py, also with the Triton
# kernels off). Each part has its own time limit; logs go to $OUT when set.
#   usage: bash scripts/gpu_check.sh DATA [SECTIONS]
#   SECTIONS: any of tests,layer,lm,hf,profile,notriton (default: all)
set -uo pipefail
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
DATA=${1:?the tinyshakespeare text file}
SECTIONS=${2:-tests,layer,lm,hf,profile,notriton}
LOG=${OUT:-/tmp}
want() { [[ ",$SECTIONS," == *",$1,"* ]]; }
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0])"
python -c "import triton, transformers; print('triton', triton.__version__, 'transformers', transformers.__version__)"
if want tests; then
  timeout 130 python -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$LOG/tests.log" | tail -25
fi
if want layer; then
  timeout 120 python -m moekit bench --device cuda --shapes M,D,O,Q,B,C --dtypes bfloat16 \
    --activations swiglu --no-lm --rounds 5 2>&1 | tee "$LOG/layer.log" | grep -v "^shape "
fi
if want lm; then  # the bench's language-model table, 3 generation rounds (makeMoE: ~8 s a round)
  timeout 90 python - <<'PY' 2>&1 | tee "$LOG/lm.log"
from moekit.bench import format_lm_table, machine_line
from moekit.bench.lm import bench_generation, bench_train_step
print(machine_line())
lm = bench_train_step(rounds=5, steps=5, dtypes=["float32", "bfloat16"], device="cuda")
lm += bench_generation(tokens=200, rounds=3, device="cuda")
print(format_lm_table(lm))
PY
fi
if want hf; then  # transformers models' training step before and after moekit.hf.patch_model
  timeout 120 python scripts/hf_model_step.py --device cuda --dtype bfloat16 --seq 1024 2>&1 \
    | tee "$LOG/hf.log" | grep -v Warn
fi
if want profile; then
  timeout 200 python scripts/gpu_profile.py "$DATA" 2>&1 | tee "$LOG/profile.log"
fi
if want notriton; then  # the same eager paths on the torch twins: is Triton's launch cost it?
  MOEKIT_TRITON=0 timeout 90 python scripts/gpu_profile.py "$DATA" --shapes B --skip-compile \
    2>&1 | tee "$LOG/notriton.log"
fi
