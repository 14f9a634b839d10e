//! SentencePiece BPE encoding (what the slow LLaMA tokenizer does), for prompts.
//!
//! Port of sentencepiece's `normalizer.cc` (identity rule: no charsmap) and
//! `bpe_model.cc` `Model::SampleEncode` without sampling, plus the byte-fallback /
//! unknown handling of `sentencepiece_processor.cc`:
//! - normalise: optional removal of extra spaces, dummy prefix, ' ' -> U+2581;
//! - split into characters, user-defined pieces matched first as whole strings
//!   (longest match) and never merged further;
//! - repeatedly merge the adjacent pair whose concatenation is a NORMAL /
//!   USER_DEFINED / UNUSED piece with the highest score (ties: leftmost);
//! - UNUSED pieces are split back into the pair that formed them;
//! - pieces not in the vocabulary become `<0xNN>` byte pieces of their UTF-8
//!   bytes when byte fallback is on, else one unk id per run of unknowns.
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::path::Path;

use super::proto::{model_type, piece_type, SpmModel};
use super::vocab::GgufVocab;
use crate::ground::error::{Error, Result};

/// The id LLaVA uses for the image placeholder in `input_ids` (IMAGE_TOKEN_INDEX).
pub const IMAGE_TOKEN_INDEX: i64 = -200;

const SPACE_SYMBOL: &str = "\u{2581}";

/// A SentencePiece BPE tokenizer.
#[derive(Debug, Clone)]
pub struct SpmTokenizer {
    pieces: Vec<String>,
    scores: Vec<f32>,
    kinds: Vec<i32>,
    /// NORMAL, USER_DEFINED and UNUSED pieces (sentencepiece's `pieces_`): merge targets.
    normal: HashMap<String, u32>,
    /// All other pieces (UNKNOWN, CONTROL, BYTE): `reserved_id_map_`.
    reserved: HashMap<String, u32>,
    /// USER_DEFINED pieces, longest first.
    user_defined: Vec<String>,
    unk_id: Option<u32>,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    byte_fallback: bool,
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
    escape_whitespaces: bool,
    treat_whitespace_as_suffix: bool,
}

#[derive(Debug, Clone, Copy)]
struct Symbol {
    start: usize,
    end: usize,
    prev: Option<usize>,
    next: Option<usize>,
    freeze: bool,
}

#[derive(Debug, Clone, Copy)]
struct Pair {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl PartialEq for Pair {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Pair {}
impl PartialOrd for Pair {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Pair {
    /// Max-heap order of sentencepiece's `SymbolPairComparator`: higher score
    /// first, then the smaller left index.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}

impl SpmTokenizer {
    /// From a parsed `tokenizer.model`. Only BPE models without a precompiled
    /// normalisation charsmap (LLaMA's "identity" normaliser) are supported.
    pub fn from_model(m: &SpmModel) -> std::result::Result<Self, String> {
        if m.model_type != model_type::BPE {
            return Err(format!(
                "only BPE SentencePiece models can be encoded (trainer_spec.model_type = {})",
                m.model_type
            ));
        }
        if m.precompiled_charsmap_len > 0 {
            return Err(format!(
                "normaliser '{}' uses a precompiled charsmap, which this encoder does not implement \
                 (LLaMA models use 'identity')",
                m.normalizer_name
            ));
        }
        let n = m.pieces.len();
        let id = |v: i32| (v >= 0 && (v as usize) < n).then_some(v as u32);
        let mut t = SpmTokenizer::empty(m.byte_fallback, m.add_dummy_prefix);
        t.remove_extra_whitespaces = m.remove_extra_whitespaces;
        t.escape_whitespaces = m.escape_whitespaces;
        t.treat_whitespace_as_suffix = m.treat_whitespace_as_suffix;
        t.bos_id = id(m.bos_id);
        t.eos_id = id(m.eos_id);
        for p in &m.pieces {
            t.push(p.piece.clone(), p.score, p.kind)?;
        }
        t.finish()?;
        Ok(t)
    }

