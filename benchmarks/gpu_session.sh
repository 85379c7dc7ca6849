#!/usr/bin/env bash
# What only a CUDA machine can show, in as few calls as possible: the test suite with the Triton
# kernel compiled for the GPU (not interpreted), then the benchmarks on the GPU.
#
#   bash benchmarks/gpu_session.sh            # tests + op benchmark (fits one 10-minute call)
#   bash benchmarks/gpu_session.sh merge      # the merge benchmark with --device cuda
#   bash benchmarks/gpu_session.sh lora       # the LoRA benchmark with --device cuda
#
# Logs and result rows go to $OUT when it is set (the device tool's folder), else benchmarks/results.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
dest="${OUT:-benchmarks/results}"
mkdir -p "$dest"
stage="${1:-tests-op}"

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv >"$dest/gpu-info.csv"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" >>"$dest/gpu-info.csv"

case "$stage" in
  tests-op)
    python3 -m pytest -q tests -p no:cacheprovider 2>&1 | tail -n 40 >"$dest/gpu-tests.log"
    python3 benchmarks/bench_ext_sub.py --out-dir "$dest" 2>&1 | grep -v '^W' >"$dest/gpu-bench-op.log"
    ;;
  merge)
    python3 benchmarks/bench_merge.py --device cuda --layers 2,8 --cache warm --repeat 3 --results "$dest" 2>&1 | tail -n 40 >"$dest/gpu-bench-merge.log"
    ;;
  lora)
    python3 benchmarks/bench_lora.py --device cuda --results "$dest/lora-cuda.json" 2>&1 | tail -n 40 >"$dest/gpu-bench-lora.log"
    ;;
  *)
    echo "unknown stage $stage (tests-op, merge or lora)" >&2
    exit 2
    ;;
esac
