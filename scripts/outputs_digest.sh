#!/usr/bin/env bash
# outputs_digest.sh: sha256 of everything the converter writes for the bundled fixtures, so that a
# refactor can show its outputs are byte-identical (run it with the old and the new binary, diff).
#
#   BIN=target/release/mmfuser-convert scripts/outputs_digest.sh > after.txt
#   BIN=/tmp/old-binary scripts/outputs_digest.sh > before.txt; diff before.txt after.txt
#
# Prints one line per output: `<sha256>  <job>/<file>` for every .gguf, and `<sha256>  <job>/<file>
# tensors` for each manifest's tensor records (the manifest's tensor list as canonical JSON; the rest
# of a manifest holds paths and timings that differ from run to run).
# Jobs: hf-to-gguf of every fixture layout and dtype, quantize (one pass and from the F16 GGUF) to each
# named type, the CLIP tower quantized, and `synth --size tiny`.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${BIN:-$REPO/target/release/mmfuser-convert}"
PY="${PY:-python3}"
W="$(mktemp -d)"
trap 'rm -rf "$W"' EXIT
F="$REPO/fixtures"
CK="$F/tiny-llava-mmfuser"
CLIP=(--vision-tower "$F/tiny-clip")

run() { # job-name, args...
  local job="$1"; shift
  "$BIN" "$@" -q > /dev/null
}
run f16 hf-to-gguf "$CK" "${CLIP[@]}" --out-dir "$W/f16"
run f32 hf-to-gguf "$CK" "${CLIP[@]}" --out-dir "$W/f32" --outtype f32
run bf16 hf-to-gguf "$CK" "${CLIP[@]}" --out-dir "$W/bf16" --outtype bf16
run bin hf-to-gguf "$F/tiny-llava-mmfuser-bin" "${CLIP[@]}" --out-dir "$W/bin"
L="$F/layouts"
run hf hf-to-gguf "$L/tiny-llava-hf" --out-dir "$W/layout-hf"
run hf-sd hf-to-gguf "$L/tiny-llava-hf-sd" --out-dir "$W/layout-hf-sd"
run l15-t5 hf-to-gguf "$L/tiny-llava-1.5" --vision-tower "$L/tiny-clip-t5" --out-dir "$W/layout-1.5-t5"
run l15-model hf-to-gguf "$L/tiny-llava-1.5" --vision-tower "$L/tiny-clip-model" --out-dir "$W/layout-1.5-model"
LLM="$(ls "$W"/f16/*.gguf | grep -v mmproj | head -1)"
MMP="$(ls "$W"/f16/mmproj-*.gguf | head -1)"
for t in Q8_0 Q4_0 Q4_K_S Q4_K_M Q6_K F16; do
  mkdir -p "$W/gguf-$t"
  run "gguf-$t" quantize "$LLM" --type "$t" -o "$W/gguf-$t/out.gguf"
  run "pass-$t" quantize "$CK" "${CLIP[@]}" --type "$t" --out-dir "$W/pass-$t"
done
run bits8 quantize "$CK" "${CLIP[@]}" --bits 8 --out-dir "$W/bits8"
mkdir -p "$W/mmproj-q8"
run mmproj-q8 quantize "$MMP" --vision-type Q8_0 -o "$W/mmproj-q8/out.gguf"
run pass-clip-q8 quantize "$CK" "${CLIP[@]}" --bits 4 --vision-type Q8_0 --out-dir "$W/pass-clip-q8"
run synth synth --size tiny "$W/synth" --seed 3
"$BIN" hf-to-gguf "$W/synth/checkpoint" --vision-tower "$W/synth/clip" --out-dir "$W/synth-f16" -q > /dev/null

cd "$W"
find . -name '*.gguf' -o -name '*.safetensors' | sort | while read -r f; do
  echo "$(sha256sum "$f" | cut -d' ' -f1)  ${f#./}"
done
find . -name '*manifest*.json' | sort | while read -r m; do
  h="$("$PY" - "$m" <<'EOF'
import hashlib, json, sys
doc = json.load(open(sys.argv[1]))
recs = []
def walk(x):
    if isinstance(x, dict):
        for k, v in x.items():
            if k == "tensors" and isinstance(v, list):
                recs.append(v)
            else:
                walk(v)
    elif isinstance(x, list):
        for v in x:
            walk(v)
walk(doc)
print(hashlib.sha256(json.dumps(recs, sort_keys=True).encode()).hexdigest(), sum(len(r) for r in recs))
EOF
)"
  echo "$h  ${m#./} tensors"
done
