#!/usr/bin/env python3
"""Reference GGUF vocabularies from llama.cpp's own converter, and extra
SentencePiece encodings, for tests/tokenizer.rs.

Run by hand with the oracle venv (../shared/oracle/README.md):

    ~/oracle-venv/bin/python tests/interop/make_vocab_ref.py

Needs: llama.cpp's convert_hf_to_gguf.py (vendored in the llama-cpp-python 0.3.36
sdist; set LLAMA_CPP_DIR, default ~/oracle-venv/src/llama_cpp_python-0.3.36/vendor/llama.cpp),
sentencepiece, tokenizers, transformers, torch, and ../shared/oracle/make_tiny_llama.py
(ORACLE_DIR, default /work/shared/oracle) for a plain LlamaForCausalLM checkpoint that the
converter accepts (the fixture itself is llava_llama, which it does not).

Writes fixtures/tokenizer-interop/ (deleted and rewritten):
  <variant>/            the tokenizer files + config.json the converter was given (no weights)
  <variant>/gguf_vocab.json
                        tokenizer.* keys of the GGUF that convert_hf_to_gguf.py wrote, read back
                        with the vendored gguf-py GGUFReader
  spm_cases.json        sentencepiece ids for many strings with fixtures/tiny-llava-mmfuser/tokenizer.model
  nofallback/tokenizer.model + nofallback_cases.json
                        a second SentencePiece BPE model: no byte fallback, remove_extra_whitespaces,
                        user-defined symbols, and two pieces re-typed UNUSED; ids from sentencepiece

Variants (tokenizer files from the fixtures, config.json special ids from the fixture config):
  spm        fixtures/tiny-llava-mmfuser (tokenizer.model, tokenizer_config.json, special_tokens_map.json)
  hf         fixtures/tiny-llava-mmfuser-bin minus tokenizer.model (tokenizer.json path, LlamaHfVocab)
  spm_added  spm + vocab_size 520, added_tokens.json, tokenizer_config added_tokens_decoder,
             chat_template, add_prefix_space false, add_eos_token true
  hf_added   hf + "<image>" added as a special token and "<patch>" as a normal one (tokenizers lib)
"""
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
FIX = os.path.join(REPO, "fixtures")
OUT = os.path.join(FIX, "tokenizer-interop")
LLAMA_CPP_DIR = os.environ.get(
    "LLAMA_CPP_DIR", os.path.expanduser("~/oracle-venv/src/llama_cpp_python-0.3.36/vendor/llama.cpp"))
ORACLE_DIR = os.environ.get("ORACLE_DIR", "/work/shared/oracle")

sys.path.insert(1, os.path.join(LLAMA_CPP_DIR, "gguf-py"))  # the gguf-py the converter uses
import gguf  # noqa: E402
import sentencepiece as spm  # noqa: E402
from sentencepiece import sentencepiece_model_pb2 as sp_pb2  # noqa: E402

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json")


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")


def write_cases_json(path, obj):
    """Like write_json, but one line per case (the case lists are long)."""
    head = {k: v for k, v in obj.items() if k != "cases"}
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(head, ensure_ascii=False)[:-1] + ', "cases": [\n')
        f.write(",\n".join(json.dumps(c, ensure_ascii=False) for c in obj["cases"]))
        f.write("\n]}\n")


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def make_llama(dst, vocab):
    subprocess.run([sys.executable, os.path.join(ORACLE_DIR, "make_tiny_llama.py"), dst, "--preset", "tiny",
                    "--vocab", str(vocab), "--formats", "safetensors"], check=True)
    return os.path.join(dst, "safetensors")


def prepare(base_ckpt, work, src_dir, files, fixture_config):
    """A converter input: the tiny LLaMA weights + the given tokenizer files; config.json with the
    fixture config's special token ids. Returns (work dir, config)."""
    shutil.copytree(base_ckpt, work)
    for f in TOKENIZER_FILES:
        p = os.path.join(work, f)
        if os.path.exists(p):
            os.remove(p)
    for f in files:
        shutil.copy(os.path.join(src_dir, f), os.path.join(work, f))
    cfg = read_json(os.path.join(work, "config.json"))
    for k in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        cfg.pop(k, None)
        if k in fixture_config:
            cfg[k] = fixture_config[k]
    write_json(os.path.join(work, "config.json"), cfg)
    return work, cfg


