#!/usr/bin/env bash
# One-shot check of the CUDA kernels on a lent GPU (written for an H100/H200), in at most 8
# minutes, everything into one output folder:
#
#   bash csrc/cuda/device_check.sh [OUT_DIR]       # from the repo root; default $OUT, else
#                                                  # ./device-check
#
#   1. the GPU (nvidia-smi, torch)                                            gpu.txt
#   2. the build: MINIGPT_CUDA=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0,
#      python setup.py build_ext --inplace                                    build.log
#   3. the CUDA tests (pytest -m cuda) with the default kernel set (v2)      tests-v2.log
#      and, if those fail, with MINIGPT_CUDA_KERNELS=v1                       tests-v1.log
#   4. compute-sanitizer memcheck and racecheck on one small case            sanitizer-*.log
#      (bf16, GQA, causal, ALiBi and a window, Tq 200 != Tk 300: masked and mask-free steps of
#      the backward's 128-key tiles, forward + backward); then the same case with the dK/dV
#      kernel's small tiles forced (MINIGPT_CUDA_BWD_TILES=small), its first-use self-check
#      against float64 on, a failed check an error                           small-tiles.log
#   5. the profile: bf16 and fp16, D = 64 and 128, T = 1024-8192, causal, ext (v2 and v1)
#      against SDPA, side by side in one run; SDPA's kernel names via torch.profiler; ratios
#      printed as a table                                                     profile.json,
#                                                                             profile.log
#   summary.txt: one line per step with its status and seconds.
#
# Needs a CUDA torch, nvcc of torch's CUDA major version and the dev requirements (pytest).
# Each step has its own time limit (timeout), so the whole stays under 8 minutes; a step that
# fails or times out is recorded and the next one runs. Exit status: 0 when every step passed.
set -u -o pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root" || exit 2
out="${1:-${OUT:-$root/device-check}}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
PY="${PYTHON:-python}"
summary="$out/summary.txt"
: >"$summary"
status=0
start_all=$SECONDS

# step NAME LIMIT_S LOG CMD...: run CMD with a time limit, its output to LOG and the terminal.
step() {
  local name="$1" limit="$2" log="$3"
  shift 3
  local t0=$SECONDS rc
  echo "== $name (limit ${limit}s)"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  tail -n 25 "$log"
  local verdict=ok
  if ((rc == 124 || rc == 137)); then verdict="TIMED OUT"; elif ((rc != 0)); then verdict="FAILED (rc=$rc)"; fi
  if [[ "$verdict" != ok ]]; then status=1; fi
  printf '%-28s %-16s %4ds  %s\n' "$name" "$verdict" $((SECONDS - t0)) "$(basename "$log")" | tee -a "$summary"
  return "$rc"
}

export MINIGPT_CACHE_DIR="${MINIGPT_CACHE_DIR:-$out/cache}"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's minigpt, built in place
export MINIGPT_REQUIRE_EXT=1

# 1. The GPU.
{
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
  "$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "|",
    torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))' 2>&1
  (command -v nvcc >/dev/null && nvcc --version | tail -2) || echo "no nvcc on PATH"
} | tee "$out/gpu.txt"

# 2. The build (CUDA kernels for sm_90 only: the quickest build that runs here).
step build 240 "$out/build.log" env MINIGPT_CUDA=1 MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 \
  "$PY" setup.py build_ext --inplace
built=$?
if ((built == 0)); then
  "$PY" -c 'import json, minigpt; r = minigpt.attention_backends(); print(json.dumps(r, default=str, indent=1))' \
    >"$out/backends.json" 2>&1 || status=1
fi

if ((built == 0)); then
  # 3. The CUDA tests with the default kernel set; v1 only if they fail (which set to keep).
  if ! step "tests (v2 kernels)" 180 "$out/tests-v2.log" \
    "$PY" -m pytest -q -x -m cuda -p no:cacheprovider tests; then
    step "tests (v1 kernels)" 120 "$out/tests-v1.log" env MINIGPT_CUDA_KERNELS=v1 \
      "$PY" -m pytest -q -x -m cuda -p no:cacheprovider tests
  fi

  # 4. compute-sanitizer on one small case (forward + backward, every term, atomic dQ).
  cat >"$out/sanitizer_case.py" <<'PYEOF'
import torch
from minigpt import attention
torch.manual_seed(0)
q = torch.randn(1, 4, 200, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k, v = (torch.randn(1, 2, 300, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(2))
slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], device="cuda")
for kw in ({}, {"alibi_slopes": slopes, "window": 23}):
    out = attention(q, k, v, causal=True, backend="ext", **kw)
    out.backward(torch.randn_like(out))
torch.cuda.synchronize()
print("case ran")
PYEOF
  sanitizer="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"
  for tool in memcheck racecheck; do
    step "compute-sanitizer $tool" 75 "$out/sanitizer-$tool.log" env MINIGPT_SELF_CHECK=0 \
      "$sanitizer" --tool "$tool" --error-exitcode 9 "$PY" "$out/sanitizer_case.py"
  done
  # The small dK/dV tiles (GPUs with 99 KB of shared memory per block), forced on this one.
  step "small dK/dV tiles" 60 "$out/small-tiles.log" env MINIGPT_CUDA_BWD_TILES=small \
    "$PY" -W error::RuntimeWarning "$out/sanitizer_case.py"

  # 5. The profile, ext (v2 and v1) against SDPA, side by side.
  left=$((470 - (SECONDS - start_all)))
  if ((left > 30)); then
    step profile "$left" "$out/profile.log" "$PY" csrc/cuda/device_profile.py --out "$out"
  else
    echo "profile skipped: ${left}s left of the 8 minutes" | tee -a "$summary"
    status=1
  fi
fi

echo "== summary ($((SECONDS - start_all)) s; everything in $out)"
cat "$summary"
exit "$status"
