#!/usr/bin/env python3
"""Write the seed corpora of the fuzz targets (fuzz/corpus/<target>/): small valid and broken
inputs, built here by hand (struct, zipfile, json) and cut from the repository's fixtures.
Run from the repository root: python3 fuzz/make_seeds.py"""
import io, json, os, struct, zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "fuzz", "corpus")


def put(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def fixture(*p):
    with open(os.path.join(ROOT, "fixtures", *p), "rb") as f:
        return f.read()


# ---------------------------------------------------------------- GGUF
def gstr(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def gkv(key, ty, payload):
    return gstr(key) + struct.pack("<I", ty) + payload


def gguf(kvs, tensors, align=32, version=3):
    """tensors: (name, ne, ggml type, data bytes)"""
    h = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs)) + b"".join(kvs)
    off, blobs = 0, []
    for name, ne, ty, data in tensors:
        h += gstr(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
        h += struct.pack("<IQ", ty, off)
        pad = (-len(data)) % align
        blobs.append(data + b"\0" * pad)
        off += len(data) + pad
    h += b"\0" * ((-len(h)) % align)
    return h + b"".join(blobs)


arch = gkv("general.architecture", 8, gstr("llama"))
blocks = gkv("llama.block_count", 4, struct.pack("<I", 2))
toks = gkv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 3) + gstr("<s>") + gstr("a") + gstr("\u2581b"))
scores = gkv("tokenizer.ggml.scores", 9, struct.pack("<IQ", 6, 3) + struct.pack("<3f", 0, -1, -2))
flag = gkv("tokenizer.ggml.add_bos_token", 7, b"\x01")
f32 = ("output_norm.weight", [4], 0, struct.pack("<4f", 1, 2, 3, 4))
f16 = ("blk.0.attn_q.weight", [8, 2], 1, b"\x00\x3c" * 16)
q8 = ("blk.0.ffn_up.weight", [32], 8, struct.pack("<e", 0.5) + bytes(range(32)))
put("gguf_reader", "minimal.gguf", gguf([arch, blocks], [f32, f16]))
put("gguf_reader", "arrays.gguf", gguf([arch, toks, scores, flag], [f32]))
put("gguf_reader", "q8_0.gguf", gguf([arch], [q8, f32]))
put("gguf_reader", "align64.gguf", gguf([arch, gkv("general.alignment", 4, struct.pack("<I", 64))], [f32, f16], align=64))
put("gguf_reader", "nested-array.gguf", gguf([gkv("x.nested", 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 4, 2) + struct.pack("<2I", 7, 8))], []))
put("gguf_reader", "empty.gguf", gguf([], []))
put("gguf_reader", "version2.gguf", gguf([arch], [f32], version=2))
put("gguf_reader", "bad-magic.gguf", b"GGUG" + gguf([arch], [f32])[4:])
put("gguf_reader", "truncated.gguf", gguf([arch, toks], [f32, f16])[:90])
# The headers of the real fixture artefacts (tokenizer arrays, llama.* / clip.* keys, tensor
# infos) plus their first tensor bytes, when the release binary is built.
BIN = os.path.join(ROOT, "target", "release", "mmfuser-convert")
if os.path.exists(BIN):
    import subprocess, tempfile
    with tempfile.TemporaryDirectory() as t:
        subprocess.run([BIN, "hf-to-gguf", os.path.join(ROOT, "fixtures", "tiny-llava-mmfuser"), "--vision-tower",
                        os.path.join(ROOT, "fixtures", "tiny-clip"), "--out-dir", t, "-q"], check=True, stdout=subprocess.DEVNULL)
        for name, seed in [("tiny-llava-mmfuser-F16.gguf", "fixture-llm-head.gguf"), ("mmproj-tiny-llava-mmfuser-F16.gguf", "fixture-mmproj-head.gguf")]:
            with open(os.path.join(t, name), "rb") as f:
                # The header (about 13 KiB) and the first tensors' bytes; the rest run past the end.
                put("gguf_reader", seed, f.read(16384))

