#!/bin/bash
# One device call: GPU tests, then the bench, then the PyTorch anchor. Logs under $OUT.
set -u
G=.dev/gpu
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# The test binaries run the CLI at the path they were built with.
mkdir -p /work/main/target/release target/release
ln -sf "$PWD/$G/mmfuser-convert" /work/main/target/release/mmfuser-convert 2>/dev/null
[ -e target/release/mmfuser-convert ] || ln -sf "$PWD/$G/mmfuser-convert" target/release/mmfuser-convert
echo "== repo $PWD"
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu.txt"
export RUST_BACKTRACE=1
t0=$(date +%s)
echo "== cuda_nvrtc"; timeout 45 $G/integration cuda_nvrtc:: --test-threads=1 --nocapture > "$OUT/tests_nvrtc.log" 2>&1; echo "rc=$?"; grep -E "^test |test result|panicked|NVRTC" "$OUT/tests_nvrtc.log" | head -20
echo "== cuda_gpu ($(( $(date +%s) - t0 )) s)"; timeout 190 $G/integration cuda_gpu:: --ignored --test-threads=1 --nocapture > "$OUT/tests_gpu.log" 2>&1; echo "rc=$?"
grep -E "FAIL|panicked|test result|^test " "$OUT/tests_gpu.log" | head -40
echo "== generate cuda ($(( $(date +%s) - t0 )) s)"; timeout 60 $G/integration generate::cuda --ignored --test-threads=1 --nocapture > "$OUT/tests_generate.log" 2>&1; echo "rc=$?"
grep -E "FAIL|panicked|test result|^test " "$OUT/tests_generate.log" | head -10
echo "== bench ($(( $(date +%s) - t0 )) s)"; timeout 110 $G/cuda_bench --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1; echo "rc=$?"
PY=/opt/torch/.venv/bin/python3; [ -x $PY ] || PY=python3
echo "== torch ($(( $(date +%s) - t0 )) s)"; PYTHONUNBUFFERED=1 timeout 110 $PY $G/torch_anchor.py > "$OUT/torch.log" 2>&1; echo "rc=$?"
echo "== done ($(( $(date +%s) - t0 )) s)"
echo "---- verify parity"; sed -n '/case .*cpu .*cuda/,/test result\|test verify/p' "$OUT/tests_gpu.log" | head -14
echo "---- whole model (Exact)"; grep -E "\[Exact\] (logits|image embeds|text-only)" "$OUT/tests_gpu.log" | head -30
echo "---- bench"; cat "$OUT/bench.log" | tail -80
echo "---- torch"; tail -20 "$OUT/torch.log"
