#!/usr/bin/env bash
# Compile-check every csrc/cuda/*.cu with nvcc, no GPU needed: sm_80 and sm_90a,
# every warning an error. Prints one line per file; exits non-zero on any error or warning.
# ptxas resource usage (-Xptxas -v: registers, shared memory, spills) goes to a log that is kept;
# spills are reported, not failed.
#
#   bash csrc/cuda/check_compile.sh            # from the repo root
#   NVCC=/path/to/nvcc JOBS=4 bash csrc/cuda/check_compile.sh
#   NVCC_TORCH_FLAGS="$(python -c 'from minigpt.attention import _build; print(*_build.torch_nvcc_flags())')" \
#       bash csrc/cuda/check_compile.sh
#
# OBJ_DIR: keep the compiled objects there (for csrc/cuda/sass_report.py --objects).
# NVCC_TORCH_FLAGS: the flags a torch build really passes (-D__CUDA_NO_HALF_OPERATORS__ ...,
# --use_fast_math, -std=c++20); .ci/run sets it. Without it: -std=c++17 -O3 only.
set -u -o pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root" || exit 2

if [[ -z "${NVCC:-}" ]]; then
  if command -v nvcc >/dev/null 2>&1; then NVCC="$(command -v nvcc)"; else NVCC=/usr/local/cuda/bin/nvcc; fi
fi
if [[ ! -x "$NVCC" ]]; then
  echo "check_compile: nvcc not found (set NVCC=...)" >&2
  exit 2
fi
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"

work="$(mktemp -d "${TMPDIR:-/tmp}/minigpt-cuda-check.XXXXXX")"
log="$work/ptxas.log"
trap 'rm -f "$work"/*.o' EXIT

archs=("sm_80:-gencode=arch=compute_80,code=sm_80" "sm_90a:-gencode=arch=compute_90a,code=sm_90a")
read -r -a torch_flags <<<"${NVCC_TORCH_FLAGS:--std=c++17 -O3}"
flags=("${torch_flags[@]}" -I csrc -Werror all-warnings -Xcompiler -Wall -Xcompiler -Werror -Xptxas -v)

shopt -s nullglob
files=(csrc/cuda/*.cu)
if (( ${#files[@]} == 0 )); then
  echo "check_compile: no csrc/cuda/*.cu files" >&2
  exit 2
fi

# One background job per (file, arch), at most JOBS at a time.
pids=()
for f in "${files[@]}"; do
  base="$(basename "$f" .cu)"
  for a in "${archs[@]}"; do
    name="${a%%:*}"
    gencode="${a#*:}"
    while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n || true; done
    ( "$NVCC" "${flags[@]}" "$gencode" -c "$f" -o "$work/$base.$name.o" >"$work/$base.$name.out" 2>&1
      echo $? >"$work/$base.$name.rc" ) &
    pids+=($!)
  done
done
wait "${pids[@]}" 2>/dev/null

status=0
: >"$log"
for f in "${files[@]}"; do
  base="$(basename "$f" .cu)"
  line="$f:"
  for a in "${archs[@]}"; do
    name="${a%%:*}"
    out="$work/$base.$name.out"
    rc="$(cat "$work/$base.$name.rc" 2>/dev/null || echo 1)"
    { echo "=== $f $name (rc=$rc)"; cat "$out"; } >>"$log"
    # ptxas -v lines are "info"; anything that says warning or error fails the check.
    warnings="$(grep -v 'ptxas info' "$out" | grep -ciE 'warning|error' || true)"
    kernels="$(grep -c 'Compiling entry function' "$out" || true)"
    maxreg="$(grep -oE 'Used [0-9]+ registers' "$out" | awk '{print $2}' | sort -n | tail -1)"
    spilled="$(grep -oE '[0-9]+ bytes spill stores' "$out" | awk '$1 > 0' | wc -l)"
    if [[ "$rc" != 0 || "$warnings" != 0 ]]; then
      status=1
      line+=" $name FAIL (rc=$rc, $warnings warning/error lines);"
    else
      line+=" $name ok ($kernels kernels, max ${maxreg:-0} regs, $spilled spilling);"
    fi
  done
  echo "$line"
done

if [[ -n "${OBJ_DIR:-}" ]]; then  # keep the objects (csrc/cuda/sass_report.py --objects)
  mkdir -p "$OBJ_DIR" && cp "$work"/*.o "$OBJ_DIR"/
fi
echo "ptxas resource usage: $log"
if grep -qE '[1-9][0-9]* bytes spill stores' "$log"; then
  echo "kernels that spill registers (not a failure):"
  awk '/^=== /{unit=$2" "$3} /Compiling entry function/{fn=$0}
       match($0, /[0-9]+ bytes spill stores/) && substr($0, RSTART, RLENGTH) + 0 > 0 {
         print "  " unit ": " fn " ->" substr($0, index($0, ":") + 1)}' "$log" |
    sed -E "s/ptxas info    : //g; s/Compiling entry function '([^']*)' for '[^']*'/\1/" |
    { command -v c++filt >/dev/null 2>&1 && c++filt || cat; }
fi
if (( status != 0 )); then
  echo "check_compile: FAILED (details in $log)" >&2
  grep -v 'ptxas info' "$log" | grep -iE -B2 -A3 'warning|error' | head -40 >&2
fi
exit "$status"
