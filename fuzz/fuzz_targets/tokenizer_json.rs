//! A checkpoint's tokenizer.json (and tokenizer_config.json) on arbitrary bytes, through
//! `load_vocab` as hf-to-gguf calls it. The input is split at the first "\n#\n": before it the
//! tokenizer.json, after it the tokenizer_config.json. Checks: no panic, and an error or a
//! vocabulary whose score and type lists have one entry per token.
#![no_main]
use libfuzzer_sys::fuzz_target;
use mmfuser_convert::formats::checkpoint::tokenizer::vocab::load_vocab;
use std::path::PathBuf;

fn workdir() -> PathBuf {
    // One directory per fuzzing process, in memory where there is /dev/shm.
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let d = base.join(format!("mmfuser-fuzz-tokenizer-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fuzz_target!(|data: &[u8]| {
    let dir = workdir();
    let (tj, tc) = match data.windows(3).position(|w| w == b"\n#\n") {
        Some(at) => (&data[..at], Some(&data[at + 3..])),
        None => (data, None),
    };
    std::fs::write(dir.join("tokenizer.json"), tj).unwrap();
    let tc_path = dir.join("tokenizer_config.json");
    match tc {
        Some(b) => std::fs::write(&tc_path, b).unwrap(),
        None => {
            let _ = std::fs::remove_file(&tc_path);
        }
    }
    if let Ok(v) = load_vocab(&dir, 0, &serde_json::json!({})) {
        let n = v.tokens.len();
        assert_eq!(v.scores.len(), n);
        assert_eq!(v.token_types.len(), n);
    }
});
