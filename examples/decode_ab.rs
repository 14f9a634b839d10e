//! Decode step time with an f32 and an f16 KV cache, alternating in one process (not a test:
//! timings depend on the box; on a shared VM, separate runs differ by more than the two caches do).
//!
//!     cargo run --release --example decode_ab -- LLM.gguf MMPROJ.gguf [POSITIONS [STEPS]]
//!
//! Prefills POSITIONS (default 773) arbitrary valid text ids into one session per cache type,
//! then feeds one token at a time to each in turn, STEPS (default 12) times; prints every step
//! and the means.
use mmfuser_convert::cpu::CpuBackend;
use mmfuser_convert::generate::{LoadedModel, Session};
use mmfuser_convert::model::KvType;
use std::path::Path;
use std::time::Instant;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 3 {
        eprintln!("usage: decode_ab LLM.gguf MMPROJ.gguf [POSITIONS [STEPS]]");
        std::process::exit(2);
    }
    let m = LoadedModel::from_gguf(Path::new(&a[1]), Path::new(&a[2])).expect("load");
    let n: i64 = a.get(3).and_then(|v| v.parse().ok()).unwrap_or(773);
    let steps: i64 = a.get(4).and_then(|v| v.parse().ok()).unwrap_or(12);
    let ids: Vec<i64> = std::iter::once(1)
        .chain((0..n - 1).map(|i| 3 + (i * 7919) % 31997))
        .collect();
    let b = CpuBackend;
    let mut sessions: Vec<(KvType, Session<CpuBackend>)> = [KvType::F32, KvType::F16]
        .into_iter()
        .map(|kv| {
            let mut s = Session::with_kv(&b, m.ws(), &m.hparams, kv);
            let t = Instant::now();
            s.feed(&ids, None, true).expect("prefill");
            println!(
                "{kv:?} cache: prefill of {n} positions {:.1} s",
                t.elapsed().as_secs_f64()
            );
            (kv, s)
        })
        .collect();
    let mut total = [0f64; 2];
    for step in 0..steps {
        for (i, (kv, s)) in sessions.iter_mut().enumerate() {
            let t = Instant::now();
            s.feed(&[100 + step], None, true).expect("decode");
            let dt = t.elapsed().as_secs_f64();
            total[i] += dt;
            println!("step {step} {kv:?} {dt:.3} s");
        }
    }
    let mean = |i: usize| total[i] / steps as f64;
    println!(
        "mean decode step after {n} positions: f32 cache {:.3} s ({:.2} tokens/s), f16 cache {:.3} s ({:.2} tokens/s)",
        mean(0),
        1.0 / mean(0),
        mean(1),
        1.0 / mean(1)
    );
}