# ---------------------------------------------------------------- safetensors / index
def st(tensors, meta=None):
    """tensors: (name, dtype, shape, data)"""
    h, off, data = {}, 0, b""
    if meta is not None:
        h["__metadata__"] = meta
    for name, dt, shape, d in tensors:
        h[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(d)]}
        off += len(d)
        data += d
    hb = json.dumps(h).encode()
    hb += b" " * ((-len(hb)) % 8)
    return struct.pack("<Q", len(hb)) + hb + data


put("safetensors_header", "st-two.bin", b"\0" + st([("a", "F32", [2], b"\0" * 8), ("b.weight", "BF16", [2, 2], b"\0" * 8)], {"format": "pt"}))
put("safetensors_header", "st-f16.bin", b"\0" + st([("x", "F16", [3], b"\0" * 6)]))
put("safetensors_header", "st-empty.bin", b"\0" + st([]))
put("safetensors_header", "st-i32.bin", b"\0" + st([("i", "I32", [1], b"\0" * 4)]))
put("safetensors_header", "st-overlap.bin", b"\0" + struct.pack("<Q", 96) + json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode().ljust(96) + b"\0" * 4)
shard = fixture("tiny-llava-mmfuser", "model-00002-of-00002.safetensors")
n = struct.unpack("<Q", shard[:8])[0]
put("safetensors_header", "st-fixture-header-only.bin", b"\0" + shard[: 8 + n + 64])
put("safetensors_header", "index-fixture.json", b"\x01" + fixture("tiny-llava-mmfuser", "model.safetensors.index.json"))
put("safetensors_header", "index-small.json", b"\x01" + json.dumps({"metadata": {}, "weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors", "c": "m-1.safetensors"}}).encode())
put("safetensors_header", "index-dotdot.json", b"\x01" + json.dumps({"weight_map": {"a": "../x.safetensors", "b": "/abs/y", "c": "sub/./z"}}).encode())

# ---------------------------------------------------------------- pickles / torch.save archives
def P(*parts):
    return b"".join(parts)


def s(x):
    b = x.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def i(v):
    return b"J" + struct.pack("<i", v)


def tensor(cls, key, numel, offset, shape, stride):
    return P(b"ctorch._utils\n_rebuild_tensor_v2\n((", s("storage"), f"ctorch\n{cls}\n".encode(), s(key), s("cpu"), i(numel),
             b"tQ", i(offset), b"(", *[i(d) for d in shape], b"t(", *[i(d) for d in stride], b"t\x89ccollections\nOrderedDict\n)RtR")


sd = P(b"\x80\x02}q\x00(", s("w"), tensor("HalfStorage", "0", 6, 0, [2, 3], [3, 1]),
       s("t"), tensor("HalfStorage", "0", 6, 0, [3, 2], [1, 3]),
       s("b"), tensor("FloatStorage", "1", 2, 0, [2], [1]), b"u.")
param = P(b"\x80\x02}(", s("p"), b"ctorch._utils\n_rebuild_parameter\n(", tensor("BFloat16Storage", "0", 4, 0, [4], [1]), b"\x89ccollections\nOrderedDict\n)RtR", b"u.")
put("pickle_reader", "pkl-state-dict.bin", b"\0" + sd)
put("pickle_reader", "pkl-parameter.bin", b"\0" + param)
put("pickle_reader", "pkl-ordered-dict-build.bin", b"\0" + P(b"\x80\x02ccollections\nOrderedDict\n)R(", s("w"), tensor("FloatStorage", "0", 1, 0, [1], [1]), b"u}(", s("_metadata"), b"}ub."))
put("pickle_reader", "pkl-os-system.bin", b"\0" + b"\x80\x02cos\nsystem\n" + s("id") + b"\x85R.")
put("pickle_reader", "pkl-memo.bin", b"\0" + P(b"\x80\x02}q\x00(", s("a"), b"Nq\x01", s("b"), b"h\x01u."))
put("pickle_reader", "pkl-fixture.bin", b"\0" + zipfile.ZipFile(os.path.join(ROOT, "fixtures", "tiny-llava-mmfuser-bin", "pytorch_model.bin")).read("pytorch_model/data.pkl")[:4000] + b".")


