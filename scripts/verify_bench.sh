#!/usr/bin/env bash
# verify_bench.sh: verify's verdict, time and peak memory at real size (a benchmark, not a test).
#
#   1. `synth --size $SIZE` (bf16 checkpoint + f16 CLIP tower, seeded random values);
#   2. `quantize --bits 4` in one pass from the checkpoint (Q4_K_M LLM, F16 mmproj);
#   3. `verify` of that correct artefact with the default probe: must pass (exit 0);
#   4. a copy of the LLM file with ONE byte changed inside one Q4_K block of blk.0.attn_q.weight
#      (a nibble, not a scale; no manifest beside the copy): must fail (exit 3), the tensor check
#      naming that tensor and block;
# and prints, for 3 and 4: exit code, wall seconds, peak RSS, the exact-forward margins
# (artefact vs expected model, relative RMS of logits / image embeddings; 0 for a correct file)
# and the quality KL mean.
#
# Environment: SIZE (7b|13b|tiny, default 7b), BENCH_DIR (default target/verify-bench; about
# 19 GB for 7b), BIN (default target/release/mmfuser-convert), PY (a python with the `gguf`
# package, default python3), KEEP=1 keeps the files, EXTRA (more verify flags, e.g. "--exact-only").
set -euo pipefail
SIZE="${SIZE:-7b}"
BENCH_DIR="${BENCH_DIR:-target/verify-bench}"
BIN="${BIN:-target/release/mmfuser-convert}"
PY="${PY:-python3}"
TIME=/usr/bin/time
[ -x "$TIME" ] || { echo "verify_bench: needs GNU time at /usr/bin/time (apt-get install time)" >&2; exit 1; }
[ -x "$BIN" ] || { echo "verify_bench: build first: cargo build --release" >&2; exit 1; }
"$PY" -c 'import gguf' 2>/dev/null || { echo "verify_bench: PY=$PY has no gguf package (pip install gguf==0.19.0)" >&2; exit 1; }
mkdir -p "$BENCH_DIR"
S="$BENCH_DIR/synth"; Q="$BENCH_DIR/q4"
cleanup() { [ "${KEEP:-0}" = 1 ] || rm -rf "$S" "$Q" "$BENCH_DIR"/corrupt.gguf; }
trap cleanup EXIT

step() { # name, command...
  local name=$1; shift
  local t0 t1 rc=0
  t0=$(date +%s.%N)
  "$TIME" -v -o "$BENCH_DIR/time-$name.txt" "$@" > "$BENCH_DIR/out-$name.txt" 2> "$BENCH_DIR/err-$name.txt" || rc=$?
  t1=$(date +%s.%N)
  local rss
  rss=$(awk -F': ' '/Maximum resident set size/{print $2}' "$BENCH_DIR/time-$name.txt")
  awk -v n="$name" -v a="$t0" -v b="$t1" -v r="$rss" -v rc="$rc" \
    'BEGIN{printf "%-16s exit %d  %7.1f s  peak RSS %.2f GiB\n", n, rc, b-a, r/1048576}' | tee -a "$BENCH_DIR/summary.txt"
  return 0
}

: > "$BENCH_DIR/summary.txt"
echo "== $SIZE, $(nproc) cores, $(date -u +%FT%TZ), $("$BIN" --version)" | tee -a "$BENCH_DIR/summary.txt"
[ -d "$S/checkpoint" ] || step synth "$BIN" synth --size "$SIZE" "$S" -q
[ -f "$Q/manifest-ok" ] || { step quantize "$BIN" quantize --bits 4 "$S/checkpoint" --vision-tower "$S/clip" --out-dir "$Q" -q && touch "$Q/manifest-ok"; }
LLM=$(ls "$Q"/*Q4_K_M.gguf); MM=$(ls "$Q"/mmproj-*.gguf)

# The corrupted copy: one byte of the quants of block 3 of blk.0.attn_q.weight (Q4_K blocks are
# 144 bytes: d, dmin, 12 scale bytes, then 128 bytes of nibbles).
cp "$LLM" "$BENCH_DIR/corrupt.gguf"
"$PY" - "$BENCH_DIR/corrupt.gguf" <<'PY'
import sys, gguf
path = sys.argv[1]
r = gguf.GGUFReader(path)
t = next(t for t in r.tensors if t.name == "blk.0.attn_q.weight")
assert t.tensor_type == gguf.GGMLQuantizationType.Q4_K, t.tensor_type
off = t.data_offset + 3 * 144 + 16 + 5
with open(path, "r+b") as f:
    f.seek(off); b = f.read(1); f.seek(off); f.write(bytes([b[0] ^ 0x5A]))
print(f"corrupted byte {off} (block 3 of {t.name})")
PY

V=(verify "$S/checkpoint" --vision-tower "$S/clip" --mmproj "$MM" --json ${EXTRA:-})
step verify_correct "$BIN" "${V[@]}" --gguf "$LLM"
step verify_corrupt "$BIN" "${V[@]}" --gguf "$BENCH_DIR/corrupt.gguf"
for n in verify_correct verify_corrupt; do
  "$PY" - "$n" "$BENCH_DIR/out-$n.txt" <<'PY' | tee -a "$BENCH_DIR/summary.txt"
import json, sys
name, path = sys.argv[1], sys.argv[2]
try:
    r = json.load(open(path))
except Exception as e:
    print(f"{name}: no report ({e})"); sys.exit(0)
def rel(row):
    return f'{row["metrics"]["rel_rms"]:.3e}' if row["status"] == "compared" else "not compared"
kl = r["quality_logits"].get("kl")
print(f'{name}: passed={r["passed"]}  positions {r["n_positions"]}  exact logits {rel(r["exact_logits"])}'
      f'  exact image {rel(r["exact_image_embeddings"])}  bound {r["exact_bound_rel_rms"]:.0e}'
      + (f'  quality KL mean {kl["kl_mean"]:.4f}' if kl else '  quality not compared')
      + f'  {r["seconds"]:.1f} s')
for why in r["reasons"][:3]:
    print(f"   reason: {why[:300]}")
PY
done
