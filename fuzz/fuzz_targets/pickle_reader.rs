//! The PyTorch checkpoint reader on arbitrary bytes. The first byte picks the input: even = a
//! data.pkl pickle on its own, odd = a whole torch.save zip archive (every tensor's byte range
//! must lie inside it; strided tensors are gathered).
#![no_main]
use libfuzzer_sys::fuzz_target;
use mmfuser_convert::formats::checkpoint::pickle::{gather, parse_state_dict, read_archive};
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        let _ = parse_state_dict(rest);
    } else if let Ok(tensors) = read_archive(Path::new("fuzz.bin"), rest) {
        for t in tensors {
            assert!(
                t.range.0 <= t.range.1 && t.range.1 <= rest.len(),
                "{}",
                t.name
            );
            let numel = t
                .shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .expect("numel");
            if let Some(st) = &t.strides {
                if numel <= 1 << 16 {
                    let out = gather(&rest[t.range.0..t.range.1], &t.shape, st, t.kind.size);
                    assert_eq!(out.len(), numel * t.kind.size);
                }
            } else {
                assert_eq!(t.range.1 - t.range.0, numel * t.kind.size, "{}", t.name);
            }
        }
    }
});
