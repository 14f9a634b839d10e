//! safetensors headers and index files on arbitrary bytes. The first byte picks the parser:
//! even = a safetensors file (every tensor's range must lie inside the input), odd = an index
//! (every shard path it accepts must stay inside the checkpoint directory).
#![no_main]
use libfuzzer_sys::fuzz_target;
use mmfuser_convert::formats::checkpoint::store::{parse_index_json, safetensors_entries};
use std::path::{Component, Path};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode % 2 == 0 {
        if let Ok(entries) = safetensors_entries(Path::new("fuzz.safetensors"), rest, 0) {
            for (name, e) in entries {
                assert!(e.range.0 <= e.range.1 && e.range.1 <= rest.len(), "{name}");
                let n: usize = e.shape.iter().product();
                assert_eq!(e.range.1 - e.range.0, n * e.ty.type_size(), "{name}");
            }
        }
    } else if let Ok(v) = serde_json::from_slice::<serde_json::Value>(rest) {
        let dir = Path::new("/nonexistent/ckpt");
        if let Ok((shards, routing)) =
            parse_index_json(dir, &dir.join("model.safetensors.index.json"), &v)
        {
            for s in &shards {
                let rel = s
                    .strip_prefix(dir)
                    .expect("shard outside the checkpoint directory");
                assert!(
                    rel.components().all(|c| matches!(c, Component::Normal(_))),
                    "{s:?}"
                );
            }
            assert!(routing.values().all(|&i| i < shards.len()));
        }
    }
});
