//! A minimal reader for SentencePiece's `tokenizer.model` (a `ModelProto`
//! protobuf message, proto2, sentencepiece_model.proto).
//!
//! Hand-written (varints, length-delimited, fixed32/64) because the
//! `sentencepiece-model` crate pulls in 58 crates (prost-build, protox, miette)
//! for the dozen fields read here.
//!
//! Only the fields the converter and the BPE encoder need are kept; every other
//! field is skipped by wire type. Malformed input (truncated varints or
//! payloads, wire types 3/4/6/7, a known field with the wrong wire type,
//! non-UTF-8 piece text, unknown piece type) is an error, never a panic.
use std::path::Path;

use crate::ground::error::{Error, Result};

/// `ModelProto.SentencePiece.Type` (sentencepiece_model.proto). The numbers are
/// the same as GGUF's `tokenizer.ggml.token_type` values (llama.h `LLAMA_TOKEN_TYPE_*`).
pub mod piece_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

/// `TrainerSpec.ModelType`.
pub mod model_type {
    pub const UNIGRAM: i32 = 1;
    pub const BPE: i32 = 2;
    pub const WORD: i32 = 3;
    pub const CHAR: i32 = 4;
}

/// One `ModelProto.SentencePiece`.
#[derive(Debug, Clone, PartialEq)]
pub struct SpmPiece {
    pub piece: String,
    pub score: f32,
    /// One of [`piece_type`]; NORMAL when the field is absent (proto default).
    pub kind: i32,
}

/// The parts of `ModelProto` this crate uses. Defaults are the proto defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct SpmModel {
    pub pieces: Vec<SpmPiece>,
    /// `trainer_spec.model_type` (default UNIGRAM = 1).
    pub model_type: i32,
    /// `trainer_spec.byte_fallback` (field 35, default false).
    pub byte_fallback: bool,
    /// `trainer_spec.treat_whitespace_as_suffix` (field 24, default false).
    pub treat_whitespace_as_suffix: bool,
    /// `trainer_spec.unk_id` (40, default 0), `bos_id` (41, default 1),
    /// `eos_id` (42, default 2), `pad_id` (43, default -1). -1 = disabled.
    pub unk_id: i32,
    pub bos_id: i32,
    pub eos_id: i32,
    pub pad_id: i32,
    /// `normalizer_spec.name` (1), e.g. "identity" (LLaMA) or "nmt_nfkc".
    pub normalizer_name: String,
    /// Length of `normalizer_spec.precompiled_charsmap` (2); 0 for LLaMA ("identity").
    pub precompiled_charsmap_len: usize,
    /// `normalizer_spec.add_dummy_prefix` (3, default true).
    pub add_dummy_prefix: bool,
    /// `normalizer_spec.remove_extra_whitespaces` (4, default true).
    pub remove_extra_whitespaces: bool,
    /// `normalizer_spec.escape_whitespaces` (5, default true).
    pub escape_whitespaces: bool,
}

impl Default for SpmModel {
    fn default() -> Self {
        SpmModel {
            pieces: Vec::new(),
            model_type: model_type::UNIGRAM,
            byte_fallback: false,
            treat_whitespace_as_suffix: false,
            unk_id: 0,
            bos_id: 1,
            eos_id: 2,
            pad_id: -1,
            normalizer_name: String::new(),
            precompiled_charsmap_len: 0,
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        }
    }
}

impl SpmModel {
    /// Read and parse a `tokenizer.model` file; errors name the file.
    pub fn load(path: &Path) -> Result<SpmModel> {
        let bytes = crate::ground::fsutil::read_input(path, crate::ground::fsutil::CAP_TOKENIZER)?;
        let m = SpmModel::parse(&bytes)
            .map_err(|m| Error::input(path, format!("invalid SentencePiece model: {m}")))?;
        if m.pieces.is_empty() {
            // An empty (e.g. 0-byte) file parses as a model without pieces.
            return Err(Error::input(
                path,
                format!(
                    "invalid SentencePiece model: no pieces ({} bytes)",
                    bytes.len()
                ),
            ));
        }
        Ok(m)
    }

