#!/usr/bin/env python3
"""CPU speed of our runtime next to llama.cpp's on the same LLM GGUF, in one run (a benchmark).

    ORACLE_VENV=~/oracle-venv  $ORACLE_VENV/bin/python scripts/cpu_speed.py LLM.gguf MMPROJ.gguf \
        [--threads 2] [--decode 32] [--text-positions N] [--kv-cache f32|f16] [--bin BIN]
        [--verify CHECKPOINT [--vision-tower DIR]]

1. llama.cpp (llama-cpp-python, n_threads = n_threads_batch = --threads, n_batch 512): evaluates as
   many text positions as our prompt has (image + template + question), then decodes --decode
   tokens one at a time; prints prefill and decode tokens/s (the model load is timed apart).
2. ours: `generate --json --device cpu --temp 0 --max-tokens N` on the bundled probe image and
   "Describe the image." (or, with --text-positions N, N text ids and no image) with
   RAYON_NUM_THREADS = --threads; its own prefill / decode tokens/s
   (the image encoding, CLIP + fuser + projector, is reported apart, as image_seconds).
3. the ratios ours / llama.cpp (>= 1 means at least as fast).
4. with --verify: our default `verify --device cpu` of LLM.gguf + MMPROJ.gguf against CHECKPOINT (its
   seconds, each step's, and the peak RSS), over llama.cpp's evaluation of the same number of
   positions measured in step 1 (the CPU-speed issue's "verify <= 3.8x one evaluation").
Token ids for llama.cpp are arbitrary valid ids: speed does not depend on which.
Both timed runs start with the GGUF files in the page cache (read once before each): llama.cpp's
load, which is not timed, reads them before its evaluation, and a box that reclaims idle page
cache would otherwise charge the disk to whichever runs first.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def warm(*paths):
    """Read the files once, so that they are in the page cache."""
    for path in paths:
        with open(path, "rb") as f:
            while f.read(1 << 24):
                pass


def ours(args):
    cmd = [args.bin, "generate", "--gguf", args.llm, "--mmproj", args.mmproj,
           "--max-tokens", str(args.decode + 1), "--temp", "0", "--device", "cpu", "--json",
           "--kv-cache", args.kv_cache]
    if args.text_positions:
        # A text-only prompt of that many arbitrary valid ids (BOS first), no image.
        ids = os.path.join(tempfile.mkdtemp(), "ids.json")
        with open(ids, "w") as f:
            json.dump([1] + [3 + (i * 7919) % 31997 for i in range(args.text_positions - 1)], f)
        cmd += ["--input-ids", ids]
    else:
        cmd += ["--image", os.path.join(ROOT, "fixtures", "reference", "image.png"),
                "--prompt", "Describe the image."]
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    warm(args.llm, args.mmproj)
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.exit(f"generate failed ({r.returncode}): {r.stderr[-2000:]}")
    rep = json.loads(r.stdout)
    rep["wall_seconds"] = time.time() - t0
    return rep


def verify(args):
    cmd = [args.bin, "verify", "--gguf", args.llm, "--mmproj", args.mmproj, "--device", "cpu",
           "--json", args.verify]
    if args.vision_tower:
        cmd += ["--vision-tower", args.vision_tower]
    env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
    r = subprocess.run(["/usr/bin/time", "-f", "%M"] + cmd, capture_output=True, text=True, env=env)
    if r.returncode not in (0, 3):
        sys.exit(f"verify failed ({r.returncode}): {r.stderr[-2000:]}")
    rep = json.loads(r.stdout)
    rep["peak_rss_kib"] = int(r.stderr.strip().splitlines()[-1])
    return rep


def llamacpp(args, n_prompt):
    from llama_cpp import Llama
    warm(args.llm)
    t0 = time.time()
    llm = Llama(model_path=args.llm, n_ctx=n_prompt + args.decode + 8, n_batch=512, n_ubatch=512,
                n_threads=args.threads, n_threads_batch=args.threads, logits_all=False,
                verbose=False)
    load = time.time() - t0
    nv = llm.n_vocab()
    ids = [1] + [3 + (i * 7919) % (nv - 3) for i in range(n_prompt - 1)]
    t0 = time.time()
    llm.eval(ids)
    prefill = time.time() - t0
    t0 = time.time()
    for i in range(args.decode):
        llm.eval([3 + (200 + i) % (nv - 3)])
    decode = time.time() - t0
    return {"load_seconds": load, "prefill_seconds": prefill, "n_prompt": n_prompt,
            "prefill_tps": n_prompt / prefill, "decode_tps": args.decode / decode}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("llm")
    ap.add_argument("mmproj")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode", type=int, default=32,
                    help="decode steps timed (a short decode is mostly noise on a shared box)")
    ap.add_argument("--text-positions", type=int, default=0,
                    help="a text-only prompt of this many positions instead of image + question "
                         "(decode speed at a short context)")
    ap.add_argument("--kv-cache", default="f32", choices=["f32", "f16"],
                    help="our KV cache type (llama.cpp's here is f16, its default)")
    ap.add_argument("--verify", metavar="CHECKPOINT",
                    help="also time our verify of the two files against this checkpoint")
    ap.add_argument("--vision-tower", metavar="DIR", help="the CLIP directory, for --verify")
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "mmfuser-convert"))
    args = ap.parse_args()

    o = ours(args)
    p, d = o["prefill"], o["decode"]
    n_prompt = p["positions"]
    print(f"ours       prefill {n_prompt} positions {p['seconds']:.1f} s ({p['tokens_per_second']:.2f} tok/s)"
          f", decode {d['positions']} tokens {d['tokens_per_second']:.2f} tok/s, image {o['image_seconds']:.1f} s"
          f", peak RSS {o['peak_rss_bytes'] / 2**30:.2f} GiB, wall {o['wall_seconds']:.1f} s")
    l = llamacpp(args, n_prompt)
    print(f"llama.cpp  prefill {n_prompt} positions {l['prefill_seconds']:.1f} s ({l['prefill_tps']:.2f} tok/s)"
          f", decode {args.decode} tokens {l['decode_tps']:.2f} tok/s, load {l['load_seconds']:.1f} s")
    print(f"ratio ours/llama.cpp: prefill {p['tokens_per_second'] / l['prefill_tps']:.2f}x, "
          f"decode {d['tokens_per_second'] / l['decode_tps']:.2f}x (threads {args.threads}, "
          f"our KV cache {args.kv_cache}, llama.cpp's f16)")

    if args.verify:
        v = verify(args)
        stages = ", ".join(f"{s['name']} {s['seconds']:.1f}" for s in v["stages"])
        print(f"verify     {'PASS' if v['passed'] else 'FAIL'} {v['seconds']:.1f} s over {v['n_positions']} positions, "
              f"peak RSS {v['peak_rss_kib'] / 2**20:.2f} GiB ({stages})")
        t = v["tensors"]
        shared = v.get("exact_shared_products")
        print(f"           tensors {t['equal']} of {t['compared']} equal; exact logits rel RMS "
              f"{(v['exact_logits'].get('metrics') or {}).get('rel_rms')}; expected model's products "
              + (f"{shared['shared']} shared, {shared['computed']} computed" if shared else "not shared"))
        print(f"ratio verify / llama.cpp's evaluation of {n_prompt} positions: "
              f"{v['seconds'] / l['prefill_seconds']:.2f}x")


if __name__ == "__main__":
    main()
