//! The GGUF vocabulary (`tokenizer.ggml.*`) exactly as llama.cpp's
//! convert_hf_to_gguf.py builds it for LLaMA (`LlamaModel.set_vocab`):
//! - `tokenizer.model` present: `_create_vocab_sentencepiece` (conversion/base.py);
//! - else `tokenizer.json`: gguf-py `LlamaHfVocab` (`_set_vocab_llama_hf`), except the
//!   scores: ranked from the BPE merges instead of -1000.0 (see `scores_from_merges`);
//! - special ids / add flags / chat template: gguf-py `SpecialVocab(dir, n_vocab=len(tokens))`;
//! - `add_space_prefix` from tokenizer_config `add_prefix_space` (conversion/llama.py).
//!
//! Source read: llama.cpp vendored in llama-cpp-python 0.3.36 (commit 0c1e57098,
//! gguf-py 0.19.0 as vendored there, which differs from PyPI gguf 0.19.0 in
//! SpecialVocab: the post-processor's add_bos/add_eos win over tokenizer_config).
use std::collections::{HashMap, HashSet};
use std::path::Path;

use serde_json::{Map, Value};

use super::proto::{piece_type, SpmModel};
use crate::ground::error::{Error, Result};

/// `tokenizer.ggml.*` values for a SentencePiece ("llama") vocabulary.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`: always "llama".
    pub model: String,
    /// `tokenizer.ggml.pre`: always "default".
    pub pre: String,
    /// `tokenizer.ggml.tokens` in id order.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.scores` (FLOAT32).
    pub scores: Vec<f32>,
    /// `tokenizer.ggml.token_type` (INT32): NORMAL 1, UNKNOWN 2, CONTROL 3,
    /// USER_DEFINED 4, UNUSED 5, BYTE 6.
    pub token_types: Vec<i32>,
    /// `tokenizer.ggml.{bos,eos,unknown,padding}_token_id`; None = key not written.
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub unk_id: Option<u32>,
    pub pad_id: Option<u32>,
    /// `tokenizer.ggml.add_bos_token` / `add_eos_token`; None = key not written
    /// (llama.cpp's loader then uses add_bos = true, add_eos = false for "llama").
    pub add_bos: Option<bool>,
    pub add_eos: Option<bool>,
    /// `tokenizer.ggml.add_space_prefix`: only when tokenizer_config.json has
    /// `add_prefix_space` (loader default true).
    pub add_space_prefix: Option<bool>,
    /// `tokenizer.chat_template`.
    pub chat_template: Option<String>,
    /// What was skipped while reading, as convert_hf_to_gguf.py warns of it (out-of-range ids,
    /// pieces past vocab_size): the caller shows them; a reader prints nothing.
    pub warnings: Vec<String>,
}

impl GgufVocab {
    /// add_bos as llama.cpp's loader will see it (default true for SPM vocabularies).
    pub fn effective_add_bos(&self) -> bool {
        self.add_bos.unwrap_or(true)
    }
    /// add_eos as llama.cpp's loader will see it (default false).
    pub fn effective_add_eos(&self) -> bool {
        self.add_eos.unwrap_or(false)
    }
}

/// Tokenizer files (tokenizer.json, tokenizer_config.json, added_tokens.json, ...), size-capped.
fn read_json(path: &Path) -> Result<Value> {
    crate::formats::checkpoint::config::read_json_capped(path, crate::ground::fsutil::CAP_TOKENIZER)
}

fn read_json_object(path: &Path) -> Result<Option<Map<String, Value>>> {
    if !path.is_file() {
        return Ok(None);
    }
    match read_json(path)? {
        Value::Object(m) => Ok(Some(m)),
        _ => Err(Error::input(path, "expected a JSON object")),
    }
}

/// Python truthiness of a JSON value (None/absent = false).
fn truthy(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_f64().is_some_and(|f| f != 0.0),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
    }
}

