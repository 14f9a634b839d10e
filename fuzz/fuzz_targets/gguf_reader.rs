//! The GGUF reader on arbitrary bytes: an error or a header whose every tensor range lies inside
//! the input, never a panic or a huge allocation.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mmfuser_convert::formats::gguf::GgufFile;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = GgufFile::parse_header(Path::new("fuzz.gguf"), data) {
        assert!(h.data_offset % h.alignment == 0);
        for t in &h.tensors {
            let end = t.offset.checked_add(t.n_bytes).expect("range overflow");
            assert!(
                end <= data.len() as u64,
                "tensor '{}' past the end",
                t.info.name
            );
            assert!(!t.info.ne.is_empty() && t.info.ne.len() <= 4);
        }
        for (k, v) in &h.metadata.entries {
            let _ = (k.len(), v.value_type());
        }
    }
});
