#!/usr/bin/env bash
# The GPU rows of bench/RESULTS.md in one call on a CUDA machine without network:
# the flash-varlen check, then bench.train for lora, qlora and full (1B Llama shape, seq 2048, bf16).
#   ../shared/tools/offline-bundle.sh .gpu-bundle     # here: ray, deepspeed, bitsandbytes, liger, pydantic
#   OUT=/some/folder bash bench/gpu.sh [REPEAT] [RECORDS]   # there: logs and JSON lines under $OUT
# Env: MODES (default "lora qlora full"), PASSES (timed epochs per arm process, median taken:
# medians without reloading the 1B model), MODE_TIMEOUT (s per mode), SKIP_TESTS,
# OVERHEAD=1 (then bench.overhead --device cuda: Ray Train vs a plain process, about 280 s).
# Medians in one 15-minute lease: PASSES=3 MODE_TIMEOUT=170 bash bench/gpu.sh 1 800
set -uo pipefail
out=${OUT:?set OUT to a folder for the logs}
repeat=${1:-1}
records=${2:-3000}
if [[ -f .gpu-bundle/site.tar.xz ]]; then
  mkdir -p /tmp/site && tar -xJf .gpu-bundle/site.tar.xz -C /tmp/site
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 - <<'PY' 2>&1 | tee "$out/env.txt"
import importlib, torch
print(torch.cuda.get_device_name(), "torch", torch.__version__)
for name in ("transformers", "peft", "bitsandbytes", "liger_kernel", "triton", "accelerate"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as e:
        print(name, "MISSING", e)
PY
[[ -n ${SKIP_TESTS:-} ]] || timeout 90 python3 -m pytest -q -p no:cacheprovider tests/unit/train/test_attention.py tests/unit/train/test_fast_paths.py 2>&1 | tail -40 | tee "$out/attention_tests.txt"
for mode in ${MODES:-lora qlora full}; do
  timeout "${MODE_TIMEOUT:-150}" python3 -m bench.train --mode "$mode" --repeat "$repeat" --records "$records" \
    --passes "${PASSES:-1}" \
    --model-dir /tmp/llama-1b 2>&1 | tail -40 | tee "$out/$mode.txt"
done
if [[ -n ${OVERHEAD:-} ]]; then
  timeout "${OVERHEAD_TIMEOUT:-300}" python3 -m bench.overhead --device cuda --steps 30 --repeat 3 \
    --model-dir /tmp/llama-1b > "$out/overhead.log" 2>&1
  grep -a "step time\|overhead\"" "$out/overhead.log" | grep -v RayTrainWorker | tee "$out/overhead.txt"
fi