/// Python `s == v` for a str s and a JSON value v.
fn str_eq(v: Option<&Value>, s: &str) -> bool {
    matches!(v, Some(Value::String(x)) if x == s)
}

/// `does_token_look_special` (conversion/base.py).
fn does_token_look_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<\u{ff5c}") && t.ends_with("\u{ff5c}>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// `re.fullmatch(br"<0x[0-9A-Fa-f]{2}>", text)`.
fn is_byte_token(t: &str) -> bool {
    let b = t.as_bytes();
    b.len() == 6
        && b.starts_with(b"<0x")
        && b[5] == b'>'
        && b[3].is_ascii_hexdigit()
        && b[4].is_ascii_hexdigit()
}

/// Load the GGUF vocabulary of a checkpoint directory. `config_vocab_size` is
/// config.json's `vocab_size` (0 = use the tokenizer's size); `config` is the
/// parsed config.json (its `*_token_id` keys are the last source of special ids).
pub fn load_vocab(dir: &Path, config_vocab_size: usize, config: &Value) -> Result<GgufVocab> {
    let spm_path = dir.join("tokenizer.model");
    let json_path = dir.join("tokenizer.json");
    let tc_path = dir.join("tokenizer_config.json");
    let tokenizer_config = read_json_object(&tc_path)?;
    let mut warnings = vec![];

    let (tokens, scores, token_types) = if spm_path.is_file() {
        vocab_from_spm(
            dir,
            &spm_path,
            config_vocab_size,
            tokenizer_config.as_ref(),
            &tc_path,
            &mut warnings,
        )?
    } else if json_path.is_file() {
        let (mut tokens, mut scores, mut types) =
            vocab_from_tokenizer_json(&json_path, tokenizer_config.as_ref(), dir)?;
        // Embedding rows past the tokenizer (llava-hf pads vocab_size to 32064): llama.cpp takes
        // n_vocab from the token list and refuses token_embd with more rows, so pad as the
        // SentencePiece path does (convert_hf_to_gguf's tokenizer.json path does not, and its
        // file does not load).
        for i in tokens.len()..config_vocab_size {
            tokens.push(format!("[PAD{i}]"));
            scores.push(-1000.0);
            types.push(piece_type::UNUSED);
        }
        (tokens, scores, types)
    } else if let Some(p) = [&spm_path, &json_path]
        .into_iter()
        .find(|p| std::fs::symlink_metadata(p).is_ok())
    {
        // There, but not a regular file (a FIFO, a directory, a dangling link): say so.
        crate::ground::fsutil::open_input(p)?;
        return Err(Error::input(p, "is not a regular file"));
    } else {
        return Err(Error::input(
            dir,
            "no tokenizer found: looked for tokenizer.model (SentencePiece) and tokenizer.json (Hugging Face)",
        ));
    };

    let mut v = GgufVocab {
        model: "llama".into(),
        pre: "default".into(),
        tokens,
        scores,
        token_types,
        bos_id: None,
        eos_id: None,
        unk_id: None,
        pad_id: None,
        add_bos: None,
        add_eos: None,
        add_space_prefix: None,
        chat_template: None,
        warnings,
    };
    special_vocab(dir, tokenizer_config.as_ref(), config, &mut v)?;
    if let Some(tc) = &tokenizer_config {
        // conversion/llama.py: `if (add_prefix_space := tc.get("add_prefix_space")) is not None`.
        match tc.get("add_prefix_space") {
            None | Some(Value::Null) => {}
            Some(Value::Bool(b)) => v.add_space_prefix = Some(*b),
            Some(other) => {
                return Err(Error::input(
                    &tc_path,
                    format!("add_prefix_space must be a boolean, got {other}"),
                ))
            }
        }
    }
    Ok(v)
}

type Lists = (Vec<String>, Vec<f32>, Vec<i32>);

