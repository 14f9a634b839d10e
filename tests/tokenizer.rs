//! The tokenizer against third-party output:
//! - ids from the sentencepiece library (fixtures/reference/*.json written by
//!   fixtures/make_fixtures.py; fixtures/tokenizer-interop/*_cases.json written by
//!   tests/interop/make_vocab_ref.py);
//! - GGUF vocabularies written by llama.cpp's convert_hf_to_gguf.py and read back
//!   with gguf-py (fixtures/tokenizer-interop/<variant>/gguf_vocab.json, same script).
use std::path::{Path, PathBuf};

use mmfuser_convert::formats::checkpoint::tokenizer::{load_vocab, GgufVocab, SpmTokenizer};
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
    check_cases_without(t, cases_file, what, &[])
}

/// `check_cases` on the cases whose text contains none of `skip` (tokens added to a
/// vocabulary the cases were not made with); returns the number checked.
fn check_cases_without(t: &SpmTokenizer, cases_file: &Path, what: &str, skip: &[String]) -> usize {
    let cases = read_json(cases_file);
    let mut failures = Vec::new();
    let list: Vec<&Value> = cases["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| {
            let text = c["text"].as_str().unwrap();
            !skip.iter().any(|s| text.contains(s.as_str()))
        })
        .collect();
    for c in &list {
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

/// Tokens, types, ids, flags and template as gguf-py read them back from llama.cpp's
/// converter; scores too, except for tokenizer.json vocabularies, whose scores
/// deliberately differ (gguf-py writes -1000.0; ours are ranked from the merges,
/// checked by `assert_scores_follow_merges` and by encoding instead).
fn assert_vocab_eq(v: &GgufVocab, r: &Value, what: &str) {
    assert_vocab_eq_but_scores(v, r, what);
    let scores = gguf_py_scores(r);
    assert_eq!(v.scores.len(), scores.len(), "{what}: score count");
    for (i, (a, b)) in v.scores.iter().zip(&scores).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "{what}: score {i} ({a} vs {b})");
    }
}

fn gguf_py_scores(r: &Value) -> Vec<f32> {
    r["scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// A tokenizer.json vocabulary (`dir` holds the tokenizer.json it came from):
/// (a) encoding with it as a GGUF SentencePiece vocabulary gives sentencepiece's ids on
///     the fixture cases (the same vocabulary as tiny-llava-mmfuser/tokenizer.model;
///     cases containing a token added beyond the 512 base pieces are left out);
/// (b) its scores follow the merge ranks strictly: ordering pieces by the lowest rank of
///     a merge producing them orders their scores strictly descending, and every piece no
///     merge produces scores below all of them.
fn assert_tokenizer_json_scores(v: &GgufVocab, dir: &Path, what: &str) {
    let t = SpmTokenizer::from_vocab(v).unwrap_or_else(|e| panic!("{what}: {e}"));
    let added = &v.tokens[512..];
    let n = check_cases_without(
        &t,
        &fixtures().join("tokenizer-interop/spm_cases.json"),
        what,
        added,
    );
    assert!(n >= 300, "{what}: {n} cases");
    let n = check_cases_without(
        &t,
        &fixtures().join("reference/tokenizer_cases.json"),
        what,
        added,
    );
    assert!(n >= 10, "{what}: {n} cases");

    let tj = read_json(&dir.join("tokenizer.json"));
    let merges = tj["model"]["merges"].as_array().unwrap();
    assert!(merges.len() >= 100, "{what}: {} merges", merges.len());
    let mut first_rank: Vec<Option<usize>> = vec![None; v.tokens.len()];
    for (rank, m) in merges.iter().enumerate() {
        let (a, b) = match m {
            Value::String(s) => s.split_once(' ').unwrap(),
            Value::Array(p) => (p[0].as_str().unwrap(), p[1].as_str().unwrap()),
            _ => panic!("{what}: merge {m}"),
        };
        let id = v
            .tokens
            .iter()
            .position(|x| *x == format!("{a}{b}"))
            .unwrap();
        first_rank[id].get_or_insert(rank);
    }
    let mut merged: Vec<(usize, f32)> = first_rank
        .iter()
        .zip(&v.scores)
        .filter_map(|(r, s)| r.map(|r| (r, *s)))
        .collect();
    merged.sort_by_key(|&(r, _)| r);
    for w in merged.windows(2) {
        assert!(
            w[0].1 > w[1].1,
            "{what}: merge ranks {} and {} give scores {} and {}",
            w[0].0,
            w[1].0,
            w[0].1,
            w[1].1
        );
    }
    let lowest_merged = merged.last().unwrap().1;
    for (i, r) in first_rank.iter().enumerate() {
        if r.is_none() {
            assert!(
                v.scores[i] < lowest_merged,
                "{what}: unmerged {:?} scores {} >= {lowest_merged}",
                v.tokens[i],
                v.scores[i]
            );
        }
    }
}

fn assert_vocab_eq_but_scores(v: &GgufVocab, r: &Value, what: &str) {
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
    for variant in ["spm", "spm_added"] {
        let dir = root.join(variant);
        let r = read_json(&dir.join("gguf_vocab.json"));
        let v = load_variant(&dir);
        assert_vocab_eq(&v, &r, variant);
    }
    for variant in ["hf", "hf_added"] {
        let dir = root.join(variant);
        let r = read_json(&dir.join("gguf_vocab.json"));
        let v = load_variant(&dir);
        assert_vocab_eq_but_scores(&v, &r, variant);
        assert_tokenizer_json_scores(&v, &dir, variant);
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
    let what = "tiny-llava-mmfuser-bin without tokenizer.model";
    let v = load_variant(tmp.path());
    assert_vocab_eq_but_scores(&v, &r, what);
    assert_tokenizer_json_scores(&v, tmp.path(), what);
    // With tokenizer.model present the -bin checkpoint takes the SentencePiece path.
    let v = load_variant(&bin);
    assert_eq!(v.scores[300], fixture_vocab().scores[300]);
}

#[test]
fn merges_as_strings_rank_like_merges_as_pairs() {
    // tokenizers writes merges as ["a", "b"] (0.20+) or "a b" (older): same ranks, same scores.
    let src = fixtures().join("tokenizer-interop/hf");
    let tmp = tempfile::tempdir().unwrap();
    for f in [
        "tokenizer_config.json",
        "special_tokens_map.json",
        "config.json",
    ] {
        std::fs::copy(src.join(f), tmp.path().join(f)).unwrap();
    }
    let mut tj = read_json(&src.join("tokenizer.json"));
    let merges = tj["model"]["merges"].as_array_mut().unwrap();
    for m in merges.iter_mut() {
        let p = m.as_array().unwrap();
        *m = Value::String(format!(
            "{} {}",
            p[0].as_str().unwrap(),
            p[1].as_str().unwrap()
        ));
    }
    std::fs::write(tmp.path().join("tokenizer.json"), tj.to_string()).unwrap();
    let v = load_variant(tmp.path());
    assert_eq!(v.scores, load_variant(&src).scores);
    assert_tokenizer_json_scores(&v, tmp.path(), "merges as strings");
}

#[test]
fn llama_cpp_tokenizer_json_scores_cannot_encode() {
    // llama.cpp's converter gives a tokenizer.json vocabulary -1000.0 everywhere: refused.
    let dir = fixtures().join("tokenizer-interop/hf");
    let mut v = load_variant(&dir);
    v.scores = gguf_py_scores(&read_json(&dir.join("gguf_vocab.json")));
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