def convert(work, outfile):
    subprocess.run([sys.executable, os.path.join(LLAMA_CPP_DIR, "convert_hf_to_gguf.py"), work,
                    "--outfile", outfile, "--outtype", "f32"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def dump_vocab(gguf_path):
    r = gguf.GGUFReader(gguf_path)
    out = {}
    extra = {}
    for name, field in r.fields.items():
        if not name.startswith("tokenizer."):
            continue
        v = field.contents()
        short = name
        if name in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            out[name.split(".")[-1]] = v
        elif name in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
                      "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                      "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
                      "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_space_prefix", "tokenizer.chat_template"):
            out[short] = v
        else:
            extra[short] = v
    for k in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
              "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token",
              "tokenizer.ggml.add_space_prefix", "tokenizer.chat_template"):
        out.setdefault(k, None)
    out["other_tokenizer_keys"] = extra
    # value types as written (a check that ids are u32, types i32, scores f32)
    out["value_types"] = {name: [gguf.GGUFValueType(t).name for t in field.types]
                          for name, field in r.fields.items() if name.startswith("tokenizer.")}
    return out


def save_variant(name, work, cfg, tmp):
    dst = os.path.join(OUT, name)
    os.makedirs(dst)
    for f in TOKENIZER_FILES:
        p = os.path.join(work, f)
        if os.path.exists(p):
            shutil.copy(p, os.path.join(dst, f))
    write_json(os.path.join(dst, "config.json"), cfg)
    g = os.path.join(tmp, name + ".gguf")
    convert(work, g)
    ref = dump_vocab(g)
    ref["made_by"] = ("llama.cpp convert_hf_to_gguf.py (llama-cpp-python 0.3.36 sdist, vendored gguf-py) on this "
                      "folder's files + tiny random LlamaForCausalLM weights; read back with gguf.GGUFReader")
    ref["config_vocab_size"] = cfg["vocab_size"]
    write_json(os.path.join(dst, "gguf_vocab.json"), ref)
    print(f"{name}: {len(ref['tokens'])} tokens, bos {ref['tokenizer.ggml.bos_token_id']}, "
          f"eos {ref['tokenizer.ggml.eos_token_id']}, extra keys {sorted(ref['other_tokenizer_keys'])}")


def case_strings(seed):
    rng = random.Random(seed)
    fixed = [
        "", " ", "  ", "a", " a", "a ", "  a  b  ", "\t", "\n", "\r\n", "x\u2581y", "\u2581", "\u2581\u2581 hi",
        "Hello, world!", "USER: <image>\nDescribe the image. ASSISTANT:", "<s>hello</s>", "<unk>",
        "東京は日本の首都です。", "naïve café — déjà vu", "🙂👍🏽 emoji", "ÿ\u00a0nbsp", "1234567890", "3.14159",
        "def add(a, b): return a + b", "The quick brown fox jumps over the lazy dog.",
        "A chat between a curious human and an artificial intelligence assistant.",
        "Ünïcödé", "\u0301combining", "\u200bzero width", "tabs\tand\ttabs", "many     spaces   here",
        "ASSISTANT:", "USER:USER:", "<image><image>",
        # runs of one character: equal-score merge candidates (the leftmost pair must win)
        "lll", "llll", "lllll", "eee", "eeee", "sss", "ssss", "ooo", "oooo", "ttt", "tttt", "ppp", "rrrr",
        "...", "....", "!!!", "000", "0000", "all allll hello helllllo", "bookkeeper coffee", "aaaa bbbb",
        # words that stop at the UNUSED pieces of the nofallback model ("\u2581th", "\u2581st")
        "th", "st", "th st", "with th", "a st b", "th.", "st!", "x th y st z",
    ]
    words = ("the of and to in is was that for on with as by at from image describe assistant user human "
             "question answer detailed polite helpful curious bus red tall building").split()
    extra_chars = list("éàüßøñç東京日本語中文한국어🙂✓ÿ—–…«»\t\n!?.,;:'\"()[]{}<>/\\|@#$%^&*_+=~`0123456789")
    out = list(fixed)
    for _ in range(300):
        parts = []
        for _ in range(rng.randint(1, 10)):
            r = rng.random()
            if r < 0.6:
                w = rng.choice(words)
                parts.append(w.capitalize() if rng.random() < 0.2 else w)
            elif r < 0.85:
                parts.append("".join(rng.choice(extra_chars) for _ in range(rng.randint(1, 4))))
            else:
                parts.append(str(rng.randint(0, 99999)))
        sep = lambda: rng.choice([" ", " ", " ", "  ", "", "\n", " \u2581"])  # noqa: E731
        s = parts[0]
        for p in parts[1:]:
            s += sep() + p
        if rng.random() < 0.15:
            s = " " * rng.randint(1, 3) + s
        if rng.random() < 0.15:
            s = s + " " * rng.randint(1, 3)
        out.append(s)
    return out


def spm_cases(model_bytes, texts, note):
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    cases = [{"text": t, "ids": sp.encode(t), "pieces": sp.encode(t, out_type=str)} for t in texts]
    return {"note": note, "sentencepiece": spm.__version__, "bos_id": sp.bos_id(), "eos_id": sp.eos_id(),
            "unk_id": sp.unk_id(), "vocab_size": sp.vocab_size(), "cases": cases}


