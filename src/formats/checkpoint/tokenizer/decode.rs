//! SentencePiece decoding (ids -> text), as `SentencePieceProcessor::Decode` does, and
//! incrementally for streaming:
//! - CONTROL pieces (BOS, EOS) decode to nothing;
//! - an UNKNOWN piece decodes to " \u{2047} ";
//! - BYTE pieces `<0xNN>` are gathered and read as UTF-8, every byte that is not part of a
//!   valid character becoming U+FFFD;
//! - other pieces are their text with U+2581 read as a space, and when the model adds a dummy
//!   prefix, the first non-control piece of the text loses one leading U+2581.
//!
//! (fixtures/reference/generate.json `decode_cases` holds sentencepiece's own results.)
use super::proto::piece_type;
use super::spm::SpmTokenizer;

const REPLACEMENT: char = '\u{FFFD}';
const UNK_SURFACE: &str = " \u{2047} ";

/// Length of the UTF-8 sequence that `lead` starts, or None for a byte that cannot start one.
fn utf8_len(lead: u8) -> Option<usize> {
    match lead {
        0x00..=0x7F => Some(1),
        0xC2..=0xDF => Some(2),
        0xE0..=0xEF => Some(3),
        0xF0..=0xF4 => Some(4),
        _ => None,
    }
}

/// Move the decodable front of `bytes` into `out`: whole valid characters, and U+FFFD for each
/// byte that cannot be part of one. With `final_`, an unfinished sequence at the end is invalid
/// too; otherwise it stays in `bytes` for the next byte piece.
fn drain_utf8(bytes: &mut Vec<u8>, out: &mut String, final_: bool) {
    let mut i = 0;
    while i < bytes.len() {
        let Some(n) = utf8_len(bytes[i]) else {
            out.push(REPLACEMENT);
            i += 1;
            continue;
        };
        if i + n > bytes.len() {
            let tail_ok = bytes[i + 1..].iter().all(|&c| c & 0xC0 == 0x80);
            if !final_ && tail_ok {
                break;
            }
            out.push(REPLACEMENT);
            i += 1;
            continue;
        }
        match std::str::from_utf8(&bytes[i..i + n]) {
            Ok(s) => {
                out.push_str(s);
                i += n;
            }
            Err(_) => {
                out.push(REPLACEMENT);
                i += 1;
            }
        }
    }
    bytes.drain(..i);
}

/// `<0xNN>` -> NN.
fn byte_value(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    (hex.len() == 2).then(|| u8::from_str_radix(hex, 16).ok())?
}

/// Streaming decoder: `push` one id at a time and get the text that is complete so far.
pub struct Detokenizer<'a> {
    tok: &'a SpmTokenizer,
    pending: Vec<u8>,
    at_start: bool,
}

impl<'a> Detokenizer<'a> {
    /// Decoding from the start of a text (its first piece's dummy-prefix space is dropped).
    pub fn new(tok: &'a SpmTokenizer) -> Self {
        Detokenizer {
            tok,
            pending: Vec::new(),
            at_start: true,
        }
    }

    /// The text that `id` completes (possibly empty while a UTF-8 character is unfinished).
    pub fn push(&mut self, id: u32) -> String {
        let mut out = String::new();
        let Some(piece) = self.tok.piece(id) else {
            // Not a vocabulary id: sentencepiece decodes it as unknown.
            drain_utf8(&mut self.pending, &mut out, true);
            out.push_str(UNK_SURFACE);
            self.at_start = false;
            return out;
        };
        match self.tok.kind(id) {
            Some(piece_type::CONTROL) => return out,
            Some(piece_type::BYTE) => {
                if let Some(b) = byte_value(piece) {
                    self.pending.push(b);
                    drain_utf8(&mut self.pending, &mut out, false);
                    self.at_start = false;
                    return out;
                }
            }
            _ => {}
        }
        drain_utf8(&mut self.pending, &mut out, true);
        if self.tok.kind(id) == Some(piece_type::UNKNOWN) {
            out.push_str(UNK_SURFACE);
        } else {
            let mut text = piece;
            if self.at_start && self.tok.adds_dummy_prefix() {
                text = text.strip_prefix('\u{2581}').unwrap_or(text);
            }
            out.extend(text.chars().map(|c| if c == '\u{2581}' { ' ' } else { c }));
        }
        self.at_start = false;
        out
    }

    /// What is left at the end: an unfinished UTF-8 character as U+FFFD per byte.
    pub fn finish(&mut self) -> String {
        let mut out = String::new();
        drain_utf8(&mut self.pending, &mut out, true);
        out
    }
}

/// The text of `ids` (sentencepiece `decode`).
pub fn decode(tok: &SpmTokenizer, ids: &[u32]) -> String {
    let mut d = Detokenizer::new(tok);
    let mut s: String = ids.iter().map(|&i| d.push(i)).collect();
    s.push_str(&d.finish());
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(bytes: &[u8], final_: bool) -> (String, Vec<u8>) {
        let mut b = bytes.to_vec();
        let mut s = String::new();
        drain_utf8(&mut b, &mut s, final_);
        (s, b)
    }

    #[test]
    fn utf8_pieces() {
        assert_eq!(drain("é€😀".as_bytes(), false), ("é€😀".into(), vec![]));
        // Unfinished: kept while streaming, one U+FFFD per byte at the end.
        assert_eq!(
            drain(&[0x41, 0xE2, 0x82], false),
            ("A".into(), vec![0xE2, 0x82])
        );
        assert_eq!(
            drain(&[0xE2, 0x82], true),
            ("\u{FFFD}\u{FFFD}".into(), vec![])
        );
        // A lead byte followed by a non-continuation byte is invalid at once.
        assert_eq!(drain(&[0xE2, 0x41], false), ("\u{FFFD}A".into(), vec![]));
        assert_eq!(
            drain(&[0xBF, 0xD6], true),
            ("\u{FFFD}\u{FFFD}".into(), vec![])
        );
        // Overlong / surrogate encodings are not characters.
        assert_eq!(
            drain(&[0xED, 0xA0, 0x80], true).0,
            "\u{FFFD}\u{FFFD}\u{FFFD}"
        );
        assert_eq!(byte_value("<0x0A>"), Some(10));
        assert_eq!(byte_value("<0xGG>"), None);
        assert_eq!(byte_value("<0x0A0>"), None);
    }
}