    /// From a `tokenizer.model` file; errors name the file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let m = SpmModel::load(path)?;
        SpmTokenizer::from_model(&m).map_err(|e| Error::input(path, e))
    }

    /// From a GGUF-style vocabulary (tokens, scores, token types), e.g. read
    /// back from a GGUF file. Normalisation follows llama.cpp's SPM tokenizer:
    /// dummy prefix = `add_space_prefix` (default true), no whitespace removal,
    /// byte fallback when the vocabulary has BYTE tokens. The scores must rank
    /// the merges (llama.cpp's converter writes -1000.0 everywhere for a
    /// tokenizer.json-only checkpoint, which cannot; ours ranks them from the merges).
    pub fn from_vocab(v: &GgufVocab) -> std::result::Result<Self, String> {
        if v.model != "llama" {
            return Err(format!(
                "tokenizer model '{}' is not SentencePiece ('llama')",
                v.model
            ));
        }
        if v.tokens.len() != v.scores.len() || v.tokens.len() != v.token_types.len() {
            return Err(format!(
                "vocabulary arrays differ in length: {} tokens, {} scores, {} types",
                v.tokens.len(),
                v.scores.len(),
                v.token_types.len()
            ));
        }
        let mut normal_scores = v
            .token_types
            .iter()
            .zip(&v.scores)
            .filter(|(t, _)| **t == piece_type::NORMAL)
            .map(|(_, s)| *s);
        if let Some(first) = normal_scores.next() {
            if normal_scores.clone().count() > 0 && normal_scores.all(|s| s == first) {
                return Err(format!(
                    "every NORMAL token has the same score ({first}): the vocabulary carries no \
                     SentencePiece merge scores (converted from tokenizer.json?)"
                ));
            }
        }
        let byte_fallback = v.token_types.contains(&piece_type::BYTE);
        let mut t = SpmTokenizer::empty(byte_fallback, v.add_space_prefix.unwrap_or(true));
        t.remove_extra_whitespaces = false;
        let n = v.tokens.len();
        let in_range = |o: Option<u32>| o.filter(|&i| (i as usize) < n);
        t.bos_id = in_range(v.bos_id);
        t.eos_id = in_range(v.eos_id);
        for ((p, s), k) in v.tokens.iter().zip(&v.scores).zip(&v.token_types) {
            // Types outside 1..=6 (UNDEFINED 0) are kept out of the merge table.
            let kind = if (piece_type::NORMAL..=piece_type::BYTE).contains(k) {
                *k
            } else {
                piece_type::CONTROL
            };
            t.push(p.clone(), *s, kind)?;
        }
        if let Some(u) = in_range(v.unk_id) {
            if t.unk_id.is_none() {
                t.unk_id = Some(u);
            }
        }
        t.finish()?;
        Ok(t)
    }

    fn empty(byte_fallback: bool, add_dummy_prefix: bool) -> Self {
        SpmTokenizer {
            pieces: Vec::new(),
            scores: Vec::new(),
            kinds: Vec::new(),
            normal: HashMap::new(),
            reserved: HashMap::new(),
            user_defined: Vec::new(),
            unk_id: None,
            bos_id: None,
            eos_id: None,
            byte_fallback,
            add_dummy_prefix,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
            treat_whitespace_as_suffix: false,
        }
    }

    fn push(&mut self, piece: String, score: f32, kind: i32) -> std::result::Result<(), String> {
        let id = u32::try_from(self.pieces.len()).map_err(|_| "too many pieces".to_string())?;
        let is_normal = matches!(
            kind,
            piece_type::NORMAL | piece_type::USER_DEFINED | piece_type::UNUSED
        );
        let map = if is_normal {
            &mut self.normal
        } else {
            &mut self.reserved
        };
        // sentencepiece rejects duplicates ("is already defined"); a GGUF vocab may
        // repeat a text (e.g. an added token equal to a piece): first id wins.
        map.entry(piece.clone()).or_insert(id);
        if kind == piece_type::USER_DEFINED && !piece.is_empty() {
            self.user_defined.push(piece.clone());
        }
        if kind == piece_type::UNKNOWN && self.unk_id.is_none() {
            self.unk_id = Some(id);
        }
        self.pieces.push(piece);
        self.scores.push(score);
        self.kinds.push(kind);
        Ok(())
    }

