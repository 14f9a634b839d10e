#!/usr/bin/env bash
# bench.sh: end-to-end speed and memory of mmfuser-convert on a synthetic real-size checkpoint,
# next to llama.cpp's own tools (issue "Real scale"). Run on demand, never in CI (7B: ~45 GB of
# scratch disk, 10-30 minutes).
#
#   scripts/bench.sh                 # 7B, scratch in target/bench, cleaned up at the end
#   SIZE=13b KEEP=1 scripts/bench.sh # keep the scratch files
#   SKIP_MICRO=1 scripts/bench.sh    # no quantizer micro-bench
#
# Steps (each timed with /usr/bin/time -v: wall seconds and peak RSS):
#   0. quantizer micro-bench: `cargo test --release --lib quant_speed -- --ignored --nocapture`
#      (a 4096 x 11008 matrix, one call per block type; MB/s of f32 input).
#   1. dd with O_DIRECT: sequential write then read of DD_GB GiB (default 4) in the scratch dir:
#      the disk's bandwidth, the yardstick for "fraction of disk bandwidth".
#   2. `mmfuser-convert synth --size $SIZE --llama-view` (checkpoint + CLIP + plain-llama view).
#   3. ours: `hf-to-gguf CKPT --vision-tower CLIP` -> F16 LLM + mmproj.
#   4. ours: `quantize --bits 4 CKPT --vision-tower CLIP` (one pass, Q4_K_M, no F16 intermediate).
#   5. llama.cpp: convert_hf_to_gguf.py on the plain-llama view -> F16.
#   6. llama.cpp: llama_model_quantize (via ../shared/oracle/quantize_with_llamacpp.py) of that
#      F16 file -> Q4_K_M, --threads $THREADS.
#   7. ours: `quantize --bits 4` of the same llama.cpp F16 file; the output must be byte-identical
#      to step 6's (printed under the table).
# Outputs are deleted as soon as they have been measured, to bound disk use.
#
# Table columns: seconds; GB moved (bytes read + written, 1e9); GB/s = GB / seconds; peak RSS;
# "vs llama.cpp" = our seconds / llama.cpp's seconds for the same job (F16 conversion; Q4_K_M:
# our one pass against llama.cpp convert + quantize); "disk frac" = (read_GB / dd_read_GBps +
# write_GB / dd_write_GBps) / seconds, i.e. 1.0 = as fast as the disk allows.
# Under the table, for SIZE=7b and 13b: each goal of the issue with "met" or "MISSED".
# Caveat: page cache. With DROP_CACHES=1 (root, writable /proc/sys/vm/drop_caches) caches are
# dropped before every step; otherwise a step may read data still cached from the previous one.
# Every step starts after a `sync` (untimed): when synth still wrote through the page cache, the
# first step after it competed with the writeback of 27 GB and read at a fifth of the disk's speed.
# synth now writes with direct I/O, so nothing it wrote is cached: later steps read cold input
# (DROP_CACHES=1 makes that so for every step, llama.cpp's included).
#
# Environment: SIZE (7b|13b|tiny, default 7b), BENCH_DIR (default target/bench), ORACLE_VENV
# (default ~/oracle-venv), THREADS (default nproc), DD_GB (default 4), KEEP=1, SKIP_MICRO=1,
# SKIP_LLAMACPP=1, DROP_CACHES=1, SEED (default 0), BIN (a binary to measure instead of building
# this checkout's: two versions in one session), HASH=1 (print the sha256 of our outputs: same
# seed, same bytes, whichever version wrote them).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
SIZE="${SIZE:-7b}"
BENCH_DIR="${BENCH_DIR:-$REPO/target/bench}"
ORACLE_VENV="${ORACLE_VENV:-$HOME/oracle-venv}"
THREADS="${THREADS:-$(nproc)}"
DD_GB="${DD_GB:-4}"
SEED="${SEED:-0}"
PY="$ORACLE_VENV/bin/python"
LLAMA_CONVERT="$ORACLE_VENV/src/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py"
LLAMA_QUANT="$REPO/../shared/oracle/quantize_with_llamacpp.py"
[ -f "$LLAMA_QUANT" ] || LLAMA_QUANT=/work/shared/oracle/quantize_with_llamacpp.py
BIN="${BIN:-}"
TIME=/usr/bin/time

