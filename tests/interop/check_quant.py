#!/usr/bin/env python3
"""Check our quantized GGUFs against llama.cpp's own Python package `gguf` (gguf-py, 0.19.0).

Run by tests/interop_quant_py.rs; usable by hand:

    check_quant.py [--require-types Q8_0,Q4_K,...] [--float-prefix mm.fuser.] \
                   --case LABEL SOURCE.gguf QUANTIZED.gguf NPY_DIR [--case ...]

SOURCE is the float (F32/F16/BF16) GGUF the quantized file was made from; NPY_DIR holds, for every
tensor of QUANTIZED, `<tensor name>.npy`: OUR dequantization of it (f32, PyTorch order). Both
files are read with gguf.GGUFReader only (not our reader). Per case and per tensor:

  (a) Q8_0 / Q4_0 tensors: gguf.quants.quantize(source values as f32, type) == our bytes, exactly
      (gguf-py implements quantize for these legacy types only, not for the K-quants);
  (b) every quantized tensor: gguf.quants.dequantize(our bytes, type) == our .npy, bit for bit
      (F16/BF16 tensors too: gguf-py's widening to f32 == ours);
  (c) float tensors (F32/F16/BF16): same type and the same bytes as in SOURCE;
  plus: the same tensor names and shapes as SOURCE, and every tensor whose name starts with a
  --float-prefix is F16 or F32 (the MMFuser fuser is never quantized);
  (d) with `--manifest LABEL MANIFEST.json`: every tensor the run quantized (quantized type, not
      the source's type) has a `quant_rel_rms`, float tensors have none, and each value equals
      sqrt(sum (y - x)^2 / sum x^2) in float64, with x the source values and
      y = gguf.quants.dequantize(our bytes), within 1e-9 relative.

Prints counts per case and type; exits 1 on any mismatch (each one named by case, tensor, type),
2 on a usage or environment problem.
"""
import argparse
import json
import os
import sys

try:
    import numpy as np
    import gguf
    from gguf import GGMLQuantizationType as QT
    from gguf import GGUFReader
    import gguf.quants as gq
except ImportError as e:  # pragma: no cover - environment problem, reported by the Rust test
    print(f"check_quant.py: cannot import numpy/gguf ({e}); run .ci/run or "
          f"`pip install gguf==0.19.0 numpy`", file=sys.stderr)
    sys.exit(2)

FLOAT_TYPES = {QT.F32, QT.F16, QT.BF16}
BYTE_CHECKED = {QT.Q8_0, QT.Q4_0}  # (a): types gguf-py can quantize
SUPPORTED = {QT.Q8_0, QT.Q4_0, QT.Q5_0, QT.Q5_1, QT.Q4_K, QT.Q5_K, QT.Q6_K}


def torch_shape(t):
    """PyTorch order (rows..., ne0) from the GGUF ne order."""
    return tuple(int(d) for d in reversed([int(x) for x in t.shape]))


def raw_bytes(t):
    return np.ascontiguousarray(t.data).view(np.uint8).reshape(-1)


