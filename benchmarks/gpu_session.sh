#!/usr/bin/env bash
# What only a CUDA machine can show, in one call of at most 7 minutes: the CUDA tests (the Triton kernel compiled for
# the GPU, not interpreted; the engine with --device cuda; LoRA on CUDA; a tensor past 2³¹ elements), then the op's
# bandwidth, a LLaMA-13B-shaped merge in bounded GPU memory against its pipelined I/O floor, and LoRA on CUDA.
# Every stage runs under its own `timeout`, so one slow stage cannot eat the others' time.
#
#   OUT=/some/folder bash benchmarks/gpu_session.sh        # everything (6 min 50 s at most: 20 + 140 + 90 + 120 + 40 s)
#   OUT=/some/folder bash benchmarks/gpu_session.sh tests  # one stage: info, tests, op, merge or lora
#
# Each stage's log and result files go to a work folder; at the end (or on any exit) they are packed into
# $OUT/gpu-session.tar.gz beside $OUT/stages.txt (one line per stage: name, exit code, seconds), so that few
# files come back whatever the device tool's limit on the number of files. Every number the benchmarks measure is
# appended (by _common.record, as on any machine) to $OUT/results.csv; back home,
#   python benchmarks/results_table.py --add OUT/results.csv
# appends those lines to benchmarks/results/results.csv and regenerates RESULTS.md's tables. Without $OUT, the
# lines go straight to benchmarks/results/results.csv and the rest to benchmarks/results.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
dest="${OUT:-benchmarks/results}"
mkdir -p "$dest"
export EXTSUB_RESULTS_CSV="$PWD/$dest/results.csv"
case "$dest" in /*) EXTSUB_RESULTS_CSV="$dest/results.csv" ;; esac
work="$(mktemp -d "${TMPDIR:-/tmp}/extsub-gpu-session.XXXXXX")"
scratch="$(mktemp -d "${TMPDIR:-/tmp}/extsub-gpu-scratch.XXXXXX")"  # generated checkpoints, never packed
only="${1:-all}"
: >"$dest/stages.txt"

pack() {
  rm -rf "$scratch"
  tar -czf "$dest/gpu-session.tar.gz" -C "$work" . 2>/dev/null
}
trap pack EXIT

# stage NAME SECONDS COMMAND...: run COMMAND under a timeout (SIGINT first, SIGKILL 10 s later), log to NAME.log.
stage() {
  local name=$1 seconds=$2
  shift 2
  if [ "$only" != all ] && [ "$only" != "$name" ]; then
    return 0
  fi
  local start=$SECONDS
  timeout --signal=INT --kill-after=10 "$seconds" "$@" >"$work/$name.log" 2>&1
  local code=$?
  echo "$name exit=$code seconds=$((SECONDS - start)) limit=$seconds" | tee -a "$dest/stages.txt"
}

# The device, the versions and the code, for every figure's row in RESULTS.md.
stage info 20 bash -c 'date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
  python3 -c "import torch, triton; print(\"torch\", torch.__version__, \"triton\", triton.__version__, torch.cuda.get_device_name())"
  git log -1 --format="commit %H %cd" 2>/dev/null || true'
# Every CUDA test of the op, the engine (pinned buffers, side stream, the writer's event), LoRA and the scan on CUDA;
# test_kernels_ext_sub.py's 2³¹-element case and the float64 oracle on a sample are among them.
stage tests 140 python3 -m pytest -q -m gpu -p no:cacheprovider tests -rfEs --durations=15
# The op on LLaMA-7B/13B shapes, bf16 and fp32: against a device copy of the same bytes, warmed torch.compile of the
# closed form, and the eager reference.
stage op 90 python3 benchmarks/bench_ext_sub.py --device cuda --out-dir "$work" --name op-cuda
# A few LLaMA-13B-shaped layers generated on the machine's local disk: peak GPU memory against the largest tensor at
# two layer counts (flat in the count), time against the pipelined I/O floor measured in the same run.
stage merge 120 python3 benchmarks/bench_merge.py --device cuda --model llama-13b --layers 1,3 \
  --runs floor,sub,ext-sub --cache warm --repeat 1 --results "$work" --tag llama-13b --workdir "$scratch"
stage lora 40 python3 benchmarks/bench_lora.py --device cuda --results "$work/lora-cuda.json"
exit 0