/// `_create_vocab_sentencepiece` (conversion/base.py).
fn vocab_from_spm(
    dir: &Path,
    spm_path: &Path,
    config_vocab_size: usize,
    tokenizer_config: Option<&Map<String, Value>>,
    tc_path: &Path,
    warnings: &mut Vec<String>,
) -> Result<Lists> {
    let m = SpmModel::load(spm_path)?;
    let vocab_size = if config_vocab_size > 0 {
        config_vocab_size
    } else {
        m.pieces.len()
    };
    let mut tokens: Vec<String> = (0..vocab_size).map(|i| format!("[PAD{i}]")).collect();
    let mut scores = vec![-10000.0f32; vocab_size];
    let mut types = vec![piece_type::UNUSED; vocab_size];
    if m.pieces.len() > vocab_size {
        warnings.push(format!(
            "{}: {} pieces but vocab_size is {vocab_size}; pieces from id {vocab_size} on are ignored \
             (as convert_hf_to_gguf.py does)",
            spm_path.display(),
            m.pieces.len()
        ));
    }
    for (id, p) in m.pieces.iter().enumerate().take(vocab_size) {
        // IsUnknown -> UNKNOWN, IsControl -> CONTROL, IsUnused -> UNUSED, IsByte -> BYTE, else
        // NORMAL (a USER_DEFINED piece of the model becomes NORMAL).
        let t = match p.kind {
            piece_type::UNKNOWN | piece_type::CONTROL | piece_type::UNUSED | piece_type::BYTE => {
                p.kind
            }
            _ => piece_type::NORMAL,
        };
        tokens[id] = p.piece.clone();
        scores[id] = p.score;
        types[id] = t;
    }

    let added_path = dir.join("added_tokens.json");
    if let Some(added) = read_json_object(&added_path)? {
        for (text, id) in &added {
            let id = id.as_u64().ok_or_else(|| {
                Error::input(
                    &added_path,
                    format!("token {text:?}: id {id} is not a non-negative integer"),
                )
            })?;
            if id as usize >= vocab_size || id > u32::MAX as u64 {
                warnings.push(format!(
                    "{}: ignoring token {id}: out of range, max={}",
                    added_path.display(),
                    vocab_size - 1
                ));
                continue;
            }
            let id = id as usize;
            tokens[id] = text.clone();
            scores[id] = -1000.0;
            types[id] = piece_type::USER_DEFINED;
        }
    }

    if let Some(tc) = tokenizer_config {
        match tc.get("added_tokens_decoder") {
            None => {}
            Some(Value::Object(dec)) => {
                for (key, data) in dec {
                    let id: usize = key.trim().parse().map_err(|_| {
                        Error::input(
                            tc_path,
                            format!("added_tokens_decoder: key {key:?} is not a token id"),
                        )
                    })?;
                    let content = data.get("content").and_then(Value::as_str).ok_or_else(|| {
                        Error::input(
                            tc_path,
                            format!("added_tokens_decoder[{key}]: missing string 'content'"),
                        )
                    })?;
                    if id >= vocab_size {
                        warnings.push(format!(
                            "{}: ignoring token {id}: out of range, max={}",
                            tc_path.display(),
                            vocab_size - 1
                        ));
                        continue;
                    }
                    let text = if truthy(data.get("special")) || does_token_look_special(content) {
                        types[id] = piece_type::CONTROL;
                        content.to_string()
                    } else {
                        types[id] = piece_type::USER_DEFINED;
                        content.replace('\u{2581}', " ") // pre-normalize user-defined spaces
                    };
                    scores[id] = -1000.0;
                    tokens[id] = text;
                }
            }
            Some(_) => {
                return Err(Error::input(
                    tc_path,
                    "added_tokens_decoder must be an object",
                ))
            }
        }
    }
    Ok((tokens, scores, types))
}