def archive(pkl, storages, prefix="archive"):
    b = io.BytesIO()
    with zipfile.ZipFile(b, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", pkl)
        z.writestr(f"{prefix}/byteorder", "little")
        for k, v in storages.items():
            z.writestr(f"{prefix}/data/{k}", v)
        z.writestr(f"{prefix}/version", "3\n")
    return b.getvalue()


put("pickle_reader", "zip-state-dict.bin", b"\x01" + archive(sd, {"0": b"\x00\x3c" * 6, "1": b"\0" * 8}))
put("pickle_reader", "zip-parameter.bin", b"\x01" + archive(param, {"0": b"\0" * 8}, prefix="model"))
put("pickle_reader", "zip-missing-storage.bin", b"\x01" + archive(sd, {"0": b"\0" * 12}))
put("pickle_reader", "zip-short-storage.bin", b"\x01" + archive(sd, {"0": b"\0" * 4, "1": b"\0" * 8}))

# ---------------------------------------------------------------- config.json
put("config_parser", "llava-mmfuser.json", fixture("tiny-llava-mmfuser", "config.json"))
put("config_parser", "llava-bin.json", fixture("tiny-llava-mmfuser-bin", "config.json"))
put("config_parser", "clip.json", fixture("tiny-clip", "config.json"))
clip = json.loads(fixture("tiny-clip", "config.json"))
clip = clip.get("vision_config", clip)
pre = json.loads(fixture("tiny-clip", "preprocessor_config.json"))
put("config_parser", "clip-with-pre.json", json.dumps(dict(clip, preprocessor=pre, mm_vision_select_layer=[-8, -6, -4, -3, -2])).encode())
put("config_parser", "hf-llava.json", json.dumps({"model_type": "llava", "text_config": {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 100, "rope_parameters": {"rope_theta": 1e6}}, "vision_config": clip, "mm_vision_select_layer": -2}).encode())
put("config_parser", "select-forms.json", json.dumps({"mm_vision_select_layer": "list-22/-17/-12/-7/-2", "hidden_size": 4096, "num_attention_heads": 32, "num_hidden_layers": 24, "image_size": 336, "patch_size": 14, "intermediate_size": 4096}).encode())
put("config_parser", "bad-heads.json", json.dumps({"hidden_size": 250, "num_attention_heads": 0, "head_dim": 7, "num_hidden_layers": 1, "intermediate_size": 1, "vocab_size": 1}).encode())

# ---------------------------------------------------------------- images (verify --image)
for f in sorted(os.listdir(os.path.join(ROOT, "fixtures", "image_refs"))):
    if f.endswith((".png", ".jpg")):
        put("image_decoder", f, fixture("image_refs", f))


def png(w, h, colour_type, depth, raw):
    import zlib

    def chunk(t, d):
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


put("image_decoder", "wide-strip.png", png(300, 1, 0, 8, b"\0" + bytes(range(256)) + bytes(44)))
put("image_decoder", "tall-strip.png", png(1, 300, 2, 8, b"".join(b"\0" + bytes([i % 256, 7, 9]) for i in range(300))))
put("image_decoder", "huge-header.png", png(100000, 1, 0, 8, b""))

# ---------------------------------------------------------------- tokenizer.json (+ "\n#\n" + tokenizer_config.json)
tj = fixture("tiny-llava-mmfuser-bin", "tokenizer.json")
put("tokenizer_json", "tiny-bin.json", tj)
put("tokenizer_json", "tiny-bin-with-config.json", tj + b"\n#\n" + fixture("tiny-llava-mmfuser-bin", "tokenizer_config.json"))
for d in ("hf", "hf_added"):
    p = os.path.join(ROOT, "fixtures", "tokenizer-interop", d, "tokenizer.json")
    if os.path.exists(p):
        put("tokenizer_json", d + ".json", open(p, "rb").read())
mini = {"model": {"type": "BPE", "byte_fallback": True, "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "\u2581a": 3, "<0x41>": 4}, "merges": []},
        "decoder": {"type": "Sequence", "decoders": []},
        "added_tokens": [{"id": 5, "content": "<image>", "special": True, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False}]}
put("tokenizer_json", "mini.json", json.dumps(mini).encode())
print("seeds written to", OUT)
