#!/usr/bin/env python3
"""Check hf-to-gguf conversions with llama.cpp's own Python GGUF library (gguf-py).

Run by tests/interop_gguf_py.rs (with $MMFUSER_PYTHON, default python3), which converts the
fixture with --outtype f16, f32 and bf16 and passes the output directories here:

    python3 tests/interop/check_gguf.py --checkpoint fixtures/tiny-llava-mmfuser \\
        --tower fixtures/tiny-clip --schemas schemas OUT_DIR [OUT_DIR ...]

Each OUT_DIR holds one conversion: <name>-<TYPE>.gguf, mmproj-<name>-<TYPE>.gguf,
<name>-<TYPE>.manifest.json and (optional) summary.json, the `--json` output of the run.

Needs numpy and gguf==0.19.0 (`pip install gguf==0.19.0 numpy`; .ci/run installs them);
jsonschema (optional) validates the manifest and summary against schemas/*.schema.json.

Checks, for both files of every conversion:
  * gguf-py's GGUFReader opens the file;
  * every metadata key has the GGUF type llama.cpp / clip.cpp asserts when reading it (UINT32 for
    counts, FLOAT32 for eps / freq_base, INT32 arrays for token_type and clip.vision.feature_layer,
    FLOAT32 arrays for scores / image_mean / image_std, BOOL flags, STRING names), no key is
    unknown, the required keys are there, and the values agree with config.json,
    preprocessor_config.json and the tensor shapes;
  * every tensor, dequantized by gguf-py, equals the source tensor (read here from the
    safetensors files with json + numpy only; bf16 -> f32 by shifting uint16 << 16) after the
    dtype cast, exactly (bit for bit), with llama.cpp's Q/K permutation
    (reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2)) for attn_q / attn_k using the
    head counts of config.json, and the GGUF ne order the reverse of the PyTorch shape;
  * tensor types: 1-D and v.position_embd F32, fuser and patch embedding F16 (F32 under f32),
    other matrices the outtype;
  * every source tensor is written or is one of the CLIP tensors the converter must drop
    (blocks past the last selected layer, post_layernorm);
  * the manifest maps each tensor to the same source and lists the files' sha256.
Exit 0 when everything holds, 1 otherwise (every failure is listed), 2 when a package is missing.
"""
import argparse
import hashlib
import json
import os
import re
import sys

MISSING_HINT = (
    "run .ci/run (it installs them into the CI venv) or `pip install gguf==0.19.0 numpy`, "
    "and point MMFUSER_PYTHON at that python"
)

try:
    import numpy as np
except ImportError as e:  # pragma: no cover
    print(f"check_gguf.py: numpy is not installed for {sys.executable} ({e}); {MISSING_HINT}", file=sys.stderr)
    sys.exit(2)
try:
    import gguf
    from gguf import GGUFReader, GGUFValueType as VT, GGMLQuantizationType as QT
    from gguf.quants import dequantize
except ImportError as e:  # pragma: no cover
    print(f"check_gguf.py: the gguf package is not installed for {sys.executable} ({e}); {MISSING_HINT}", file=sys.stderr)
    sys.exit(2)

try:
    import jsonschema
except ImportError:
    jsonschema = None

FAILURES = []


def fail(msg):
    FAILURES.append(msg)
    print(f"FAIL: {msg}")


# ----------------------------------------------------------------------------------------------
# Sources