if [ ! -x "$TIME" ]; then
  echo "bench: /usr/bin/time missing; trying apt-get install -y time" >&2
  apt-get install -y time >/dev/null 2>&1 || { echo "bench: install GNU time (apt-get install -y time)" >&2; exit 1; }
fi

cleanup() {
  if [ "${KEEP:-0}" != 1 ]; then rm -rf "$BENCH_DIR"/synth "$BENCH_DIR"/out-* "$BENCH_DIR"/dd.tmp; fi
}
trap cleanup EXIT

mkdir -p "$BENCH_DIR"
echo "== bench: size $SIZE, scratch $BENCH_DIR, threads $THREADS, $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM"
df -h "$BENCH_DIR" | tail -1
case "$SIZE" in 7b) need=45;; 13b) need=85;; *) need=1;; esac
avail=$(df -BG --output=avail "$BENCH_DIR" | tail -1 | tr -dc 0-9)
if [ "$avail" -lt "$need" ]; then echo "bench: need ~${need} GB free in $BENCH_DIR, have ${avail} GB" >&2; exit 1; fi

if [ -z "$BIN" ]; then
  echo "== building (release)"
  cargo build --release --quiet
  BIN="$REPO/target/release/mmfuser-convert"
fi
echo "== binary: $BIN"
HASHES=()   # "sha256  step/file" of each output, with HASH=1
hash_outputs() { # step dir-or-file
  [ "${HASH:-0}" = 1 ] || return 0
  local f
  for f in $(find "$2" -name '*.gguf' | sort); do HASHES+=("$(sha256sum "$f" | cut -d' ' -f1)  $1/$(basename "$f")"); done
}

ROWS=()   # name|seconds|read_bytes|write_bytes|rss_kb
drop_caches() {
  if [ "${DROP_CACHES:-0}" = 1 ]; then sync; echo 3 > /proc/sys/vm/drop_caches || echo "bench: cannot drop caches" >&2; fi
}
bytes_of() { # total size of the given files/dirs (missing ones count 0)
  local t=0 s
  for p in "$@"; do
    if [ -e "$p" ]; then s=$(du -sb --apparent-size "$p" | cut -f1); t=$((t + s)); fi
  done
  echo "$t"
}
# measure NAME READ_BYTES OUTPUT_PATH -- CMD...   (OUTPUT_PATH: file or dir whose size is "written")
measure() {
  local name="$1" rb="$2" outp="$3"; shift 4
  # Flush what earlier steps left dirty, so a step does not pay for its predecessor's writeback.
  # Not timed. Our commands fsync their own outputs (timed); llama.cpp's converter does not, so
  # its dirty pages are flushed here, before the next step.
  sync
  drop_caches
  local log="$BENCH_DIR/time-$name.txt"
  echo "== $name: $*"
  local t0 t1
  t0=$(date +%s.%N)
  if ! "$TIME" -v -o "$log" "$@" > "$BENCH_DIR/log-$name.txt" 2>&1; then
    echo "bench: $name failed; tail of its log:" >&2; tail -20 "$BENCH_DIR/log-$name.txt" >&2; exit 1
  fi
  t1=$(date +%s.%N)
  local secs rss wb
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.2f", b-a}')
  rss=$(awk -F': ' '/Maximum resident set size/{print $2}' "$log")
  wb=$(bytes_of "$outp")
  ROWS+=("$name|$secs|$rb|$wb|$rss")
  awk -v s="$secs" -v rb="$rb" -v wb="$wb" -v rss="$rss" 'BEGIN{printf "   %s s, read %.2f GB, wrote %.2f GB, peak RSS %.2f GiB\n", s, rb/1e9, wb/1e9, rss/1048576}'
}