    fn finish(&mut self) -> std::result::Result<(), String> {
        self.user_defined
            .sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        self.user_defined.dedup();
        if self.unk_id.is_none() {
            return Err("vocabulary has no UNKNOWN piece".into());
        }
        Ok(())
    }

    /// Number of pieces.
    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }
    pub fn unk_id(&self) -> Option<u32> {
        self.unk_id
    }
    /// The piece text of an id.
    pub fn piece(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(|s| s.as_str())
    }
    /// The score of an id.
    pub fn score(&self, id: u32) -> Option<f32> {
        self.scores.get(id as usize).copied()
    }

    /// The SentencePiece type of an id (`proto::piece_type`: NORMAL, BYTE, CONTROL, ...).
    pub fn kind(&self, id: u32) -> Option<i32> {
        self.kinds.get(id as usize).copied()
    }
    /// Whether encoding adds the dummy-prefix space (decoding then drops it at the start).
    pub fn adds_dummy_prefix(&self) -> bool {
        self.add_dummy_prefix && !self.treat_whitespace_as_suffix
    }

    /// `PieceToId`: reserved pieces first, then normal ones, else unk.
    fn piece_to_id(&self, w: &str) -> u32 {
        if let Some(&i) = self.reserved.get(w) {
            return i;
        }
        if let Some(&i) = self.normal.get(w) {
            return i;
        }
        self.unk_id.unwrap_or(0)
    }

    /// An UNKNOWN piece, or the unk id: a tokenizer.json vocabulary types `<unk>` CONTROL
    /// (llama.cpp's SPM tokenizer falls back to bytes for any text that is no token).
    fn is_unknown(&self, id: u32) -> bool {
        self.kinds.get(id as usize) == Some(&piece_type::UNKNOWN) || self.unk_id == Some(id)
    }

    fn is_unused(&self, id: u32) -> bool {
        self.kinds.get(id as usize) == Some(&piece_type::UNUSED)
    }

    /// The normaliser for the identity rule (no charsmap): `normalizer.cc Normalize`.
    pub fn normalize(&self, text: &str) -> String {
        self.normalize_with(text, self.add_dummy_prefix)
    }

    fn normalize_with(&self, text: &str, add_dummy_prefix: bool) -> String {
        let ws = if self.escape_whitespaces {
            SPACE_SYMBOL
        } else {
            " "
        };
        let mut input = text;
        if self.remove_extra_whitespaces {
            input = input.trim_start_matches(' ');
        }
        let mut out = String::with_capacity(input.len() * 3 / 2 + 3);
        if input.is_empty() {
            return out;
        }
        if !self.treat_whitespace_as_suffix && add_dummy_prefix {
            out.push_str(ws);
        }
        let mut is_prev_space = self.remove_extra_whitespaces;
        let mut rest = input;
        while !rest.is_empty() {
            // User-defined pieces pass through unchanged (the normaliser's prefix matcher).
            let ud = self
                .user_defined
                .iter()
                .find(|u| rest.starts_with(u.as_str()));
            let chunk_len = match ud {
                Some(u) => u.len(),
                None => rest.chars().next().map_or(1, char::len_utf8),
            };
            let mut sp = &rest[..chunk_len];
            if is_prev_space {
                sp = sp.trim_start_matches(' ');
            }
            if !sp.is_empty() {
                for ch in sp.chars() {
                    if self.escape_whitespaces && ch == ' ' {
                        out.push_str(SPACE_SYMBOL);
                    } else {
                        out.push(ch);
                    }
                }
                is_prev_space = sp.ends_with(' ');
            }
            rest = &rest[chunk_len..];
            if !self.remove_extra_whitespaces {
                is_prev_space = false;
            }
        }
        if self.remove_extra_whitespaces {
            while out.ends_with(ws) {
                out.truncate(out.len() - ws.len());
            }
        }
        if self.treat_whitespace_as_suffix && add_dummy_prefix {
            out.push_str(ws);
        }
        out
    }