/// Names of the special tokens transformers knows for this tokenizer
/// (`all_special_tokens`: bos/eos/unk/sep/pad/cls/mask + extra/additional special tokens).
fn named_special_tokens(tc: Option<&Map<String, Value>>, dir: &Path) -> Result<Vec<String>> {
    const ATTRS: [&str; 7] = [
        "bos_token",
        "eos_token",
        "unk_token",
        "sep_token",
        "pad_token",
        "cls_token",
        "mask_token",
    ];
    let mut kv: Map<String, Value> = tc.cloned().unwrap_or_default();
    // Legacy special_tokens_map.json is merged only when tokenizer_config has no added_tokens_decoder.
    if !kv.contains_key("added_tokens_decoder") {
        if let Some(stm) = read_json_object(&dir.join("special_tokens_map.json"))? {
            for (k, v) in stm {
                if !truthy(kv.get(&k)) {
                    kv.insert(k, v);
                }
            }
        }
    }
    // LlamaTokenizer's constructor defaults.
    for (k, d) in [
        ("bos_token", "<s>"),
        ("eos_token", "</s>"),
        ("unk_token", "<unk>"),
    ] {
        kv.entry(k.to_string())
            .or_insert_with(|| Value::String(d.into()));
    }
    let content = |v: &Value| -> Option<String> {
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
            _ => None,
        }
    };
    let mut out: Vec<String> = Vec::new();
    let mut push = |s: String| {
        if !out.contains(&s) {
            out.push(s)
        }
    };
    for a in ATTRS {
        if let Some(s) = kv.get(a).and_then(content) {
            push(s);
        }
    }
    for key in ["additional_special_tokens", "extra_special_tokens"] {
        match kv.get(key) {
            Some(Value::Array(a)) => a.iter().filter_map(content).for_each(&mut push),
            Some(Value::Object(o)) => o.values().filter_map(content).for_each(&mut push),
            _ => {}
        }
    }
    Ok(out)
}

/// Run a call into the tokenizers library on the file `path`, a panic of the library becoming an
/// error naming the file: tokenizers 0.23 indexes past a buffer when a merge's two halves are
/// together longer than every vocabulary entry (found by fuzzing), and a hostile file must not
/// crash a conversion. The panic hook is silenced meanwhile (it is process-wide; this runs while
/// reading inputs, before any parallel work).
pub(crate) fn tokenizers_call<T>(path: &Path, f: impl FnOnce() -> T) -> Result<T> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    r.map_err(|p| {
        let why = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Error::input(
            path,
            format!("the tokenizers library cannot read this file (it panicked: {why})"),
        )
    })
}

/// `tokenizers::Tokenizer::from_file`, its errors and panics naming the file.
pub(crate) fn tokenizers_from_file(path: &Path) -> Result<tokenizers::Tokenizer> {
    tokenizers_call(path, || tokenizers::Tokenizer::from_file(path))?
        .map_err(|e| Error::input(path, format!("tokenizers: {e}")))
}

