#!/usr/bin/env bash
# verify's figures on the bundled fixture for each LLM type, with the quantized products of
# src/quant/dot.rs (8-bit activations, as llama.cpp) and with the old f32 road
# (default: weights dequantized to f32; MMFUSER_QUANT_DOT=1: quant::dot). Prints one line per type and road.
# Usage: scripts/quant_dot_verify_figures.sh [path/to/mmfuser-convert]
set -euo pipefail
BIN=${1:-target/release/mmfuser-convert}
T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
CK=fixtures/tiny-llava-mmfuser; TOWER=fixtures/tiny-clip
"$BIN" hf-to-gguf "$CK" --vision-tower "$TOWER" -o "$T" -q >/dev/null
F16=$T/tiny-llava-mmfuser-F16.gguf; MM=$T/mmproj-tiny-llava-mmfuser-F16.gguf
printf '%-7s %-5s %-12s %-12s %-12s %s\n' type road kl_mean kl_max top1_agree passed
for ty in Q8_0 Q6_K Q4_K_S Q4_K_M Q4_0; do
  "$BIN" quantize "$F16" --type "$ty" -o "$T/q-$ty.gguf" -q >/dev/null
  for road in quant f32; do
    if [ "$road" = f32 ]; then unset MMFUSER_QUANT_DOT; else export MMFUSER_QUANT_DOT=1; fi
    "$BIN" verify "$CK" --vision-tower "$TOWER" --gguf "$T/q-$ty.gguf" --mmproj "$MM" --json --device cpu \
      > "$T/r.json" || true
    python3 - "$ty" "$road" "$T/r.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[3])); l = r["logits"]
print(f'{sys.argv[1]:7s} {sys.argv[2]:5s} {l["kl_mean"]:<12.4e} {l.get("kl_max", float("nan")):<12.4e} '
      f'{str(l.get("top1_agreement", l.get("top1_agree", "?"))):12s} {r["passed"]}')
PY
  done
done