def train_nofallback(seed):
    sys.path.insert(0, ORACLE_DIR)
    from make_tiny_llama import corpus_lines  # the oracle's deterministic corpus
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_lines(seed)), model_writer=buf, model_type="bpe", vocab_size=400,
        character_coverage=0.98, byte_fallback=False, split_digits=False, add_dummy_prefix=True,
        normalization_rule_name="identity", remove_extra_whitespaces=True,
        user_defined_symbols=["<image>", "USER:", "ASSISTANT:"], control_symbols=["<ctl>"],
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=1, input_sentence_size=0,
        shuffle_input_sentence=False, minloglevel=2)
    m = sp_pb2.ModelProto()
    m.ParseFromString(buf.getvalue())
    # Re-type two frequent multi-character NORMAL pieces as UNUSED (sentencepiece still merges through
    # them and then splits them back: bpe_model.cc `resegment`).
    n = 0
    for p in m.pieces:
        if p.type == sp_pb2.ModelProto.SentencePiece.NORMAL and len(p.piece) >= 3 and p.piece.startswith("\u2581"):
            p.type = sp_pb2.ModelProto.SentencePiece.UNUSED
            n += 1
            if n == 2:
                break
    return m.SerializeToString()


def main():
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    fixture_cfg = read_json(os.path.join(FIX, "tiny-llava-mmfuser", "config.json"))
    with tempfile.TemporaryDirectory() as tmp:
        base512 = make_llama(os.path.join(tmp, "llama512"), 512)
        base520 = make_llama(os.path.join(tmp, "llama520"), 520)
        ckpt = os.path.join(FIX, "tiny-llava-mmfuser")
        binckpt = os.path.join(FIX, "tiny-llava-mmfuser-bin")
        sp_files = ["tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]
        hf_files = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]

        work, cfg = prepare(base512, os.path.join(tmp, "spm"), ckpt, sp_files, fixture_cfg)
        save_variant("spm", work, cfg, tmp)

        work, cfg = prepare(base512, os.path.join(tmp, "hf"), binckpt, hf_files, fixture_cfg)
        save_variant("hf", work, cfg, tmp)

        work, cfg = prepare(base520, os.path.join(tmp, "spm_added"), ckpt, sp_files, fixture_cfg)
        write_json(os.path.join(work, "added_tokens.json"), {"<image>": 512, "<out_of_range>": 600, "<im_end>": 513})
        tc = read_json(os.path.join(work, "tokenizer_config.json"))
        tc["added_tokens_decoder"] = {
            "0": {"content": "<unk>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                  "special": True},
            "513": {"content": "<im\u2581end>", "special": False},
            "514": {"content": "<|extra|>", "special": False},
            "515": {"content": "<pad>", "special": False},
            "516": {"content": "<sp>", "special": True},
            "900": {"content": "<far>", "special": True},
        }
        tc["chat_template"] = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        tc["add_prefix_space"] = False
        tc["add_eos_token"] = True
        tc["pad_token"] = "<pad>"
        write_json(os.path.join(work, "tokenizer_config.json"), tc)
        cfg["pad_token_id"] = 515
        write_json(os.path.join(work, "config.json"), cfg)
        save_variant("spm_added", work, cfg, tmp)

        work, cfg = prepare(base512, os.path.join(tmp, "hf_added"), binckpt, hf_files, fixture_cfg)
        from tokenizers import AddedToken, Tokenizer
        t = Tokenizer.from_file(os.path.join(work, "tokenizer.json"))
        t.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
        t.add_tokens([AddedToken("<patch>", special=False, normalized=False)])
        t.save(os.path.join(work, "tokenizer.json"))
        save_variant("hf_added", work, cfg, tmp)

    with open(os.path.join(ckpt, "tokenizer.model"), "rb") as f:
        fixture_model = f.read()
    texts = case_strings(20241016)
    write_cases_json(os.path.join(OUT, "spm_cases.json"),
               spm_cases(fixture_model, texts, "sentencepiece encode (no BOS) with fixtures/tiny-llava-mmfuser/tokenizer.model"))
    nf = train_nofallback(7)
    os.makedirs(os.path.join(OUT, "nofallback"))
    with open(os.path.join(OUT, "nofallback", "tokenizer.model"), "wb") as f:
        f.write(nf)
    write_cases_json(os.path.join(OUT, "nofallback_cases.json"),
               spm_cases(nf, texts, "sentencepiece encode (no BOS) with nofallback/tokenizer.model "
                                    "(no byte fallback, remove_extra_whitespaces, user-defined symbols, 2 UNUSED pieces)"))
    print("wrote", OUT)


if __name__ == "__main__":
    main()
