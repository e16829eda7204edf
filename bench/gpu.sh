#!/usr/bin/env bash
# The GPU rows of bench/RESULTS.md in one call on a CUDA machine without network.
#   bench/offline-bundle.sh .gpu-bundle     # here: ray, deepspeed, bitsandbytes, liger, pydantic, trl
#   OUT=/some/folder bash bench/gpu.sh [REPEAT] [RECORDS]   # there: logs and JSON lines under $OUT
# ROWS says which rows run (default "1b"; "1b 8b" both; "none" neither):
#   1b  the flash-varlen check, then bench.train for MODES (default "lora qlora full") at the 1B Llama
#       shape, 2048 tokens x 8 sequences per step, against BASELINES (default "trl,unsloth"; hf is
#       the padded floor, measured in sessions 5-9), RECORDS records (default 3000)
#   8b  bench.train --shape 8b (Llama-3.1-8B, random init) for lora and qlora against BASELINES on
#       RECORDS_8B records (default 900): QLoRA with gradient checkpointing in every arm, LoRA with it
#       only on a card under 100 GiB; then bench.longest: the longest single sequence each of ft-ray
#       and trl trains for 8B QLoRA, doubling from 8k, the allocator capped at an 80 GB card (79 GiB)
# Env: PASSES (timed epochs per arm process, median taken), PEER_ATTENTION (the trl arm's attention:
# auto = flash_attention_2 where installed, else sdpa; or flex_attention), MODE_TIMEOUT (s per 1b mode, 170),
# TIMEOUT_8B (s per 8b mode, 150), LONGEST_TIMEOUT (s, 170), SKIP_TESTS, OVERHEAD=1 (then
# bench.overhead --device cuda: Ray Train vs a plain process, about 280 s), OFFLOAD=1 (then the demo's
# LoRA run under fsdp with distributed.fsdp.offload: cpu on one GPU worker, 20 steps, about 60 s: its
# process group gloo beside NCCL, the CPU shards' gradient norm and checkpoint; compare its losses with
# the same run without offload, printed after it).
# One 540-s call each: ROWS=8b bash bench/gpu.sh 1; PASSES=3 ROWS=1b bash bench/gpu.sh 1 800.
# Tried on a CPU first (tiny and scaled-down 8B shapes, every step the same):
#   CPU=1 ROWS="1b 8b" OUT=/tmp/gpu-dry bash bench/gpu.sh 1 40
set -uo pipefail
out=${OUT:?set OUT to a folder for the logs}
repeat=${1:-1}
records=${2:-3000}
if [[ -f .gpu-bundle/site.tar.xz ]]; then
  mkdir -p /tmp/site && tar -xJf .gpu-bundle/site.tar.xz -C /tmp/site
  # the bundle's fallbacks (bench/offline-bundle.sh) join it only where the host's Python lacks them
  env -u PYTHONPATH python3 - <<'PY'
import csv, importlib.util, pathlib, shutil
fallback = pathlib.Path("/tmp/site/_fallback")
for info in sorted(fallback.glob("*.dist-info")) if fallback.is_dir() else []:
    # the top-level modules the distribution installed (its RECORD), e.g. protobuf's google.protobuf
    paths = [row[0] for row in csv.reader((info / "RECORD").read_text().splitlines()) if row]
    tops = {p.split("/")[0] for p in paths if not p.startswith(("../", info.name, "bin/"))}
    modules = {t.removesuffix(".py") for t in tops}
    if "google" in modules:
        modules = modules - {"google"} | {"google.protobuf"}
    def present(module):
        try:
            return importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            return False
    if not any(present(m) for m in modules):
        print(f"gpu.sh: the host lacks {', '.join(sorted(modules))}; taken from the bundle")
        for name in [*tops, info.name]:
            if not (pathlib.Path("/tmp/site") / name).exists():
                shutil.move(str(fallback / name), "/tmp/site/")
PY
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
baselines=${BASELINES:-trl,unsloth}
if [[ -n ${CPU:-} ]]; then
  # the same steps small enough for a CPU: the tiny Llama for 1b, an 8B config with 2 narrow layers
  device=(--device cpu --max-seq-len 512 --micro-batch 2)
  small8b=(--model-setting num_hidden_layers=2 --model-setting hidden_size=256 --model-setting intermediate_size=512
           --model-setting num_attention_heads=4 --model-setting num_key_value_heads=2 --model-setting head_dim=64)
  model_1b=() records_8b=${RECORDS_8B:-40} longest=(--device cpu --start 256 --limit 1024) model_dir=/tmp/bench-cpu