def read_safetensors(path):
    """name -> (dtype, float32 array in PyTorch shape), with numpy only."""
    with open(path, "rb") as f:
        b = f.read()
    n = int.from_bytes(b[:8], "little")
    header = json.loads(b[8 : 8 + n])
    data = memoryview(b)[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        s, e = info["data_offsets"]
        dt = info["dtype"]
        raw = np.frombuffer(data[s:e], dtype={"BF16": "<u2", "F16": "<f2", "F32": "<f4"}[dt])
        if dt == "BF16":
            arr = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            arr = raw.astype(np.float32)
        out[name] = (dt, arr.reshape(info["shape"]))
    return out


def load_json(path):
    with open(path) as f:
        return json.load(f)


def checkpoint_sources(ckpt):
    index = os.path.join(ckpt, "model.safetensors.index.json")
    if os.path.exists(index):
        shards = sorted(set(load_json(index)["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    src = {}
    for s in shards:
        src.update(read_safetensors(os.path.join(ckpt, s)))
    return src


# ----------------------------------------------------------------------------------------------
# Expected names, types and values (written from llama.cpp's conventions, independently of the
# converter's schemas/names/*.json)

LLM_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
CLIP_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_out": "self_attn.out_proj",
    "ln1": "layer_norm1",
    "ln2": "layer_norm2",
    "ffn_up": "mlp.fc1",
    "ffn_down": "mlp.fc2",
}


def source_name(g):
    """(store, HF name) of a GGUF tensor: store 'ckpt' or 'tower'."""
    fixed = {
        "token_embd.weight": ("ckpt", "model.embed_tokens.weight"),
        "output_norm.weight": ("ckpt", "model.norm.weight"),
        "output.weight": ("ckpt", "lm_head.weight"),
        "v.patch_embd.weight": ("tower", "vision_model.embeddings.patch_embedding.weight"),
        "v.class_embd": ("tower", "vision_model.embeddings.class_embedding"),
        "v.position_embd.weight": ("tower", "vision_model.embeddings.position_embedding.weight"),
        "v.pre_ln.weight": ("tower", "vision_model.pre_layrnorm.weight"),
        "v.pre_ln.bias": ("tower", "vision_model.pre_layrnorm.bias"),
    }
    if g in fixed:
        return fixed[g]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", g)
    if m and m.group(2) in LLM_LAYER:
        return "ckpt", f"model.layers.{m.group(1)}.{LLM_LAYER[m.group(2)]}.weight"
    m = re.fullmatch(r"v\.blk\.(\d+)\.(\w+)\.(weight|bias)", g)
    if m and m.group(2) in CLIP_LAYER:
        return "tower", f"vision_model.encoder.layers.{m.group(1)}.{CLIP_LAYER[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"mm\.fuser\.(.+)", g)
    if m:
        return "ckpt", f"model.mm_projector.0.{m.group(1)}"
    m = re.fullmatch(r"mm\.([13])\.(weight|bias)", g)
    if m:
        return "ckpt", f"model.mm_projector.{m.group(1)}.{m.group(2)}"
    return None


def expected_type(name, ndim, out):
    if ndim == 1 or name == "v.position_embd.weight":
        return QT.F32
    if name.startswith("mm.fuser.") or name.startswith("v.patch_embd."):
        return QT.F32 if out == QT.F32 else QT.F16
    return out


def to_bf16_f32(x):
    """f32 -> bf16 (round to nearest even, as ggml) -> f32."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint32)
    return (r << 16).view(np.float32)


def cast(x, ty):
    if ty == QT.F32:
        return x.astype(np.float32)
    if ty == QT.F16:
        return x.astype(np.float16).astype(np.float32)
    if ty == QT.BF16:
        return to_bf16_f32(x)
    raise ValueError(ty)


def permute(w, n_head):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------------------------
# Metadata

def field_type(f):
    """'UINT32', 'ARRAY[INT32]', ..."""
    if f.types[0] == VT.ARRAY:
        return f"ARRAY[{f.types[-1].name}]"
    return f.types[0].name


def value(f):
    return f.contents()


def check_metadata(path, r, table, required):
    fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    for k, f in fields.items():
        if k not in table:
            fail(f"{path}: metadata key '{k}' ({field_type(f)}) is not in this script's type table")
            continue
        want_type, want_value = table[k]
        got = field_type(f)
        if got != want_type:
            fail(f"{path}: metadata '{k}' has type {got}, llama.cpp expects {want_type}")
            continue
        if want_value is None:
            continue
        v = value(f)
        if callable(want_value):
            ok, what = want_value(v)
            if not ok:
                fail(f"{path}: metadata '{k}' = {str(v)[:80]}: {what}")
        elif want_type == "FLOAT32":
            if np.float32(v) != np.float32(want_value):
                fail(f"{path}: metadata '{k}' = {v!r}, expected {want_value!r} (as f32)")
        elif want_type == "ARRAY[FLOAT32]":
            if not np.array_equal(np.asarray(v, np.float32), np.asarray(want_value, np.float32)):
                fail(f"{path}: metadata '{k}' = {v!r}, expected {want_value!r} (as f32)")
        elif v != want_value:
            fail(f"{path}: metadata '{k}' = {v!r}, expected {want_value!r}")
    for k in required:
        if k not in fields:
            fail(f"{path}: required metadata key '{k}' is missing")


def length(n, of):
    return lambda v: (len(v) == n, f"expected {n} {of}")


def llm_table(cfg, name, ft_id):
    n_vocab = cfg["vocab_size"]
    n_head = cfg["num_attention_heads"]
    t = {
        "general.architecture": ("STRING", "llama"),
        "general.type": ("STRING", "model"),
        "general.name": ("STRING", name),
        "general.basename": ("STRING", None),
        "general.size_label": ("STRING", None),
        "general.file_type": ("UINT32", ft_id),
        "general.quantization_version": ("UINT32", 2),
        "llama.block_count": ("UINT32", cfg["num_hidden_layers"]),
        "llama.context_length": ("UINT32", cfg.get("max_position_embeddings", 4096)),
        "llama.embedding_length": ("UINT32", cfg["hidden_size"]),
        "llama.feed_forward_length": ("UINT32", cfg["intermediate_size"]),
        "llama.attention.head_count": ("UINT32", n_head),
        "llama.attention.head_count_kv": ("UINT32", cfg.get("num_key_value_heads", n_head)),
        "llama.rope.freq_base": ("FLOAT32", cfg.get("rope_theta", 10000.0)),
        "llama.attention.layer_norm_rms_epsilon": ("FLOAT32", cfg["rms_norm_eps"]),
        "llama.vocab_size": ("UINT32", n_vocab),
        "llama.rope.dimension_count": ("UINT32", cfg["hidden_size"] // n_head),
        "tokenizer.ggml.model": ("STRING", "llama"),
        "tokenizer.ggml.pre": ("STRING", None),
        "tokenizer.ggml.tokens": ("ARRAY[STRING]", length(n_vocab, "tokens")),
        "tokenizer.ggml.scores": ("ARRAY[FLOAT32]", length(n_vocab, "scores")),
        "tokenizer.ggml.token_type": ("ARRAY[INT32]", length(n_vocab, "token types")),
        "tokenizer.ggml.bos_token_id": ("UINT32", cfg.get("bos_token_id")),
        "tokenizer.ggml.eos_token_id": ("UINT32", cfg.get("eos_token_id")),
        "tokenizer.ggml.unknown_token_id": ("UINT32", None),
        "tokenizer.ggml.padding_token_id": ("UINT32", None),
        "tokenizer.ggml.seperator_token_id": ("UINT32", None),
        "tokenizer.ggml.add_bos_token": ("BOOL", None),
        "tokenizer.ggml.add_eos_token": ("BOOL", None),
        "tokenizer.ggml.add_space_prefix": ("BOOL", None),
        "tokenizer.chat_template": ("STRING", None),
    }
    required = [k for k in t if k.startswith("llama.") or k in (
        "general.architecture", "general.file_type", "tokenizer.ggml.model", "tokenizer.ggml.tokens",
        "tokenizer.ggml.scores", "tokenizer.ggml.token_type")]
    return t, required


def resolve_select(sel, n_layer):
    if isinstance(sel, str):
        sel = [int(x) for x in sel[len("list"):].split("/")] if sel.startswith("list") else [int(sel)]
    elif isinstance(sel, int):
        sel = [sel]
    n = n_layer + 1
    return [i + n if i < 0 else i for i in sel]


def mmproj_table(cfg, vcfg, pre, src, name, ft_id):
    feature = resolve_select(cfg["mm_vision_select_layer"], vcfg["num_hidden_layers"])
    m = cfg.get("mmfuser_n_heads", 16)
    off_cross = src["model.mm_projector.0.cross_attn.sampling_offsets.weight"][1].shape[0]
    off_self = src["model.mm_projector.0.self_attn.sampling_offsets.weight"][1].shape[0]
    attn_self = src["model.mm_projector.0.self_attn.attention_weights.weight"][1].shape[0]
    mean = pre.get("image_mean", [0.48145466, 0.4578275, 0.40821073])
    std = pre.get("image_std", [0.26862954, 0.26130258, 0.27577711])
    t = {
        "general.architecture": ("STRING", "clip"),
        "general.type": ("STRING", "mmproj"),
        "general.name": ("STRING", name),
        "general.description": ("STRING", None),
        "general.file_type": ("UINT32", ft_id),
        "general.quantization_version": ("UINT32", 2),
        "clip.has_text_encoder": ("BOOL", False),
        "clip.has_vision_encoder": ("BOOL", True),
        "clip.has_llava_projector": ("BOOL", True),
        "clip.projector_type": ("STRING", "mmfuser"),
        "clip.use_gelu": ("BOOL", vcfg.get("hidden_act", "quick_gelu") == "gelu"),
        "clip.vision.image_size": ("UINT32", vcfg["image_size"]),
        "clip.vision.patch_size": ("UINT32", vcfg["patch_size"]),
        "clip.vision.embedding_length": ("UINT32", vcfg["hidden_size"]),
        "clip.vision.feed_forward_length": ("UINT32", vcfg["intermediate_size"]),
        "clip.vision.projection_dim": ("UINT32", cfg["hidden_size"]),
        "clip.vision.attention.head_count": ("UINT32", vcfg["num_attention_heads"]),
        "clip.vision.attention.layer_norm_epsilon": ("FLOAT32", vcfg.get("layer_norm_eps", 1e-5)),
        "clip.vision.block_count": ("UINT32", max(feature)),
        "clip.vision.feature_layer": ("ARRAY[INT32]", feature),
        "clip.vision.image_mean": ("ARRAY[FLOAT32]", mean),
        "clip.vision.image_std": ("ARRAY[FLOAT32]", std),
        "clip.vision.image_aspect_ratio": ("STRING", cfg.get("image_aspect_ratio")),
        "mmfuser.head_count": ("UINT32", m),
        "mmfuser.level_count": ("UINT32", off_cross // off_self),
        "mmfuser.point_count": ("UINT32", attn_self // m),
        "mmfuser.layer_norm_epsilon": ("FLOAT32", 1e-6),
        "mmfuser.query_feature_index": ("UINT32", 4),
    }
    required = [k for k in t if k not in ("general.description", "general.type")]
    return t, required, max(feature)


# ----------------------------------------------------------------------------------------------


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def validate_schema(path, doc, schema_path):
    if jsonschema is None:
        return False
    schema = load_json(schema_path)
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        fail(f"{schema_path}: not a valid draft 2020-12 schema: {e.message}")
        return True
    v = jsonschema.Draft202012Validator(schema)
    errs = sorted(v.iter_errors(doc), key=lambda e: list(e.absolute_path))
    for e in errs[:10]:
        fail(f"{path}: does not match {os.path.basename(schema_path)} at /{'/'.join(map(str, e.absolute_path))}: {e.message}")
    return True


def check_conversion(out_dir, args, ckpt_src, tower_src, cfg, vcfg, pre):
    manifests = [f for f in os.listdir(out_dir) if f.endswith(".manifest.json")]
    if len(manifests) != 1:
        fail(f"{out_dir}: expected one manifest, found {manifests}")
        return
    mpath = os.path.join(out_dir, manifests[0])
    manifest = load_json(mpath)
    ft_name = manifests[0][: -len(".manifest.json")].rsplit("-", 1)[1]
    out_ty, ft_id = {"F32": (QT.F32, 0), "F16": (QT.F16, 1), "BF16": (QT.BF16, 32)}[ft_name]
    name = manifests[0][: -len(f"-{ft_name}.manifest.json")]
    llm_path = os.path.join(out_dir, f"{name}-{ft_name}.gguf")
    mmproj_path = os.path.join(out_dir, f"mmproj-{name}-{ft_name}.gguf")

    schemas_checked = validate_schema(mpath, manifest, os.path.join(args.schemas, "manifest.schema.json"))
    summary_path = os.path.join(out_dir, "summary.json")
    if os.path.exists(summary_path):
        summary = load_json(summary_path)
        validate_schema(summary_path, summary, os.path.join(args.schemas, "hf-to-gguf-summary.schema.json"))
        for o in summary["outputs"]:
            if os.path.basename(o["path"]) not in (os.path.basename(llm_path), os.path.basename(mmproj_path)):
                fail(f"{summary_path}: output {o['path']} is not one of the files here")

    by_gguf = {t["gguf"]: t for t in manifest["tensors"]}
    out_sha = {os.path.basename(o["path"]): o["sha256"] for o in manifest["outputs"]}
    n_head = cfg["num_attention_heads"]
    n_head_kv = cfg.get("num_key_value_heads", n_head)
    used = {"ckpt": set(), "tower": set()}
    n_checked = 0

    llm_meta, llm_req = llm_table(cfg, name, ft_id)
    mm_meta, mm_req, n_blocks = mmproj_table(cfg, vcfg, pre, ckpt_src, name, ft_id)
    for path, kind, (table, required) in ((llm_path, "llm", (llm_meta, llm_req)), (mmproj_path, "mmproj", (mm_meta, mm_req))):
        try:
            r = GGUFReader(path)
        except Exception as e:  # noqa: BLE001
            fail(f"{path}: gguf-py's GGUFReader cannot open it: {e!r}")
            continue
        check_metadata(path, r, table, required)
        if out_sha.get(os.path.basename(path)) != sha256(path):
            fail(f"{path}: sha256 differs from the manifest")
        for t in r.tensors:
            where = f"{os.path.basename(path)}: tensor '{t.name}'"
            sn = source_name(t.name)
            if sn is None or (kind == "llm") != (sn[1].startswith("model.layers.") or sn[1] in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")):
                fail(f"{where}: not a tensor this artefact should have")
                continue
            store, hf = sn
            src = (ckpt_src if store == "ckpt" else tower_src).get(hf)
            if src is None:
                fail(f"{where}: source '{hf}' is not in the {store}")
                continue
            used[store].add(hf)
            rec = by_gguf.get(t.name)
            if rec is None or rec["source"] != hf or rec["artefact"] != kind:
                fail(f"{where}: manifest maps it to {rec and (rec['source'], rec['artefact'])}, expected ({hf}, {kind})")
            _, x = src
            ne = [int(d) for d in t.shape]
            if ne != list(reversed(x.shape)):
                fail(f"{where}: ne {ne} is not the reverse of the source shape {list(x.shape)}")
                continue
            want_ty = expected_type(t.name, x.ndim, out_ty)
            if t.tensor_type != want_ty:
                fail(f"{where}: type {t.tensor_type.name}, expected {want_ty.name}")
                continue
            if kind == "llm" and t.name.endswith(".attn_q.weight"):
                x = permute(x, n_head)
            elif kind == "llm" and t.name.endswith(".attn_k.weight"):
                x = permute(x, n_head_kv)
            got = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(x.shape)
            want = cast(x, want_ty)
            if not np.array_equal(got.view(np.uint32), want.view(np.uint32)):
                bad = np.flatnonzero(got.view(np.uint32) != want.view(np.uint32))
                i = bad[0]
                fail(f"{where}: {len(bad)} of {x.size} values differ from the source cast to {want_ty.name} "
                     f"(first at flat index {i}: {got.flat[i]!r} vs {want.flat[i]!r})")
                continue
            n_checked += 1

    # Every source tensor is written or deliberately dropped (CLIP blocks >= n_blocks, post_layernorm).
    for store, src in (("ckpt", ckpt_src), ("tower", tower_src)):
        for hf in src:
            if hf in used[store]:
                continue
            m = re.fullmatch(r"vision_model\.encoder\.layers\.(\d+)\..*", hf)
            droppable = store == "tower" and ((m and int(m.group(1)) >= n_blocks) or hf.startswith("vision_model.post_layernorm."))
            if not droppable:
                fail(f"{out_dir}: source tensor '{hf}' ({store}) was not written")
            elif hf not in manifest["dropped"]:
                fail(f"{mpath}: dropped tensor '{hf}' is not listed under 'dropped'")
    print(f"{out_dir}: {ft_name}: {n_checked} tensors equal to their sources, metadata types checked"
          + ("" if schemas_checked else " (jsonschema not installed: schema validation left to tests/hf_to_gguf.rs)"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--tower", required=True)
    ap.add_argument("--schemas", required=True)
    ap.add_argument("out_dirs", nargs="+")
    args = ap.parse_args()
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, gguf {getattr(gguf, '__version__', None) or _dist_version('gguf')}"
          + (f", jsonschema {_dist_version('jsonschema')}" if jsonschema else ", no jsonschema"))
    cfg = load_json(os.path.join(args.checkpoint, "config.json"))
    vcfg = load_json(os.path.join(args.tower, "config.json"))
    vcfg = vcfg.get("vision_config", vcfg)
    pre_path = os.path.join(args.tower, "preprocessor_config.json")
    pre = load_json(pre_path) if os.path.exists(pre_path) else {}
    ckpt_src = checkpoint_sources(args.checkpoint)
    tower_src = read_safetensors(os.path.join(args.tower, "model.safetensors"))
    for d in args.out_dirs:
        check_conversion(d, args, ckpt_src, tower_src, cfg, vcfg, pre)
    if FAILURES:
        print(f"{len(FAILURES)} check(s) failed")
        return 1
    print("all checks passed")
    return 0


def _dist_version(name):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:  # noqa: BLE001
        return "?"


if __name__ == "__main__":
    sys.exit(main())
