#!/usr/bin/env bash
# Prepare the GPU check bundle (issue "CUDA"): builds here (no CUDA toolkit needed), copies the CLI,
# the integration test binary, the bench and the PyTorch anchor into .dev/gpu/ (ignored by git), ready to
# be carried to a GPU machine and run there as `bash scripts/gpu_run.sh` (logs under $OUT):
#   scripts/gpu_prepare.sh   # then, on the GPU box, from the repo root: bash scripts/gpu_run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.dev/' .git/info/exclude 2>/dev/null || echo '/.dev/' >> .git/info/exclude
cargo build --release --examples
G=.dev/gpu; mkdir -p $G
# The test binary of target $1 (cargo also lists the CLI it builds for the tests: pick by name).
bin_of() { cargo test --release --no-run --test "$1" --message-format=json 2>/dev/null \
  | grep "\"name\":\"$1\"" | grep -o '"executable":"[^"]*"' | tail -1 | cut -d'"' -f4; }
cp target/release/mmfuser-convert $G/
# One integration binary (tests/tests.rs); gpu_run.sh picks the modules by filter.
cp "$(bin_of integration)" $G/integration
cp target/release/examples/cuda_bench $G/
cp ../shared/reference/torch_anchor.py $G/
cp scripts/gpu_run.sh $G/run.sh
# Refuse a bundle whose test binary is not the integration binary (it lists these modules' tests).
for t in cuda_nvrtc cuda_gpu generate; do
  [ "$($G/integration --list 2>/dev/null | grep -c "^$t::.*: test$")" -gt 0 ] || { echo "gpu_prepare: $G/integration has no $t tests" >&2; exit 1; }
done
ls -la $G