# ---- 0. micro-bench
rm -f "$BENCH_DIR/micro.txt"
if [ "${SKIP_MICRO:-0}" != 1 ]; then
  echo "== quantizer micro-bench (4096 x 11008, MB/s of f32 input; see src/quant/tests.rs quant_speed)"
  cargo test --release --quiet --lib quant_speed -- --ignored --nocapture 2>&1 | grep -E 'MB/s' | tee "$BENCH_DIR/micro.txt" || echo "   (quant_speed test not found or failed)"
fi

# ---- 1. dd
echo "== dd O_DIRECT, ${DD_GB} GiB"
DDF="$BENCH_DIR/dd.tmp"
t0=$(date +%s.%N); dd if=/dev/zero of="$DDF" bs=64M count=$((DD_GB * 16)) oflag=direct conv=fsync status=none; t1=$(date +%s.%N)
DD_W=$(awk -v a="$t0" -v b="$t1" -v n="$DD_GB" 'BEGIN{printf "%.3f", n*1073741824/1e9/(b-a)}')
t0=$(date +%s.%N); dd if="$DDF" of=/dev/null bs=64M iflag=direct status=none; t1=$(date +%s.%N)
DD_R=$(awk -v a="$t0" -v b="$t1" -v n="$DD_GB" 'BEGIN{printf "%.3f", n*1073741824/1e9/(b-a)}')
rm -f "$DDF"
echo "   write $DD_W GB/s, read $DD_R GB/s"