    /// Parse the bytes of a serialized `ModelProto`.
    pub fn parse(bytes: &[u8]) -> std::result::Result<SpmModel, String> {
        let mut m = SpmModel::default();
        let mut r = Reader::new(bytes);
        while !r.done() {
            let (field, wire) = r.key()?;
            match field {
                1 => {
                    let body = r.expect_len(field, wire, "ModelProto.pieces")?;
                    let idx = m.pieces.len();
                    m.pieces
                        .push(parse_piece(body).map_err(|e| format!("piece {idx}: {e}"))?);
                }
                2 => {
                    let body = r.expect_len(field, wire, "ModelProto.trainer_spec")?;
                    parse_trainer_spec(body, &mut m).map_err(|e| format!("trainer_spec: {e}"))?;
                }
                3 => {
                    let body = r.expect_len(field, wire, "ModelProto.normalizer_spec")?;
                    parse_normalizer_spec(body, &mut m)
                        .map_err(|e| format!("normalizer_spec: {e}"))?;
                }
                _ => r.skip(field, wire)?,
            }
        }
        Ok(m)
    }
}

fn parse_piece(bytes: &[u8]) -> std::result::Result<SpmPiece, String> {
    let mut p = SpmPiece {
        piece: String::new(),
        score: 0.0,
        kind: piece_type::NORMAL,
    };
    let mut r = Reader::new(bytes);
    while !r.done() {
        let (field, wire) = r.key()?;
        match field {
            1 => {
                let b = r.expect_len(field, wire, "SentencePiece.piece")?;
                p.piece = std::str::from_utf8(b)
                    .map_err(|_| "piece text is not valid UTF-8".to_string())?
                    .to_string();
            }
            2 => p.score = f32::from_bits(r.expect_fixed32(field, wire, "SentencePiece.score")?),
            3 => {
                let t = r.expect_int32(field, wire, "SentencePiece.type")?;
                if !(piece_type::NORMAL..=piece_type::BYTE).contains(&t) {
                    return Err(format!("piece {:?}: unknown type {t}", p.piece));
                }
                p.kind = t;
            }
            _ => r.skip(field, wire)?,
        }
    }
    Ok(p)
}

fn parse_trainer_spec(bytes: &[u8], m: &mut SpmModel) -> std::result::Result<(), String> {
    let mut r = Reader::new(bytes);
    while !r.done() {
        let (field, wire) = r.key()?;
        match field {
            3 => m.model_type = r.expect_int32(field, wire, "model_type")?,
            24 => {
                m.treat_whitespace_as_suffix =
                    r.expect_bool(field, wire, "treat_whitespace_as_suffix")?
            }
            35 => m.byte_fallback = r.expect_bool(field, wire, "byte_fallback")?,
            40 => m.unk_id = r.expect_int32(field, wire, "unk_id")?,
            41 => m.bos_id = r.expect_int32(field, wire, "bos_id")?,
            42 => m.eos_id = r.expect_int32(field, wire, "eos_id")?,
            43 => m.pad_id = r.expect_int32(field, wire, "pad_id")?,
            _ => r.skip(field, wire)?,
        }
    }
    Ok(())
}

fn parse_normalizer_spec(bytes: &[u8], m: &mut SpmModel) -> std::result::Result<(), String> {
    let mut r = Reader::new(bytes);
    while !r.done() {
        let (field, wire) = r.key()?;
        match field {
            1 => {
                let b = r.expect_len(field, wire, "name")?;
                m.normalizer_name = String::from_utf8_lossy(b).into_owned();
            }
            2 => {
                m.precompiled_charsmap_len =
                    r.expect_len(field, wire, "precompiled_charsmap")?.len()
            }
            3 => m.add_dummy_prefix = r.expect_bool(field, wire, "add_dummy_prefix")?,
            4 => {
                m.remove_extra_whitespaces =
                    r.expect_bool(field, wire, "remove_extra_whitespaces")?
            }
            5 => m.escape_whitespaces = r.expect_bool(field, wire, "escape_whitespaces")?,
            _ => r.skip(field, wire)?,
        }
    }
    Ok(())
}

/// Protobuf wire types.
const WIRE_VARINT: u8 = 0;
const WIRE_FIXED64: u8 = 1;
const WIRE_LEN: u8 = 2;
const WIRE_FIXED32: u8 = 5;