/// gguf-py `LlamaHfVocab` + `_set_vocab_llama_hf` for tokens and types: BYTE for
/// `<0xNN>`, CONTROL for special ids, NORMAL otherwise; added tokens beyond the
/// base vocabulary appended in id order, CONTROL if special else USER_DEFINED.
/// No padding to config vocab_size (the converter does none on this path).
/// Scores deliberately differ from llama.cpp's converter (which writes -1000.0
/// everywhere, so a SentencePiece runtime cannot rank merges): they come from
/// the BPE merge ranks (`scores_from_merges`).
fn vocab_from_tokenizer_json(
    path: &Path,
    tokenizer_config: Option<&Map<String, Value>>,
    dir: &Path,
) -> Result<Lists> {
    let raw = read_json(path)?;
    let model = raw
        .get("model")
        .ok_or_else(|| Error::input(path, "no 'model' section"))?;
    let mtype = model.get("type").and_then(Value::as_str).unwrap_or("");
    let byte_fallback = model.get("byte_fallback").and_then(Value::as_bool);
    let ignore_merges = model
        .get("ignore_merges")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if mtype == "BPE" && ignore_merges && !byte_fallback.unwrap_or(true) {
        return Err(Error::input(
            path,
            "a Llama-3 style byte-level BPE vocabulary is not a SentencePiece vocabulary",
        ));
    }
    let decoder_type = raw
        .get("decoder")
        .and_then(|d| d.get("type"))
        .and_then(Value::as_str);
    if mtype != "BPE" || !byte_fallback.unwrap_or(false) || decoder_type != Some("Sequence") {
        return Err(Error::input(
            path,
            format!(
                "not a LLaMA SentencePiece-style tokenizer (needs model.type BPE with byte_fallback and a \
                 Sequence decoder; found model.type {mtype:?}, byte_fallback {byte_fallback:?}, decoder {decoder_type:?})"
            ),
        ));
    }
    let tok = tokenizers_from_file(path)?;
    let base = tok.get_vocab_size(false);
    let vocab = tok.get_vocab(true);
    let mut reverse: HashMap<u32, &str> = HashMap::with_capacity(vocab.len());
    for (t, &i) in &vocab {
        reverse.insert(i, t.as_str());
    }
    let mut added: Vec<(u32, String)> = tok
        .get_added_tokens_decoder()
        .into_iter()
        .filter(|(id, _)| *id as usize >= base)
        .map(|(id, t)| (id, t.content))
        .collect();
    added.sort();
    for (k, (id, t)) in added.iter().enumerate() {
        if *id as usize != base + k {
            return Err(Error::input(
                path,
                format!("added token {t:?} has id {id} but would be stored at {} (ids must follow the base vocabulary without gaps)", base + k),
            ));
        }
    }
    let specials: HashMap<String, u32> = named_special_tokens(tokenizer_config, dir)?
        .into_iter()
        .filter_map(|t| vocab.get(&t).map(|&i| (t, i)))
        .collect();
    let special_ids: HashSet<u32> = specials.values().copied().collect();

    let mut tokens = Vec::with_capacity(base + added.len());
    let mut types = Vec::with_capacity(base + added.len());
    for id in 0..base as u32 {
        let text = *reverse
            .get(&id)
            .ok_or_else(|| Error::input(path, format!("no token with id {id}")))?;
        let t = if is_byte_token(text) {
            piece_type::BYTE
        } else if special_ids.contains(&id) {
            piece_type::CONTROL
        } else {
            piece_type::NORMAL
        };
        tokens.push(text.to_string());
        types.push(t);
    }
    for (_, text) in added {
        let t = if specials.contains_key(&text) {
            piece_type::CONTROL
        } else {
            piece_type::USER_DEFINED
        };
        tokens.push(text);
        types.push(t);
    }
    let merges = model
        .get("merges")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::input(path, "model.merges is not a list"))?;
    let scores = scores_from_merges(merges, &tokens).map_err(|e| Error::input(path, e))?;
    Ok((tokens, scores, types))
}

/// Placeholder score gguf-py's `LlamaHfVocab` gives every token.
const HF_PLACEHOLDER_SCORE: f32 = -1000.0;

/// SentencePiece scores that make SentencePiece-BPE (merge the adjacent pair whose
/// concatenation has the highest score, leftmost on ties) follow HF BPE (apply the
/// lowest-ranked merge, leftmost on ties): a piece some merge produces scores
/// -(lowest such rank); every other piece scores below all of those (the -1000.0
/// placeholder while that suffices). transformers' SpmConverter lists every split of
/// a piece and ranks merges by the original piece scores, so this keeps their order.
/// `merges[r]` is rank r, as `"a b"` or `["a", "b"]`.
fn scores_from_merges(
    merges: &[Value],
    tokens: &[String],
) -> std::result::Result<Vec<f32>, String> {
    // Ranks must stay distinct once stored as f32.
    if merges.len() > 1 << 24 {
        return Err(format!(
            "{} merges are too many to rank in f32 scores",
            merges.len()
        ));
    }
    let floor = HF_PLACEHOLDER_SCORE.min(-(merges.len() as f32));
    let mut ids: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        ids.entry(t.as_str()).or_insert(i);
    }
    let mut scores = vec![floor; tokens.len()];
    let mut done = vec![false; tokens.len()];
    for (rank, m) in merges.iter().enumerate() {
        let (a, b) = merge_pair(m).ok_or_else(|| {
            format!("model.merges[{rank}] is neither \"a b\" nor [\"a\", \"b\"]: {m}")
        })?;
        let piece = format!("{a}{b}");
        let &id = ids.get(piece.as_str()).ok_or_else(|| {
            format!("model.merges[{rank}] ({a:?}, {b:?}) makes {piece:?}, which is not in the vocabulary")
        })?;
        // Ranks ascend, so the first merge making a piece is its lowest; 0.0 - r keeps +0.0 at rank 0.
        if !done[id] {
            done[id] = true;
            scores[id] = 0.0 - rank as f32;
        }
    }
    Ok(scores)
}

