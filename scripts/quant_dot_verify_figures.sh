#!/usr/bin/env bash
# verify's figures on the bundled fixture for each LLM type, on both CPU roads for block-quantized
# weights: "quant" (src/quant/dot.rs: 8-bit activations and integer products, as llama.cpp;
# MMFUSER_QUANT_DOT=1) and "f32" (weights dequantized to f32; MMFUSER_QUANT_DOT=0, verify's
# default). Prints, per type and road: the exact-forward difference (0 for a correct file on
# either road: both sides take the same road), the quality figures against the float source,
# and the difference between the two roads' artefact logits (relative RMS).
# Usage: scripts/quant_dot_verify_figures.sh [path/to/mmfuser-convert]
set -euo pipefail
BIN=${1:-target/release/mmfuser-convert}
PY=${PY:-python3}
T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
CK=fixtures/tiny-llava-mmfuser; TOWER=fixtures/tiny-clip
"$BIN" hf-to-gguf "$CK" --vision-tower "$TOWER" --out-dir "$T" -q
F16=$T/tiny-llava-mmfuser-F16.gguf; MM=$T/mmproj-tiny-llava-mmfuser-F16.gguf
printf '%-7s %-5s %-11s %-11s %-11s %-11s %-6s %s\n' type road exact_rel kl_mean kl_max top1 passed roads_rel
for ty in Q8_0 Q6_K Q4_K_S Q4_K_M Q4_0; do
  "$BIN" quantize "$F16" --type "$ty" -o "$T/q-$ty.gguf" -q
  for road in quant f32; do
    if [ "$road" = f32 ]; then q=0; else q=1; fi
    MMFUSER_QUANT_DOT=$q "$BIN" verify "$CK" --vision-tower "$TOWER" --gguf "$T/q-$ty.gguf" --mmproj "$MM" \
      --json --device cpu --dump-logits "$T/d-$road" > "$T/r-$road.json" || true
  done
  "$PY" - "$ty" "$T" <<'PY'
import json, sys
import numpy as np
ty, t = sys.argv[1], sys.argv[2]
a = {road: np.load(f"{t}/d-{road}/artefact.npy").astype(np.float64) for road in ("quant", "f32")}
roads = np.sqrt(np.mean((a["quant"] - a["f32"]) ** 2) / np.mean(a["f32"] ** 2))
for road in ("quant", "f32"):
    r = json.load(open(f"{t}/r-{road}.json"))
    e, q = r["exact_logits"]["metrics"], r["quality_logits"]["kl"]
    print(f'{ty:7s} {road:5s} {e["rel_rms"]:<11.3e} {q["kl_mean"]:<11.4e} {q["kl_max"]:<11.4e} '
          f'{q["top1_agreement"]:<11.4f} {str(r["passed"]):6s} {roads:.3e}')
PY
done