    /// SentencePiece encoding of `text` (with the dummy prefix when the model
    /// asks for it), optionally preceded by BOS.
    pub fn encode(&self, text: &str, add_bos: bool) -> Vec<u32> {
        let mut out = Vec::new();
        if add_bos {
            if let Some(b) = self.bos_id {
                out.push(b);
            }
        }
        let normalized = self.normalize(text);
        self.encode_normalized(&normalized, &mut out);
        out
    }

    /// LLaVA's `tokenizer_image_token`: split at "<image>", encode every chunk
    /// on its own (each with its dummy prefix), keep BOS only on the first
    /// chunk, put [`IMAGE_TOKEN_INDEX`] (-200) between chunks.
    pub fn encode_llava_prompt(&self, prompt: &str) -> Vec<i64> {
        let mut out: Vec<i64> = Vec::new();
        for (i, chunk) in prompt.split("<image>").enumerate() {
            if i > 0 {
                out.push(IMAGE_TOKEN_INDEX);
            }
            out.extend(self.encode(chunk, i == 0).into_iter().map(i64::from));
        }
        out
    }

    /// Encoding of text that follows a special token inside a prompt (after "</s>" in a
    /// conversation): no dummy prefix, as HF's LlamaTokenizer does with `legacy: false` (the
    /// setting of Vicuna-v1.5 / LLaVA-1.5 tokenizer_config.json; fixtures/reference/generate.json
    /// holds the ids transformers gives a two-turn llava_v1 prompt).
    pub fn encode_continuation(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        self.encode_normalized(&self.normalize_with(text, false), &mut out);
        out
    }

    /// LLaVA's `tokenizer_image_token` on a whole conversation as HF's tokenizer runs it: like
    /// [`Self::encode_llava_prompt`], and within each chunk the texts of UNKNOWN / CONTROL pieces
    /// ("<unk>", "<s>", "</s>") are those ids, the text after one encoded by
    /// [`Self::encode_continuation`].
    pub fn encode_llava_chat(&self, prompt: &str) -> Vec<i64> {
        let specials: Vec<(&str, u32)> = self
            .pieces
            .iter()
            .enumerate()
            .filter(|(i, p)| {
                !p.is_empty() && matches!(self.kinds[*i], piece_type::CONTROL | piece_type::UNKNOWN)
            })
            .map(|(i, p)| (p.as_str(), i as u32))
            .collect();
        let mut out: Vec<i64> = Vec::new();
        for (i, chunk) in prompt.split("<image>").enumerate() {
            if i > 0 {
                out.push(IMAGE_TOKEN_INDEX);
            }
            if i == 0 {
                out.extend(self.bos_id.map(i64::from));
            }
            let (mut rest, mut first) = (chunk, true);
            loop {
                // The earliest special text (longest on a tie).
                let hit = specials
                    .iter()
                    .filter_map(|&(p, id)| {
                        rest.find(p).map(|at| (at, std::cmp::Reverse(p.len()), id))
                    })
                    .min();
                let end = hit.map_or(rest.len(), |(at, _, _)| at);
                let text = &rest[..end];
                let ids = if first {
                    self.encode(text, false)
                } else {
                    self.encode_continuation(text)
                };
                out.extend(ids.into_iter().map(i64::from));
                let Some((at, std::cmp::Reverse(len), id)) = hit else {
                    break;
                };
                out.push(i64::from(id));
                rest = &rest[at + len..];
                first = false;
            }
        }
        out
    }