def as_f32(t):
    """Source tensor values as f32 (F32 as is; F16/BF16 widened exactly)."""
    tt = QT(int(t.tensor_type))
    if tt == QT.F32:
        v = np.asarray(t.data, dtype=np.float32)
    elif tt == QT.F16:
        v = np.asarray(t.data).view(np.float16).astype(np.float32)
    elif tt == QT.BF16:
        v = (np.asarray(t.data).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        raise ValueError(f"source tensor {t.name} is {tt.name}, not a float type")
    return v.reshape(torch_shape(t))


def first_diff(a, b):
    """(index, count) of differing elements of two equally long 1-D arrays."""
    d = np.flatnonzero(a != b)
    return (int(d[0]), int(d.size)) if d.size else (None, 0)


REL_RMS_TOL = 1e-9  # both sides sum in float64; only the summation order differs (measured 1.6e-16)
REL_RMS_DEV = []  # |manifest - ours| / ours of every value checked by (d)


def rel_rms(y, x):
    """sqrt(sum (y - x)^2 / sum x^2) in float64; sqrt(sum (y - x)^2) for an all-zero x."""
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    num, den = float(np.sum((y - x) ** 2)), float(np.sum(x * x))
    return (num / den) ** 0.5 if den > 0 else num ** 0.5


def check_case(label, src_path, q_path, npy_dir, float_prefixes, counts, errors, seen_types,
               manifest=None):
    def err(name, ty, msg):
        errors.append(f"[{label}] {name} ({ty}): {msg}")

    src = {t.name: t for t in GGUFReader(src_path).tensors}
    out = GGUFReader(q_path).tensors
    out_names = {t.name for t in out}
    for n in sorted(set(src) - out_names):
        err(n, "-", "in the source but missing from the quantized file")
    c = counts.setdefault(label, {})
    records = None
    if manifest is not None:
        with open(manifest) as f:
            records = {r["gguf"]: r for r in json.load(f)["tensors"]}
    for t in out:
        ty = QT(int(t.tensor_type))
        tyn = ty.name
        seen_types.add(tyn)
        row = c.setdefault(tyn, {"tensors": 0})
        for k, applies in (("bytes==gguf.quantize", ty in BYTE_CHECKED),
                           ("gguf.dequantize==ours", ty != QT.F32),
                           ("unchanged", ty in FLOAT_TYPES),
                           ("manifest rel RMS", records is not None and ty not in FLOAT_TYPES)):
            if applies:
                row.setdefault(k, 0)
        row["tensors"] += 1
        s = src.get(t.name)
        if s is None:
            err(t.name, tyn, "not in the source file")
            continue
        shape = torch_shape(t)
        if shape != torch_shape(s):
            err(t.name, tyn, f"shape {shape} != source shape {torch_shape(s)}")
            continue
        if any(t.name.startswith(p) for p in float_prefixes) and ty not in (QT.F16, QT.F32):
            err(t.name, tyn, f"tensors named {float_prefixes} must stay F16/F32")
        ours = raw_bytes(t)

        # (d) the manifest's quant_rel_rms against gguf-py's dequantization of our bytes.
        if records is not None:
            rec = records.get(t.name)
            got = None if rec is None else rec.get("quant_rel_rms")
            quantized_here = ty not in FLOAT_TYPES and ty != QT(int(s.tensor_type))
            if rec is None:
                err(t.name, tyn, "no record in the manifest")
            elif not quantized_here:
                if got is not None:
                    err(t.name, tyn, f"manifest has quant_rel_rms {got!r} for a tensor this run did not quantize")
            elif not isinstance(got, (int, float)):
                err(t.name, tyn, f"manifest quant_rel_rms is {got!r}, expected a number")
            else:
                want = rel_rms(gq.dequantize(np.asarray(t.data), ty), as_f32(s))
                if want > 0:
                    REL_RMS_DEV.append(abs(got - want) / want)
                if not abs(got - want) <= REL_RMS_TOL * want:
                    err(t.name, tyn, f"manifest quant_rel_rms {got!r} != {want!r} (gguf-py dequantize vs source)")
                else:
                    row["manifest rel RMS"] += 1

        # (c) float tensors are copied unchanged.
        if ty in FLOAT_TYPES:
            sty = QT(int(s.tensor_type))
            if sty != ty:
                err(t.name, tyn, f"float tensor changed type (source {sty.name})")
            else:
                i, n = first_diff(ours, raw_bytes(s))
                if n:
                    err(t.name, tyn, f"{n} bytes differ from the source, first at byte {i}")
                else:
                    row["unchanged"] += 1
        elif ty not in SUPPORTED:
            err(t.name, tyn, "unexpected quantization type")
            continue

        # (a) our bytes == gguf-py's quantizer on the same f32 values.
        if ty in BYTE_CHECKED:
            ref = np.ascontiguousarray(gq.quantize(as_f32(s), ty)).view(np.uint8).reshape(-1)
            if ref.size != ours.size:
                err(t.name, tyn, f"gguf.quants.quantize gives {ref.size} bytes, ours {ours.size}")
            else:
                i, n = first_diff(ours, ref)
                if n:
                    bs, ts = gguf.GGML_QUANT_SIZES[ty]
                    err(t.name, tyn, f"{n} bytes differ from gguf.quants.quantize, first at byte {i} "
                                     f"(block {i // ts}, byte {i % ts} of the block)")
                else:
                    row["bytes==gguf.quantize"] += 1

        # (b) gguf-py's dequantization of our bytes == ours, bit for bit.
        if ty != QT.F32:
            npy = os.path.join(npy_dir, t.name + ".npy")
            if not os.path.exists(npy):
                err(t.name, tyn, f"our dequantization {npy} is missing")
                continue
            mine = np.load(npy)
            theirs = gq.dequantize(np.asarray(t.data), ty)
            if theirs.dtype != np.float32 or mine.dtype != np.float32:
                err(t.name, tyn, f"dtypes {theirs.dtype} (gguf) / {mine.dtype} (ours), expected float32")
                continue
            if tuple(mine.shape) != shape or tuple(theirs.shape) != shape:
                err(t.name, tyn, f"shapes {tuple(theirs.shape)} (gguf) / {tuple(mine.shape)} (ours), "
                                 f"expected {shape}")
                continue
            a = np.ascontiguousarray(theirs).reshape(-1).view(np.uint32)
            b = np.ascontiguousarray(mine).reshape(-1).view(np.uint32)
            i, n = first_diff(a, b)
            if n:
                af, bf = a[i:i + 1].view(np.float32)[0], b[i:i + 1].view(np.float32)[0]
                err(t.name, tyn, f"{n} values of gguf.quants.dequantize differ from ours, first at "
                                 f"element {i}: gguf {float(af)!r} vs ours {float(bf)!r}")
            else:
                row["gguf.dequantize==ours"] += 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", nargs=4, action="append", required=True,
                    metavar=("LABEL", "SOURCE", "QUANTIZED", "NPY_DIR"))
    ap.add_argument("--manifest", nargs=2, action="append", default=[], metavar=("LABEL", "MANIFEST"),
                    help="the manifest our run wrote for case LABEL: check its quant_rel_rms values (d)")
    ap.add_argument("--float-prefix", action="append", default=[])
    ap.add_argument("--require-types", default="",
                    help="comma-separated ggml types that must occur in the quantized files")
    args = ap.parse_args()

    print(f"gguf-py {getattr(gguf, '__version__', None) or _dist_version()} ({os.path.dirname(gguf.__file__)}), "
          f"numpy {np.__version__}")
    counts, errors, seen = {}, [], set()
    manifests = dict(args.manifest)
    for m in set(manifests) - {c[0] for c in args.case}:
        errors.append(f"--manifest {m}: no --case with that label")
    for label, src, q, npy_dir in args.case:
        try:
            check_case(label, src, q, npy_dir, args.float_prefix, counts, errors, seen,
                       manifests.get(label))
        except Exception as e:  # a crash on our file is a mismatch too
            errors.append(f"[{label}] {q}: {type(e).__name__}: {e}")
    for t in [x for x in args.require_types.split(",") if x]:
        if t not in seen:
            errors.append(f"required type {t} does not occur in any quantized file (seen: {sorted(seen)})")

    for label, per in counts.items():
        print(f"{label}:")
        for ty, row in sorted(per.items()):
            print(f"  {ty:5} " + ", ".join(f"{k} {v}" for k, v in row.items()))
    if REL_RMS_DEV:
        print(f"manifest quant_rel_rms: {len(REL_RMS_DEV)} values checked, largest relative deviation "
              f"{max(REL_RMS_DEV):.1e} (tolerance {REL_RMS_TOL:.0e})")
    if errors:
        print(f"FAIL: {len(errors)} mismatch(es)")
        for e in errors:
            print("  " + e)
        return 1
    print("OK")
    return 0


def _dist_version():
    try:
        from importlib.metadata import version
        return version("gguf")
    except Exception:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