/// One tokenizer.json merge: `"a b"` (split at the first space) or `["a", "b"]`.
fn merge_pair(m: &Value) -> Option<(&str, &str)> {
    match m {
        Value::String(s) => s.split_once(' '),
        Value::Array(a) => match a.as_slice() {
            [Value::String(x), Value::String(y)] => Some((x.as_str(), y.as_str())),
            _ => None,
        },
        _ => None,
    }
}

/// `tokenizer_config[k] = v` when there is a tokenizer_config.
fn tc_set(tc: &mut Option<Map<String, Value>>, k: &str, v: Value) {
    if let Some(m) = tc.as_mut() {
        m.insert(k.to_string(), v);
    }
}

/// gguf-py `SpecialVocab(dir, n_vocab=len(tokens))` for the keys GgufVocab carries:
/// special ids from tokenizer.json `added_tokens` matched against tokenizer_config
/// `*_token`, then config.json `*_token_id` (first one set wins); add_bos/add_eos from
/// tokenizer.json's post-processor, then tokenizer_config `add_*_token`; chat template.
/// (sep/cls/mask/eot/eom ids are not carried; a negative id is skipped, where the
/// converter raises ValueError.)
fn special_vocab(
    dir: &Path,
    tc: Option<&Map<String, Value>>,
    config: &Value,
    v: &mut GgufVocab,
) -> Result<()> {
    let n_vocab = v.tokens.len();
    let mut ids: HashMap<&'static str, u32> = HashMap::new();
    let mut warnings = vec![];
    let set_id = |ids: &mut HashMap<&'static str, u32>,
                  warnings: &mut Vec<String>,
                  typ: &'static str,
                  tid: Option<&Value>,
                  src: &Path| {
        let Some(Value::Number(n)) = tid else { return };
        let Some(i) = n.as_i64() else { return };
        if i < 0 {
            warnings.push(format!(
                "{}: invalid value for special token type {typ}: {i} - skipping",
                src.display()
            ));
            return;
        }
        if (i as u64) < n_vocab as u64 {
            ids.entry(typ).or_insert(i as u32);
        } else {
            warnings.push(format!(
                "{}: special token type {typ}, id {i} out of range, must be under {n_vocab} - skipping",
                src.display()
            ));
        }
    };
    let mut add: HashMap<&'static str, bool> = HashMap::new();

    // _try_load_from_tokenizer_json
    let tj_path = dir.join("tokenizer.json");
    let tokenizer_json = if tj_path.is_file() {
        Some(read_json(&tj_path)?)
    } else {
        None
    };
    let empty = Vec::new();
    let added_tokens: &Vec<Value> = tokenizer_json
        .as_ref()
        .and_then(|t| t.get("added_tokens"))
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    let mut tc: Option<Map<String, Value>> = tc.cloned();
    if let Some(tokj) = &tokenizer_json {
        let get =
            |tc: &Option<Map<String, Value>>, k: &str| tc.as_ref().and_then(|m| m.get(k)).cloned();
        let mut special_bos = get(&tc, "bos_token");
        let mut special_cls = get(&tc, "cls_token");
        let mut special_eos = get(&tc, "eos_token");
        let special_sep = get(&tc, "sep_token");
        let tc_truthy = tc.as_ref().is_some_and(|m| !m.is_empty());
        if !truthy(special_bos.as_ref()) && truthy(special_cls.as_ref()) && tc_truthy {
            special_bos = special_cls.clone();
            tc_set(
                &mut tc,
                "bos_token",
                special_bos.clone().unwrap_or(Value::Null),
            );
        }
        if !truthy(special_eos.as_ref()) && truthy(special_sep.as_ref()) && tc_truthy {
            special_eos = special_sep.clone();
            tc_set(
                &mut tc,
                "eos_token",
                special_eos.clone().unwrap_or(Value::Null),
            );
        }
        if let Some(pp) = tokj.get("post_processor").filter(|p| truthy(Some(p))) {
            let procs: Vec<&Value> = match pp.get("processors") {
                Some(Value::Array(a)) => a.iter().collect(),
                _ => vec![pp],
            };
            for p in procs {
                match p.get("type").and_then(Value::as_str) {
                    Some("ByteLevel") => {
                        add.entry("bos").or_insert(false);
                        add.entry("eos").or_insert(false);
                    }
                    Some("RobertaProcessing") => {
                        add.insert("bos", true);
                        add.insert("eos", true);
                        if !truthy(special_cls.as_ref()) && tc_truthy {
                            special_cls = p
                                .get("cls")
                                .and_then(|c| c.get(0))
                                .cloned()
                                .or_else(|| special_bos.clone());
                            tc_set(
                                &mut tc,
                                "cls_token",
                                special_cls.clone().unwrap_or(Value::Null),
                            );
                        }
                        // (sep handling only affects sep_token, which is not carried)
                    }
                    Some("TemplateProcessing") => {
                        let single = p
                            .get("single")
                            .and_then(Value::as_array)
                            .cloned()
                            .unwrap_or_default();
                        let special_of = |e: &Value| -> Option<String> {
                            e.get("SpecialToken")
                                .and_then(|s| s.get("id"))
                                .and_then(Value::as_str)
                                .filter(|s| !s.is_empty())
                                .map(str::to_string)
                        };
                        if single.len() > 1 {
                            if let Some(first) = special_of(&single[0]) {
                                let is_known = |b: &Option<Value>, c: &Option<Value>| {
                                    str_eq(b.as_ref(), &first) || str_eq(c.as_ref(), &first)
                                };
                                if !tc_truthy {
                                    special_bos = Some(Value::String(first.clone()));
                                } else if !is_known(&special_bos, &special_cls) {
                                    if !truthy(special_bos.as_ref()) {
                                        special_bos = Some(Value::String(first.clone()));
                                        tc_set(&mut tc, "bos_token", Value::String(first.clone()));
                                    }
                                    if !truthy(special_cls.as_ref()) {
                                        special_cls = Some(Value::String(first.clone()));
                                        tc_set(&mut tc, "cls_token", Value::String(first.clone()));
                                    }
                                }
                                add.insert("bos", is_known(&special_bos, &special_cls));
                            }
                            if let Some(last) = special_of(&single[single.len() - 1]) {
                                if !tc_truthy {
                                    special_eos = Some(Value::String(last.clone()));
                                } else if !str_eq(special_eos.as_ref(), &last) {
                                    // The old EOS becomes eot/eom (not carried); EOS is overridden.
                                    special_eos = Some(Value::String(last.clone()));
                                    tc_set(&mut tc, "eos_token", Value::String(last.clone()));
                                }
                                add.insert("eos", str_eq(special_eos.as_ref(), &last));
                            }
                        }
                        // (the `pair` template only decides add_sep, which is not carried)
                    }
                    _ => {}
                }
            }
        }
    }
    if let Some(tcm) = tc.as_ref().filter(|m| !m.is_empty()) {
        // Chat template: tokenizer_config, else chat_template.jinja, else chat_template.json.
        let jinja = dir.join("chat_template.jinja");
        let cjson = dir.join("chat_template.json");
        let alt: Option<Value> = if jinja.is_file() {
            Some(Value::String(crate::ground::fsutil::read_input_text(
                &jinja,
                crate::ground::fsutil::CAP_CONFIG,
            )?))
        } else if cjson.is_file() {
            read_json(&cjson)?.get("chat_template").cloned()
        } else {
            None
        };
        let ct = match tcm.get("chat_template") {
            Some(x) => Some(x.clone()),
            None => alt,
        };
        v.chat_template = match ct {
            Some(Value::String(s)) => Some(s),
            // A list of {name, template}: GGUFWriter.add_chat_template writes the "default" one
            // as tokenizer.chat_template.
            Some(Value::Array(a)) => a
                .iter()
                .find(|c| c.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|c| c.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        };
        let tc_path = dir.join("tokenizer_config.json");
        for typ in ["bos", "eos", "unk", "pad"] {
            if let Some(Value::Bool(b)) = tcm.get(&format!("add_{typ}_token")) {
                add.entry(typ).or_insert(*b);
            }
            let content = match tcm.get(&format!("{typ}_token")) {
                Some(Value::String(s)) => s.as_str(),
                Some(Value::Object(o)) => match o.get("content") {
                    Some(Value::String(s)) => s.as_str(),
                    _ => continue,
                },
                _ => continue,
            };
            let tid = added_tokens
                .iter()
                .find(|a| str_eq(a.get("content"), content))
                .and_then(|a| a.get("id"));
            set_id(&mut ids, &mut warnings, typ, tid, &tc_path);
        }
    }
    // _try_load_from_config_json
    let cfg_path = dir.join("config.json");
    for typ in ["bos", "eos", "unk", "pad"] {
        let key = format!("{typ}_token_id");
        let mut tid = config.get(&key).filter(|x| !x.is_null());
        if tid.is_none() {
            tid = config.get("text_config").and_then(|t| t.get(&key));
        }
        set_id(&mut ids, &mut warnings, typ, tid, &cfg_path);
    }
    v.bos_id = ids.get("bos").copied();
    v.eos_id = ids.get("eos").copied();
    v.unk_id = ids.get("unk").copied();
    v.pad_id = ids.get("pad").copied();
    v.add_bos = add.get("bos").copied();
    v.add_eos = add.get("eos").copied();
    v.warnings.extend(warnings);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn look_special_and_byte_tokens() {
        assert!(does_token_look_special("<|im_start|>"));
        assert!(does_token_look_special("<unused12>"));
        assert!(does_token_look_special("<pad>"));
        assert!(!does_token_look_special("<image>"));
        assert!(is_byte_token("<0x0A>") && is_byte_token("<0xfe>"));
        assert!(!is_byte_token("<0x0G>") && !is_byte_token("<0x0A"));
    }

    #[test]
    fn missing_tokenizer_names_the_files() {
        let d = tempfile::tempdir().unwrap();
        let e = load_vocab(d.path(), 10, &Value::Null)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tokenizer.model") && e.contains("tokenizer.json"),
            "{e}"
        );
    }
}

#[cfg(test)]
mod hostile_tests {
    //! Hostile files straight to the loader; the cases through the CLI are in tests/hostile/.
    use super::*;

    /// Fuzz target tokenizer_json, crash-4196d21d: the tokenizers library (0.23) indexes past its
    /// buffer when a merge's two halves are in the vocabulary but together longer than every
    /// entry; the panic must become an error naming tokenizer.json.
    #[test]
    fn tokenizers_panic_on_a_merge_longer_than_the_vocabulary_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let j = r#"{"model": {"type": "BPE", "byte_fallback": true, "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "aaaa": 3, "<0x41>": 4}, "merges": [["aaaa", "aaaa"]]}, "decoder": {"type": "Sequence", "decoders": []}}"#;
        std::fs::write(tmp.path().join("tokenizer.json"), j).unwrap();
        let e = load_vocab(tmp.path(), 0, &serde_json::json!({}))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tokenizer.json") && e.contains("panicked"),
            "{e}"
        );
    }
}