    fn encode_normalized<'s>(&self, s: &'s str, out: &mut Vec<u32>) {
        if s.is_empty() {
            return;
        }
        // Split into characters; user-defined pieces are single frozen symbols.
        let mut symbols: Vec<Symbol> = Vec::new();
        let mut pos = 0;
        while pos < s.len() {
            let rest = &s[pos..];
            let (len, freeze) = match self
                .user_defined
                .iter()
                .find(|u| rest.starts_with(u.as_str()))
            {
                Some(u) => (u.len(), true),
                None => (rest.chars().next().map_or(1, char::len_utf8), false),
            };
            let idx = symbols.len();
            symbols.push(Symbol {
                start: pos,
                end: pos + len,
                prev: idx.checked_sub(1),
                next: (pos + len < s.len()).then_some(idx + 1),
                freeze,
            });
            pos += len;
        }

        let mut agenda: BinaryHeap<Pair> = BinaryHeap::new();
        // For UNUSED pieces: how they were formed, to split them back (`rev_merge`).
        let mut rev_merge: HashMap<&'s str, (&'s str, &'s str)> = HashMap::new();
        let add_pair = |symbols: &[Symbol],
                        agenda: &mut BinaryHeap<Pair>,
                        rev_merge: &mut HashMap<&'s str, (&'s str, &'s str)>,
                        left: Option<usize>,
                        right: Option<usize>| {
            let (Some(l), Some(r)) = (left, right) else {
                return;
            };
            let (ls, rs) = (symbols[l], symbols[r]);
            if ls.freeze || rs.freeze {
                return;
            }
            // Adjacent symbols are contiguous in `s`.
            let piece = &s[ls.start..rs.end];
            let Some(&id) = self.normal.get(piece) else {
                return;
            };
            agenda.push(Pair {
                score: self.scores[id as usize],
                left: l,
                right: r,
                size: piece.len(),
            });
            if self.is_unused(id) {
                rev_merge.insert(piece, (&s[ls.start..ls.end], &s[rs.start..rs.end]));
            }
        };
        for i in 1..symbols.len() {
            add_pair(&symbols, &mut agenda, &mut rev_merge, Some(i - 1), Some(i));
        }
        while let Some(top) = agenda.pop() {
            let (l, r) = (symbols[top.left], symbols[top.right]);
            // Stale entry: one side was merged away or grew since it was pushed.
            if l.start == l.end
                || r.start == r.end
                || (l.end - l.start) + (r.end - r.start) != top.size
            {
                continue;
            }
            symbols[top.left].end = r.end;
            symbols[top.left].next = r.next;
            if let Some(n) = r.next {
                symbols[n].prev = Some(top.left);
            }
            symbols[top.right].end = symbols[top.right].start; // empty
            let prev = symbols[top.left].prev;
            let next = symbols[top.left].next;
            add_pair(&symbols, &mut agenda, &mut rev_merge, prev, Some(top.left));
            add_pair(&symbols, &mut agenda, &mut rev_merge, Some(top.left), next);
        }

        // Emit, splitting UNUSED pieces back and falling back to bytes / unk.
        let mut is_prev_unk = false;
        let mut cur = Some(0);
        let mut stack: Vec<&str> = Vec::new();
        while let Some(i) = cur {
            let sym = symbols[i];
            cur = sym.next;
            stack.push(&s[sym.start..sym.end]);
            while let Some(w) = stack.pop() {
                let id = self.piece_to_id(w);
                if self.is_unused(id) {
                    if let Some(&(a, b)) = rev_merge.get(w) {
                        stack.push(b);
                        stack.push(a);
                        continue;
                    }
                }
                let is_unk = self.is_unknown(id);
                if is_unk && self.byte_fallback {
                    for b in w.bytes() {
                        out.push(self.piece_to_id(&format!("<0x{b:02X}>")));
                    }
                } else if !(is_unk && is_prev_unk) {
                    out.push(id);
                }
                is_prev_unk = is_unk;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::checkpoint::tokenizer::proto::SpmPiece;

    fn model(pieces: &[(&str, f32, i32)], byte_fallback: bool) -> SpmModel {
        SpmModel {
            pieces: pieces
                .iter()
                .map(|&(p, s, k)| SpmPiece {
                    piece: p.into(),
                    score: s,
                    kind: k,
                })
                .collect(),
            model_type: model_type::BPE,
            byte_fallback,
            add_dummy_prefix: true,
            remove_extra_whitespaces: false,
            ..SpmModel::default()
        }
    }

    fn base() -> Vec<(&'static str, f32, i32)> {
        let mut v = vec![("<unk>", 0.0, 2), ("<s>", 0.0, 3), ("</s>", 0.0, 3)];
        v.extend([
            ("\u{2581}", -1.0, 1),
            ("a", -2.0, 1),
            ("b", -3.0, 1),
            ("c", -4.0, 1),
            ("\u{2581}a", -0.5, 1),
            ("ab", -0.4, 1),
            ("\u{2581}ab", -0.1, 1),
            ("bc", -0.4, 1),
        ]);
        v
    }

    #[test]
    fn greedy_merges_highest_score_then_leftmost() {
        let t = SpmTokenizer::from_model(&model(&base(), false)).unwrap();
        // "▁abc": pairs ▁a(-0.5) ab(-0.4) bc(-0.4): ab wins (tie with bc, leftmost),
        // then ▁+ab = ▁ab (-0.1), then ▁ab+c not a piece.
        assert_eq!(t.encode("abc", false), vec![9, 6]);
        assert_eq!(t.encode("abc", true), vec![1, 9, 6]);
        assert_eq!(t.encode("", true), vec![1]);
        // Unknown characters without byte fallback: one unk per run.
        assert_eq!(t.encode("axyb", false), vec![7, 0, 5]);
    }

    #[test]
    fn byte_fallback_and_unused_pieces() {
        let mut v = base();
        v.push(("<0x78>", 0.0, 6));
        v.push(("<0xC3>", 0.0, 6));
        v.push(("<0xA9>", 0.0, 6));
        let t = SpmTokenizer::from_model(&model(&v, true)).unwrap();
        assert_eq!(t.encode("axé", false), vec![7, 11, 12, 13]);
        // An UNUSED merge target is split back into its halves.
        let mut v = base();
        v[9].2 = piece_type::UNUSED; // ▁ab unused
        let t = SpmTokenizer::from_model(&model(&v, false)).unwrap();
        assert_eq!(t.encode("ab", false), vec![3, 8]);
    }

    #[test]
    fn user_defined_pieces_are_matched_whole() {
        let mut v = base();
        v.push(("bca", 0.0, 4));
        let t = SpmTokenizer::from_model(&model(&v, false)).unwrap();
        assert_eq!(t.encode("abca", false), vec![7, 11]);
    }

    #[test]
    fn normalizer_whitespace_rules() {
        let mut m = model(&base(), false);
        let t = SpmTokenizer::from_model(&m).unwrap();
        assert_eq!(
            t.normalize(" a  b "),
            "\u{2581}\u{2581}a\u{2581}\u{2581}b\u{2581}"
        );
        assert_eq!(t.normalize(""), "");
        m.remove_extra_whitespaces = true;
        let t = SpmTokenizer::from_model(&m).unwrap();
        assert_eq!(t.normalize("  a   b  "), "\u{2581}a\u{2581}b");
        assert_eq!(t.normalize("   "), "");
        m.add_dummy_prefix = false;
        let t = SpmTokenizer::from_model(&m).unwrap();
        assert_eq!(t.normalize("a b"), "a\u{2581}b");
    }

    #[test]
    fn llava_prompt_splits_at_image() {
        let t = SpmTokenizer::from_model(&model(&base(), false)).unwrap();
        assert_eq!(t.encode_llava_prompt("ab<image>c"), vec![1, 9, -200, 3, 6]);
        assert_eq!(t.encode_llava_prompt("<image>ab"), vec![1, -200, 9]);
    }

    #[test]
    fn rejects_unigram_and_charsmap() {
        let mut m = model(&base(), false);
        m.model_type = model_type::UNIGRAM;
        assert!(SpmTokenizer::from_model(&m).is_err());
        let mut m = model(&base(), false);
        m.precompiled_charsmap_len = 10;
        assert!(SpmTokenizer::from_model(&m).is_err());
    }
}
