#!/usr/bin/env python3
"""Interop checks against llama.cpp itself (run by hand before closing an issue; too slow to build in CI).

Needs the oracle venv of ../shared/oracle/README.md (torch, transformers, gguf 0.19.0, llama-cpp-python 0.3.36):

    ORACLE_VENV=~/oracle-venv  $ORACLE_VENV/bin/python scripts/interop_llamacpp.py [--keep DIR]

What it checks (every reference number comes from third-party code):
 1. llama.cpp loads our F32 LLM GGUF of the fixture (f32 KV cache); its logits on the text-only prefix of
    the prompt match transformers' float64 reference (fixtures/reference/text_only_logits.npy) within
    relative RMS 1e-5 (names, permutation, metadata and tokenizer proven together). Same for F16 (looser:
    the weights are rounded).
 2. For Q8_0, Q4_0, Q4_K_S, Q4_K_M, Q6_K: our `quantize` of our F32 GGUF and llama.cpp's llama_model_quantize
    of the same file are byte-identical files; so is our one-pass checkpoint -> TYPE path.
 3. llama.cpp loads our Q8_0 and Q4_K_M files and generates a few tokens from them.
Exit status 1 if any check fails.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORACLE = os.path.join(os.path.dirname(ROOT), "shared", "oracle")
BIN = os.path.join(ROOT, "target", "release", "mmfuser-convert")
FIX = os.path.join(ROOT, "fixtures")
TYPES = ["Q8_0", "Q4_0", "Q4_K_S", "Q4_K_M", "Q6_K"]
failures = []


def run(*cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        print(r.stdout, r.stderr, file=sys.stderr)
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    return r.stdout


def check(name, ok, detail):
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    if not ok:
        failures.append(name)


def rel_rms(a, b):
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return float(np.sqrt(((a - b) ** 2).mean() / (b ** 2).mean()))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", help="work in this directory and keep it")
    a = ap.parse_args()
    py = sys.executable
    run("cargo", "build", "--release", "--quiet", cwd=ROOT)
    work = a.keep or tempfile.mkdtemp(prefix="mmfuser-interop-")
    os.makedirs(work, exist_ok=True)
    ck, tower = os.path.join(FIX, "tiny-llava-mmfuser"), os.path.join(FIX, "tiny-clip")
    ids = os.path.join(FIX, "reference", "text_only_ids.json")
    ref = np.load(os.path.join(FIX, "reference", "text_only_logits.npy"))

    for outtype, bound in (("f32", 1e-5), ("f16", 1e-2)):
        run(BIN, "hf-to-gguf", ck, "--vision-tower", tower, "--outtype", outtype, "--out-dir", work, "-q")
        f = os.path.join(work, f"tiny-llava-mmfuser-{outtype.upper()}.gguf")
        out = os.path.join(work, f"lcpp-{outtype}.npy")
        run(py, os.path.join(ORACLE, "llamacpp_logits.py"), f, "--ids-file", ids, "--out", out)
        got = np.load(out)
        e = rel_rms(got, ref)
        top1 = float((got.argmax(1) == ref.argmax(1)).mean())
        check(f"llama.cpp logits, our {outtype.upper()} GGUF vs transformers f64", e <= bound,
              f"relative RMS {e:.3e} (bound {bound:g}), max |diff| {np.abs(got - ref).max():.3e}, top-1 agreement {top1:.3f}")

    f32 = os.path.join(work, "tiny-llava-mmfuser-F32.gguf")
    refdir = os.path.join(work, "llamacpp")
    run(py, os.path.join(ORACLE, "quantize_with_llamacpp.py"), f32, "--types", ",".join(TYPES), "--outdir", refdir, "--stem", "ref")
    for t in TYPES:
        ours = os.path.join(work, f"ours-{t}.gguf")
        run(BIN, "quantize", f32, "--type", t, "-o", ours, "-q")
        theirs = os.path.join(refdir, f"ref-{t}.gguf")
        same = open(ours, "rb").read() == open(theirs, "rb").read()
        check(f"quantize {t} (F32 GGUF) vs llama_model_quantize", same, f"{os.path.getsize(ours)} bytes, files {'identical' if same else 'DIFFER'}")
        direct = os.path.join(work, "direct")
        run(BIN, "quantize", ck, "--vision-tower", tower, "--type", t, "--out-dir", direct, "-q")
        d = os.path.join(direct, f"tiny-llava-mmfuser-{t}.gguf")
        same = open(d, "rb").read() == open(theirs, "rb").read()
        check(f"quantize {t} (checkpoint, one pass) vs llama_model_quantize of the F32 route", same, "files identical" if same else "files DIFFER")

    # 4. Our artefact logits (verify's forward on the GGUF) vs transformers on the same file's dequantized
    #    weights (llama_ref.py), and vs llama.cpp's logits on the same file, text-only prompt.
    for t, f in (("F16", os.path.join(work, "tiny-llava-mmfuser-F16.gguf")), ("Q8_0", os.path.join(work, "ours-Q8_0.gguf")), ("Q4_K_M", os.path.join(work, "ours-Q4_K_M.gguf"))):
        mm = os.path.join(work, "mmproj-tiny-llava-mmfuser-F16.gguf")
        dump = os.path.join(work, f"dump-{t}")
        r = subprocess.run([BIN, "verify", ck, "--vision-tower", tower, "--gguf", f, "--mmproj", mm, "--input-ids", ids,
                            "--dump-logits", dump, "--tolerance", "100", "--json"], capture_output=True, text=True)
        if r.returncode != 0:
            print(r.stdout, r.stderr, file=sys.stderr)
            raise SystemExit("verify failed to run")
        ours = np.load(os.path.join(dump, "artefact.npy"))
        deq = os.path.join(work, f"deq-{t}.npy")
        run(py, os.path.join(ORACLE, "llama_ref.py"), f, "--ids-file", ids, "--out", deq)
        ref_deq = np.load(deq)
        e = rel_rms(ours, ref_deq)
        check(f"our {t} artefact logits vs transformers on the dequantized {t} weights", e <= 1e-5, f"relative RMS {e:.3e} (bound 1e-5)")
        lc = os.path.join(work, f"lcpp-{t}.npy")
        run(py, os.path.join(ORACLE, "llamacpp_logits.py"), f, "--ids-file", ids, "--out", lc)
        lcl = np.load(lc).astype(np.float64)
        o = ours.astype(np.float64)
        def lsm(x):
            x = x - x.max(1, keepdims=True)
            return x - np.log(np.exp(x).sum(1, keepdims=True))
        kl = float((np.exp(lsm(o)) * (lsm(o) - lsm(lcl))).sum(1).mean())
        check(f"our {t} artefact logits vs llama.cpp on the same file", kl <= 5e-4, f"mean KL {kl:.3e} (bound 5e-4)")

    import llama_cpp
    for t in ("Q8_0", "Q4_K_M"):
        m = llama_cpp.Llama(model_path=os.path.join(work, f"ours-{t}.gguf"), n_ctx=128, verbose=False, seed=0)
        r = m.create_completion("A chat between", max_tokens=8, temperature=0.0)
        txt = r["choices"][0]["text"]
        n = r["usage"]["completion_tokens"]
        check(f"llama.cpp generates from our {t}", n > 0, f"{n} tokens: {txt!r}")

    if not a.keep:
        shutil.rmtree(work)
    print(json.dumps({"failures": failures}))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