# ---- 2. synth
S="$BENCH_DIR/synth"
measure synth 0 "$S" -- "$BIN" synth --size "$SIZE" "$S" --seed "$SEED" --llama-view -q
CK="$S/checkpoint"; CLIP="$S/clip"; LL="$S/llama"
CK_BYTES=$(bytes_of "$CK"/*.safetensors "$CLIP"/model.safetensors)
LL_BYTES=$(bytes_of "$LL"/*.safetensors)

# ---- 3. ours F16
O="$BENCH_DIR/out-f16"
measure ours_f16 "$CK_BYTES" "$O" -- "$BIN" hf-to-gguf "$CK" --vision-tower "$CLIP" --out-dir "$O" -q
hash_outputs ours_f16 "$O"
rm -rf "$O"

# ---- 4. ours Q4_K_M one pass
O="$BENCH_DIR/out-q4"
measure ours_q4km "$CK_BYTES" "$O" -- "$BIN" quantize --bits 4 "$CK" --vision-tower "$CLIP" --out-dir "$O" -q --threads "$THREADS"
hash_outputs ours_q4km "$O"
rm -rf "$O"
[ "${KEEP:-0}" = 1 ] || rm -rf "$CK"

# ---- 5./6. llama.cpp
if [ "${SKIP_LLAMACPP:-0}" != 1 ]; then
  O="$BENCH_DIR/out-llamacpp"; mkdir -p "$O"
  F="$O/llama-F16.gguf"
  measure llamacpp_f16 "$LL_BYTES" "$F" -- "$PY" "$LLAMA_CONVERT" "$LL" --outtype f16 --outfile "$F"
  [ "${KEEP:-0}" = 1 ] || rm -rf "$LL"
  F_BYTES=$(bytes_of "$F")
  measure llamacpp_q4km "$F_BYTES" "$O/llama-Q4_K_M.gguf" -- "$PY" "$LLAMA_QUANT" "$F" --types Q4_K_M --threads "$THREADS" --outdir "$O" --stem llama
  # 7. ours on llama.cpp's own F16 file: same job as step 6, and its bytes must equal llama.cpp's.
  measure ours_quant_gguf "$F_BYTES" "$O/ours-Q4_K_M.gguf" -- "$BIN" quantize --bits 4 "$F" -o "$O/ours-Q4_K_M.gguf" -q --threads "$THREADS"
  if cmp -s "$O/llama-Q4_K_M.gguf" "$O/ours-Q4_K_M.gguf"; then
    IDENTICAL="identical to llama.cpp's ($(sha256sum "$O/ours-Q4_K_M.gguf" | cut -c1-16)..., $(stat -c %s "$O/ours-Q4_K_M.gguf") bytes)"
  else
    IDENTICAL="DIFFERENT from llama.cpp's: $(cmp "$O/llama-Q4_K_M.gguf" "$O/ours-Q4_K_M.gguf" 2>&1 | head -1 || true)"
  fi
  echo "   ours_quant_gguf Q4_K_M: $IDENTICAL"
  rm -rf "$O"
fi

# ---- table
echo
echo "== results ($SIZE, $(nproc) cores, dd O_DIRECT: write $DD_W GB/s, read $DD_R GB/s, page cache dropped before each step: ${DROP_CACHES:-0})"
printf '%-16s %9s %9s %8s %10s %12s %10s\n' step seconds GB_moved GB/s peakRSS_GiB vs_llama.cpp disk_frac
declare -A SEC
for r in "${ROWS[@]}"; do IFS='|' read -r n s rb wb rss <<<"$r"; SEC[$n]=$s; done
for r in "${ROWS[@]}"; do
  IFS='|' read -r n s rb wb rss <<<"$r"
  ratio="-"
  case "$n" in
    ours_f16) [ -n "${SEC[llamacpp_f16]:-}" ] && ratio=$(awk -v a="$s" -v b="${SEC[llamacpp_f16]}" 'BEGIN{printf "%.2f", a/b}');;
    ours_q4km) [ -n "${SEC[llamacpp_q4km]:-}" ] && ratio=$(awk -v a="$s" -v b="${SEC[llamacpp_f16]}" -v c="${SEC[llamacpp_q4km]}" 'BEGIN{printf "%.2f (vs conv+quant)", a/(b+c)}');;
    ours_quant_gguf) [ -n "${SEC[llamacpp_q4km]:-}" ] && ratio=$(awk -v a="$s" -v b="${SEC[llamacpp_q4km]}" 'BEGIN{printf "%.2f", a/b}');;
  esac
  awk -v n="$n" -v s="$s" -v rb="$rb" -v wb="$wb" -v rss="$rss" -v ratio="$ratio" -v dr="$DD_R" -v dw="$DD_W" 'BEGIN{
    gb=(rb+wb)/1e9; ideal=rb/1e9/dr + wb/1e9/dw;
    printf "%-16s %9.1f %9.2f %8.3f %10.2f %12s %10.2f\n", n, s, gb, gb/s, rss/1048576, ratio, ideal/s }'
done
if [ -n "${IDENTICAL:-}" ]; then echo "ours_quant_gguf output: $IDENTICAL"; fi

# ---- goals (issue "Real scale"): 7B F16 <= 28 s with peak RSS <= 512 MiB, 7B one-pass Q4_K_M
# <= 150 s; 13B F16 and Q4_K_M with peak RSS <= 1 GiB.
goal() { # step, max seconds ("-": none), max peak RSS in KiB
  local r n s rb wb rss
  for r in "${ROWS[@]}"; do
    IFS='|' read -r n s rb wb rss <<<"$r"
    [ "$n" = "$1" ] || continue
    awk -v n="$n" -v s="$s" -v rss="$rss" -v ms="$2" -v mr="$3" 'BEGIN{
      ok = (ms == "-" || s <= ms) && rss <= mr
      printf "goal %-10s %6.1f s (max %s), peak RSS %4.0f MiB (max %.0f): %s\n", n, s, ms, rss/1024, mr/1024, ok ? "met" : "MISSED" }'
  done
}
case "$SIZE" in
  7b) echo; goal ours_f16 28 524288; goal ours_q4km 150 1048576;;
  13b) echo; goal ours_f16 - 1048576; goal ours_q4km - 1048576;;
esac
if [ ${#HASHES[@]} -gt 0 ]; then echo; echo "sha256 of the outputs:"; printf '%s\n' "${HASHES[@]}"; fi
if [ -f "$BENCH_DIR/micro.txt" ]; then echo; echo "quantizer micro-bench (threads: see src/quant/tests.rs):"; cat "$BENCH_DIR/micro.txt"; fi