/// A cursor over protobuf bytes. Every read is bounds-checked.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }

    /// A base-128 varint of at most 10 bytes (the 10th may only carry bit 63).
    pub(crate) fn varint(&mut self) -> std::result::Result<u64, String> {
        let start = self.pos;
        let mut v: u64 = 0;
        for i in 0..10 {
            let Some(&b) = self.buf.get(self.pos) else {
                return Err(format!("truncated varint at byte {start}"));
            };
            self.pos += 1;
            if i == 9 && b > 1 {
                return Err(format!("varint longer than 64 bits at byte {start}"));
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(format!("varint longer than 10 bytes at byte {start}"))
    }

    /// A field key: (field number, wire type).
    pub(crate) fn key(&mut self) -> std::result::Result<(u32, u8), String> {
        let at = self.pos;
        let k = self.varint()?;
        let field = k >> 3;
        let wire = (k & 7) as u8;
        if field == 0 || field > u64::from(u32::MAX >> 3) {
            return Err(format!("invalid field number {field} at byte {at}"));
        }
        Ok((field as u32, wire))
    }

    fn take(&mut self, n: usize, what: &str) -> std::result::Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                format!(
                    "truncated {what}: needs {n} bytes at byte {}, {} left",
                    self.pos,
                    self.buf.len() - self.pos
                )
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    pub(crate) fn len_delimited(&mut self) -> std::result::Result<&'a [u8], String> {
        let n = self.varint()?;
        let n = usize::try_from(n).map_err(|_| format!("length {n} too large"))?;
        self.take(n, "length-delimited field")
    }

    pub(crate) fn fixed32(&mut self) -> std::result::Result<u32, String> {
        let b = self.take(4, "fixed32")?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn fixed64(&mut self) -> std::result::Result<u64, String> {
        let b = self.take(8, "fixed64")?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// Skip a field of an unknown number. Groups (wire types 3/4) are not used by
    /// sentencepiece_model.proto and are rejected, as are wire types 6 and 7.
    pub(crate) fn skip(&mut self, field: u32, wire: u8) -> std::result::Result<(), String> {
        match wire {
            WIRE_VARINT => self.varint().map(|_| ()),
            WIRE_FIXED64 => self.fixed64().map(|_| ()),
            WIRE_LEN => self.len_delimited().map(|_| ()),
            WIRE_FIXED32 => self.fixed32().map(|_| ()),
            w => Err(format!("field {field}: unsupported wire type {w}")),
        }
    }

    fn check_wire(field: u32, wire: u8, want: u8, what: &str) -> std::result::Result<(), String> {
        if wire == want {
            Ok(())
        } else {
            Err(format!(
                "{what} (field {field}) has wire type {wire}, expected {want}"
            ))
        }
    }

    fn expect_len(
        &mut self,
        field: u32,
        wire: u8,
        what: &str,
    ) -> std::result::Result<&'a [u8], String> {
        Self::check_wire(field, wire, WIRE_LEN, what)?;
        self.len_delimited().map_err(|e| format!("{what}: {e}"))
    }

    fn expect_fixed32(
        &mut self,
        field: u32,
        wire: u8,
        what: &str,
    ) -> std::result::Result<u32, String> {
        Self::check_wire(field, wire, WIRE_FIXED32, what)?;
        self.fixed32().map_err(|e| format!("{what}: {e}"))
    }

    /// int32/enum: a varint truncated to its low 32 bits (negative values are
    /// sign-extended 10-byte varints on the wire).
    fn expect_int32(
        &mut self,
        field: u32,
        wire: u8,
        what: &str,
    ) -> std::result::Result<i32, String> {
        Self::check_wire(field, wire, WIRE_VARINT, what)?;
        Ok(self.varint().map_err(|e| format!("{what}: {e}"))? as u32 as i32)
    }

    fn expect_bool(
        &mut self,
        field: u32,
        wire: u8,
        what: &str,
    ) -> std::result::Result<bool, String> {
        Self::check_wire(field, wire, WIRE_VARINT, what)?;
        Ok(self.varint().map_err(|e| format!("{what}: {e}"))? != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }
    fn key(field: u32, wire: u8, out: &mut Vec<u8>) {
        varint(u64::from(field) << 3 | u64::from(wire), out);
    }
    fn int32(field: u32, v: i32, out: &mut Vec<u8>) {
        key(field, 0, out);
        varint(v as i64 as u64, out); // protobuf: int32 is sign-extended to 64 bits
    }
    fn bytes(field: u32, b: &[u8], out: &mut Vec<u8>) {
        key(field, 2, out);
        varint(b.len() as u64, out);
        out.extend_from_slice(b);
    }
    fn float(field: u32, f: f32, out: &mut Vec<u8>) {
        key(field, 5, out);
        out.extend_from_slice(&f.to_le_bytes());
    }
    fn piece(text: &str, score: f32, kind: Option<i32>) -> Vec<u8> {
        let mut p = Vec::new();
        bytes(1, text.as_bytes(), &mut p);
        float(2, score, &mut p);
        if let Some(k) = kind {
            int32(3, k, &mut p);
        }
        p
    }

    #[test]
    fn varint_edge_cases() {
        let mut b = Vec::new();
        varint(u64::MAX, &mut b);
        assert_eq!(b.len(), 10);
        assert_eq!(Reader::new(&b).varint().unwrap(), u64::MAX);
        assert_eq!(Reader::new(&[0x96, 0x01]).varint().unwrap(), 150);
        // 11-byte / over-long varints and truncated ones are errors.
        assert!(Reader::new(&[0xff; 11]).varint().is_err());
        assert!(
            Reader::new(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02])
                .varint()
                .is_err()
        );
        assert!(Reader::new(&[0x80]).varint().is_err());
        assert!(Reader::new(&[]).varint().is_err());
    }

    #[test]
    fn parses_pieces_trainer_and_normalizer() {
        let mut m = Vec::new();
        bytes(1, &piece("<unk>", 0.0, Some(2)), &mut m);
        bytes(1, &piece("<s>", 0.0, Some(3)), &mut m);
        bytes(1, &piece("<0x41>", 0.0, Some(6)), &mut m);
        bytes(1, &piece("\u{2581}the", -1.5, None), &mut m); // type absent = NORMAL
        let mut t = Vec::new();
        int32(3, 2, &mut t); // BPE
        int32(35, 1, &mut t);
        int32(40, 0, &mut t);
        int32(41, 1, &mut t);
        int32(42, 2, &mut t);
        int32(43, -1, &mut t); // 10-byte varint
        bytes(2, &t, &mut m);
        let mut n = Vec::new();
        bytes(1, b"identity", &mut n);
        int32(3, 0, &mut n);
        int32(4, 0, &mut n);
        bytes(3, &n, &mut m);
        let s = SpmModel::parse(&m).unwrap();
        assert_eq!(s.pieces.len(), 4);
        assert_eq!(
            s.pieces[0],
            SpmPiece {
                piece: "<unk>".into(),
                score: 0.0,
                kind: 2
            }
        );
        assert_eq!(s.pieces[2].kind, piece_type::BYTE);
        assert_eq!(
            s.pieces[3],
            SpmPiece {
                piece: "\u{2581}the".into(),
                score: -1.5,
                kind: 1
            }
        );
        assert_eq!(s.model_type, model_type::BPE);
        assert!(s.byte_fallback);
        assert_eq!((s.unk_id, s.bos_id, s.eos_id, s.pad_id), (0, 1, 2, -1));
        assert_eq!(s.normalizer_name, "identity");
        assert!(!s.add_dummy_prefix);
        assert!(!s.remove_extra_whitespaces);
        assert!(s.escape_whitespaces);
    }

    #[test]
    fn defaults_when_fields_absent() {
        let s = SpmModel::parse(&[]).unwrap();
        assert_eq!(s.model_type, model_type::UNIGRAM);
        assert!(s.add_dummy_prefix && s.remove_extra_whitespaces && !s.byte_fallback);
        assert_eq!((s.unk_id, s.bos_id, s.eos_id, s.pad_id), (0, 1, 2, -1));
    }

    #[test]
    fn negative_int32_values() {
        for v in [-1, -2, i32::MIN, i32::MAX, 0] {
            let mut t = Vec::new();
            int32(41, v, &mut t);
            let mut m = Vec::new();
            bytes(2, &t, &mut m);
            assert_eq!(SpmModel::parse(&m).unwrap().bos_id, v);
        }
        // A 5-byte (non-sign-extended) encoding of -1 is also read as -1 (low 32 bits).
        let mut t = Vec::new();
        key(43, 0, &mut t);
        varint(0xffff_ffff, &mut t);
        let mut m = Vec::new();
        bytes(2, &t, &mut m);
        assert_eq!(SpmModel::parse(&m).unwrap().pad_id, -1);
    }

    #[test]
    fn skips_unknown_fields_of_every_wire_type() {
        let mut p = Vec::new();
        key(7, 0, &mut p);
        varint(1 << 40, &mut p);
        key(8, 1, &mut p);
        p.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        key(9, 5, &mut p);
        p.extend_from_slice(&[9, 9, 9, 9]);
        bytes(10, b"ignored", &mut p);
        p.extend(piece("a", 0.25, Some(1)));
        let mut m = Vec::new();
        // unknown top-level fields (ModelProto.self_test_data = 4, denormalizer_spec = 5)
        bytes(4, b"\x0a\x03abc", &mut m);
        int32(1000, -5, &mut m);
        bytes(1, &p, &mut m);
        let mut t = Vec::new();
        bytes(1, b"input.txt", &mut t); // trainer_spec.input
        int32(4, 512, &mut t); // vocab_size
        float(10, 0.9995, &mut t); // character_coverage
        int32(3, 2, &mut t);
        bytes(2, &t, &mut m);
        let s = SpmModel::parse(&m).unwrap();
        assert_eq!(
            s.pieces,
            vec![SpmPiece {
                piece: "a".into(),
                score: 0.25,
                kind: 1
            }]
        );
        assert_eq!(s.model_type, 2);
    }

    #[test]
    fn truncated_and_invalid_inputs_are_errors() {
        let mut m = Vec::new();
        bytes(1, &piece("\u{2581}hello", -3.0, Some(1)), &mut m);
        let boundary = m.len();
        let mut t = Vec::new();
        int32(43, -1, &mut t);
        bytes(2, &t, &mut m);
        assert!(SpmModel::parse(&m).is_ok());
        // Every prefix that is not cut at the field boundary is malformed (cut inside a
        // key, a length, a payload or the 10-byte varint of -1).
        for cut in (1..m.len()).filter(|&c| c != boundary) {
            assert!(
                SpmModel::parse(&m[..cut]).is_err(),
                "prefix of {cut} bytes accepted"
            );
        }
        assert_eq!(SpmModel::parse(&m[..boundary]).unwrap().pieces.len(), 1);
        // Length larger than the remaining input.
        assert!(SpmModel::parse(&[0x0a, 0x7f, 0x00]).is_err());
        // Group wire types and wire types 6/7.
        for w in [3u8, 4, 6, 7] {
            let mut b = Vec::new();
            key(9, w, &mut b);
            assert!(SpmModel::parse(&b).is_err(), "wire type {w}");
        }
        // Known field with the wrong wire type.
        let mut b = Vec::new();
        int32(1, 5, &mut b);
        assert!(SpmModel::parse(&b).unwrap_err().contains("wire type"));
        // Field number 0.
        assert!(SpmModel::parse(&[0x00, 0x00]).is_err());
        // Non-UTF-8 piece and unknown piece type.
        let mut b = Vec::new();
        let mut p = Vec::new();
        bytes(1, &[0xff, 0xfe], &mut p);
        bytes(1, &p, &mut b);
        assert!(SpmModel::parse(&b).unwrap_err().contains("UTF-8"));
        let mut b = Vec::new();
        bytes(1, &piece("x", 0.0, Some(9)), &mut b);
        assert!(SpmModel::parse(&b).unwrap_err().contains("unknown type"));
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokenizer.model");
        std::fs::write(&p, [0x0a, 0x05, 0x0a]).unwrap();
        let e = SpmModel::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("tokenizer.model") && e.contains("truncated"),
            "{e}"
        );
    }
}