else
  device=() small8b=() model_1b=(--model-dir /tmp/llama-1b) records_8b=${RECORDS_8B:-900}
  longest=(--start 8192 --limit 262144 --memory-gib 79) model_dir=/tmp
fi
python3 - <<'PY' 2>&1 | tee "$out/env.txt"
import importlib, torch
print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA", "torch", torch.__version__)
for name in ("transformers", "peft", "bitsandbytes", "liger_kernel", "triton", "accelerate", "trl", "datasets",
             "pyarrow", "huggingface_hub", "flash_attn", "unsloth"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as e:
        print(name, "MISSING", type(e).__name__, str(e)[:200])
PY
for row in ${ROWS:-1b}; do
  case $row in
  1b)
    [[ -n ${SKIP_TESTS:-} ]] || timeout 90 python3 -m pytest -q -p no:cacheprovider tests/unit/train/test_attention.py \
      tests/unit/train/test_fast_paths.py 2>&1 | tail -40 | tee "$out/attention_tests.txt"
    for mode in ${MODES:-lora qlora full}; do
      timeout "${MODE_TIMEOUT:-170}" python3 -m bench.train --mode "$mode" --repeat "$repeat" --records "$records" \
        --passes "${PASSES:-1}" --baselines "$baselines" --peer-attention "${PEER_ATTENTION:-auto}" "${device[@]}" \
        "${model_1b[@]}" 2>&1 | tail -40 | tee "$out/$mode.txt"
    done
    ;;
  8b)
    checkpointing=()  # 8B LoRA's activations at 8 x 2048 tokens fill an 80 GB card, not a 141 GB one
    if [[ -z ${CPU:-} ]] && python3 -c 'import sys, torch; sys.exit(torch.cuda.get_device_properties(0).total_memory > 100 * 2**30)'; then
      checkpointing=(--train gradient_checkpointing=true)
    fi
    for mode in lora qlora; do
      [[ $mode == qlora ]] && checkpointing=(--train gradient_checkpointing=true)
      timeout "${TIMEOUT_8B:-150}" python3 -m bench.train --shape 8b "${small8b[@]}" --model-dir "$model_dir/llama-8b" \
        --mode "$mode" --repeat 1 --records "$records_8b" --passes 1 --baselines "$baselines" \
        --peer-attention "${PEER_ATTENTION:-auto}" "${device[@]}" \
        "${checkpointing[@]}" 2>&1 | tail -40 | tee "$out/8b-$mode.txt"
    done
    timeout "${LONGEST_TIMEOUT:-170}" python3 -m bench.longest --shape 8b "${small8b[@]}" --model-dir "$model_dir/llama-8b" \
      --mode qlora --arms ft-ray,trl "${longest[@]}" 2>&1 | tail -20 | tee "$out/8b-longest.txt"
    ;;
  none) ;;  # only what OFFLOAD / OVERHEAD ask for
  *) echo "gpu.sh: unknown row $row (1b, 8b, none)" >&2; exit 2 ;;
  esac
done
if [[ -n ${OFFLOAD:-} ]]; then
  on_gpu=(--set distributed.use_gpu=true --set distributed.num_workers=1)
  [[ -n ${CPU:-} ]] && on_gpu=()
  for offload in cpu none; do
    WANDB_MODE=offline timeout "${OFFLOAD_TIMEOUT:-150}" python3 -m ft_ray train configs/tiny-cpu.yaml --force-new \
      --set run_name="fsdp-offload-$offload" --set storage.path=/tmp/ftray-runs --set distributed.strategy=fsdp \
      --set distributed.fsdp.offload=$offload "${on_gpu[@]}" --set train.max_steps=20 --set train.eval_every=20 \
      --set train.checkpoint_every=20 --set eval.after_training=false 2>&1 | tail -8 | tee "$out/fsdp-offload-$offload.txt"
    grep -h '"loss"' "/tmp/ftray-runs/fsdp-offload-$offload/metrics.jsonl" | cut -c1-120 >> "$out/fsdp-offload-$offload.txt"
  done
fi
if [[ -n ${OVERHEAD:-} ]]; then
  timeout "${OVERHEAD_TIMEOUT:-300}" python3 -m bench.overhead --device cuda --steps 30 --repeat 3 \
    --model-dir /tmp/llama-1b > "$out/overhead.log" 2>&1
  grep -a "step time\|overhead\"" "$out/overhead.log" | grep -v RayTrainWorker | tee "$out/overhead.txt"
fi
