#!/usr/bin/env bash
# Everything this project checks on a GPU, in one run of at most 10 minutes on one H100/H200
# (torch 2.11, no internet): the GPU-marked tests (tests/test_gpu.py: bf16 parity with transformers,
# attention-backend gradients, FSDP bf16 training runs with compile off and on), then
# bench/throughput.py --device cuda --dtype bf16 for the four GPT-2 sizes, without and with
# activation checkpointing. Every result is JSON in OUT_DIR (device name, torch version, command).
#
#   bash bench/gpu_check.sh OUT_DIR
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir=${1:?usage: bash bench/gpu_check.sh OUT_DIR}
if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: needs CUDA (torch.cuda.is_available() is False here); nothing was run" >&2
    exit 2
fi
mkdir -p "$out_dir"
out_dir=$(cd "$out_dir" && pwd)
python - "$out_dir" <<'PY'
import json, subprocess, sys, time, torch
sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version(), "gpus": torch.cuda.device_count(), "commit": sha,
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}, open(f"{sys.argv[1]}/environment.json", "w"), indent=2)
PY
status=0
echo "== GPU tests"
GPU_CHECK_OUT="$out_dir" timeout 300 python -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider \
    --junitxml="$out_dir/gpu_tests.xml" 2>&1 | tee "$out_dir/gpu_tests.log" || status=1
for checkpointing in off on; do
    echo "== bench/throughput.py, activation checkpointing $checkpointing"
    flag=$([ "$checkpointing" = on ] && echo --activation_checkpointing)
    timeout 150 python bench/throughput.py --device cuda --dtype bf16 $flag \
        --json "$out_dir/throughput_checkpointing_$checkpointing.json" --results_dir "$out_dir" 2>&1 \
        | tee "$out_dir/throughput_checkpointing_$checkpointing.log" || status=1
done
echo "gpu_check: results in $out_dir (exit $status)"
exit $status
