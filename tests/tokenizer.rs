//! The tokenizer against third-party output:
//! - ids from the sentencepiece library (fixtures/reference/*.json written by
//!   fixtures/make_fixtures.py; fixtures/tokenizer-interop/*_cases.json written by
//!   tests/interop/make_vocab_ref.py);
//! - GGUF vocabularies written by llama.cpp's convert_hf_to_gguf.py and read back
//!   with gguf-py (fixtures/tokenizer-interop/<variant>/gguf_vocab.json, same script).
use std::path::{Path, PathBuf};

use mmfuser_convert::checkpoint::tokenizer::{load_vocab, GgufVocab, SpmTokenizer};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn read_json(p: &Path) -> Value {
    let s = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn ids_u32(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn ids_i64(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

fn fixture_tokenizer() -> SpmTokenizer {
    SpmTokenizer::from_file(&fixtures().join("tiny-llava-mmfuser/tokenizer.model")).unwrap()
}

fn fixture_vocab() -> GgufVocab {
    let dir = fixtures().join("tiny-llava-mmfuser");
    let cfg = read_json(&dir.join("config.json"));
    load_vocab(&dir, cfg["vocab_size"].as_u64().unwrap() as usize, &cfg).unwrap()
}

/// Both encoders: straight from tokenizer.model, and from the GGUF vocabulary.
fn both_encoders() -> Vec<(&'static str, SpmTokenizer)> {
    vec![
        ("tokenizer.model", fixture_tokenizer()),
        (
            "gguf vocab",
            SpmTokenizer::from_vocab(&fixture_vocab()).unwrap(),
        ),
    ]
}

#[test]
fn llava_prompt_ids_match_sentencepiece() {
    let reference = fixtures().join("reference");
    let expected = ids_i64(&read_json(&reference.join("input_ids.json")));
    let meta = read_json(&reference.join("meta.json"));
    let prompt = meta["prompt"].as_str().unwrap();
    let chunks = read_json(&reference.join("prompt_text_ids.json"));
    assert_eq!(
        format!(
            "{}<image>{}",
            chunks["chunk0_text"].as_str().unwrap(),
            chunks["chunk1_text"].as_str().unwrap()
        ),
        prompt
    );
    for (name, t) in both_encoders() {
        assert_eq!(t.encode_llava_prompt(prompt), expected, "{name}");
        assert_eq!(
            t.encode(chunks["chunk0_text"].as_str().unwrap(), false),
            ids_u32(&chunks["chunk0"]),
            "{name}"
        );
        assert_eq!(
            t.encode(chunks["chunk1_text"].as_str().unwrap(), false),
            ids_u32(&chunks["chunk1"]),
            "{name}"
        );
        assert_eq!(t.bos_id(), Some(chunks["bos_id"].as_u64().unwrap() as u32));
    }
}

fn check_cases(t: &SpmTokenizer, cases_file: &Path, what: &str) -> usize {
    let cases = read_json(cases_file);
    let mut failures = Vec::new();
    let list = cases["cases"].as_array().unwrap();
    for c in list {
        let text = c["text"].as_str().unwrap();
        let got = t.encode(text, false);
        let want = ids_u32(&c["ids"]);
        if got != want {
            failures.push(format!("{text:?}: got {got:?}, sentencepiece {want:?}"));
        }
        if let Some(wb) = c.get("ids_with_bos") {
            let got = t.encode(text, true);
            if got != ids_u32(wb) {
                failures.push(format!(
                    "{text:?} with BOS: got {got:?}, sentencepiece {wb}"
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{what}: {} of {} cases differ:\n{}",
        failures.len(),
        list.len(),
        failures.join("\n")
    );
    list.len()
}

#[test]
fn fixture_cases_match_sentencepiece() {
    for (name, t) in both_encoders() {
        let n = check_cases(&t, &fixtures().join("reference/tokenizer_cases.json"), name);
        assert!(n >= 10);
    }
}

#[test]
fn generated_cases_match_sentencepiece() {
    for (name, t) in both_encoders() {
        let n = check_cases(
            &t,
            &fixtures().join("tokenizer-interop/spm_cases.json"),
            name,
        );
        assert!(n >= 300);
    }
}

#[test]
fn no_byte_fallback_model_matches_sentencepiece() {
    // No byte fallback (runs of unknown characters -> one unk), remove_extra_whitespaces,
    // user-defined symbols, UNUSED pieces that are merged through and split back.
    let dir = fixtures().join("tokenizer-interop");
    let t = SpmTokenizer::from_file(&dir.join("nofallback/tokenizer.model")).unwrap();
    let n = check_cases(&t, &dir.join("nofallback_cases.json"), "nofallback");
    assert!(n >= 300);
}

fn assert_vocab_eq(v: &GgufVocab, r: &Value, what: &str) {
    let opt_u32 = |k: &str| r[k].as_u64().map(|x| x as u32);
    let opt_bool = |k: &str| r[k].as_bool();
    assert_eq!(
        v.model,
        r["tokenizer.ggml.model"].as_str().unwrap(),
        "{what}"
    );
    assert_eq!(v.pre, r["tokenizer.ggml.pre"].as_str().unwrap(), "{what}");
    let tokens: Vec<&str> = r["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert_eq!(v.tokens.len(), tokens.len(), "{what}: token count");
    for (i, (a, b)) in v.tokens.iter().zip(&tokens).enumerate() {
        assert_eq!(a, b, "{what}: token {i}");
    }
    let scores: Vec<f32> = r["scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(v.scores.len(), scores.len(), "{what}: score count");
    for (i, (a, b)) in v.scores.iter().zip(&scores).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "{what}: score {i} ({a} vs {b})");
    }
    let types: Vec<i32> = r["token_type"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap() as i32)
        .collect();
    assert_eq!(v.token_types.len(), types.len(), "{what}: token type count");
    for (i, (a, b)) in v.token_types.iter().zip(&types).enumerate() {
        assert_eq!(a, b, "{what}: token type {i} ({:?})", v.tokens[i]);
    }
    assert_eq!(
        v.bos_id,
        opt_u32("tokenizer.ggml.bos_token_id"),
        "{what}: bos"
    );
    assert_eq!(
        v.eos_id,
        opt_u32("tokenizer.ggml.eos_token_id"),
        "{what}: eos"
    );
    assert_eq!(
        v.unk_id,
        opt_u32("tokenizer.ggml.unknown_token_id"),
        "{what}: unk"
    );
    assert_eq!(
        v.pad_id,
        opt_u32("tokenizer.ggml.padding_token_id"),
        "{what}: pad"
    );
    assert_eq!(
        v.add_bos,
        opt_bool("tokenizer.ggml.add_bos_token"),
        "{what}: add_bos"
    );
    assert_eq!(
        v.add_eos,
        opt_bool("tokenizer.ggml.add_eos_token"),
        "{what}: add_eos"
    );
    assert_eq!(
        v.add_space_prefix,
        opt_bool("tokenizer.ggml.add_space_prefix"),
        "{what}: add_space_prefix"
    );
    assert_eq!(
        v.chat_template.as_deref(),
        r["tokenizer.chat_template"].as_str(),
        "{what}: chat_template"
    );
}

fn load_variant(dir: &Path) -> GgufVocab {
    let cfg = read_json(&dir.join("config.json"));
    load_vocab(dir, cfg["vocab_size"].as_u64().unwrap() as usize, &cfg).unwrap()
}

#[test]
fn vocab_matches_llama_cpp_converter() {
    let root = fixtures().join("tokenizer-interop");
    for variant in ["spm", "spm_added", "hf", "hf_added"] {
        let dir = root.join(variant);
        let r = read_json(&dir.join("gguf_vocab.json"));
        let v = load_variant(&dir);
        assert_vocab_eq(&v, &r, variant);
    }
}

#[test]
fn fixture_checkpoint_vocab_matches_llama_cpp_converter() {
    // The checkpoint's own files (tokenizer.model path) ...
    let r = read_json(&fixtures().join("tokenizer-interop/spm/gguf_vocab.json"));
    assert_vocab_eq(&fixture_vocab(), &r, "tiny-llava-mmfuser");
    // ... and the -bin checkpoint's tokenizer.json alone (the fallback path).
    let bin = fixtures().join("tiny-llava-mmfuser-bin");
    let tmp = tempfile::tempdir().unwrap();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "config.json",
    ] {
        std::fs::copy(bin.join(f), tmp.path().join(f)).unwrap();
    }
    let r = read_json(&fixtures().join("tokenizer-interop/hf/gguf_vocab.json"));
    assert_vocab_eq(
        &load_variant(tmp.path()),
        &r,
        "tiny-llava-mmfuser-bin without tokenizer.model",
    );
    // With tokenizer.model present the -bin checkpoint takes the SentencePiece path.
    let v = load_variant(&bin);
    assert_eq!(v.scores[300], fixture_vocab().scores[300]);
}

#[test]
fn vocab_from_tokenizer_json_cannot_encode() {
    let v = load_variant(&fixtures().join("tokenizer-interop/hf"));
    let e = SpmTokenizer::from_vocab(&v).unwrap_err();
    assert!(e.contains("score"), "{e}");
}

#[test]
fn missing_tokenizer_is_an_error_naming_the_files() {
    let tmp = tempfile::tempdir().unwrap();
    let e = load_vocab(tmp.path(), 512, &Value::Null).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("tokenizer.model") && msg.contains("tokenizer.json"),
        "{msg}"
    );
    assert_eq!(e.exit_code(), 1);
}

#[test]
fn corrupt_tokenizer_model_is_an_error_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let model = std::fs::read(fixtures().join("tiny-llava-mmfuser/tokenizer.model")).unwrap();
    let p = tmp.path().join("tokenizer.model");
    for cut in [1usize, 7, model.len() / 2, model.len() - 1] {
        std::fs::write(&p, &model[..cut]).unwrap();
        let e = load_vocab(tmp.path(), 512, &Value::Null)
            .unwrap_err()
            .to_string();
        assert!(e.contains("tokenizer.model"), "{e}");
        assert!(SpmTokenizer::from_file(&p).is_err());
    }
}
