//! Micro-bench of the CPU decode attention (not a test: timings depend on the box).
//!
//!     cargo run --release --example attention_bench [-- POSITIONS [REPS [QUERIES]]]
//!
//! One decode step's attention over a KV cache of POSITIONS rows (default 790) in every layer of
//! LLaMA-7B's shape (32 layers, 32 heads of 128), the cache stored as f32 and as f16
//! (`--kv-cache`): seconds per step (best of REPS) and GB/s of cache read. With QUERIES > 1
//! (e.g. 773 773 2 773), the causal attention of that many query rows, the last ones of the
//! POSITIONS (a prefill: its GB/s figure then means little).
use candle_core::{DType, Device, Tensor};
use mmfuser_convert::cpu::CpuBackend;
use mmfuser_convert::model::Backend;
use std::time::Instant;

fn main() {
    let mut args = std::env::args().skip(1);
    let m: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(790);
    let reps: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let n: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1)
        .clamp(1, m);
    let (layers, heads, hd) = (32, 32, 128);
    let c = heads * hd;
    let rand = |n: usize, seed: u64| {
        let v: Vec<f32> = (0..n)
            .map(|i| {
                let x = (i as u64 ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
                (x % 2001) as f32 / 1000.0 - 1.0
            })
            .collect();
        v
    };
    let q = Tensor::from_vec(rand(n * c, 1), (n, c), &Device::Cpu).unwrap();
    let kv: Vec<(Tensor, Tensor)> = (0..layers as u64)
        .map(|l| {
            let t = |s| Tensor::from_vec(rand(m * c, s), (m, c), &Device::Cpu).unwrap();
            (t(2 * l + 2), t(2 * l + 3))
        })
        .collect();
    println!(
        "threads {}, {m} positions, {n} queries, {layers} layers x {heads} heads x {hd}",
        rayon::current_num_threads()
    );
    for ty in [DType::F32, DType::F16] {
        // As a cache holds them: the first m rows of a buffer with spare rows.
        let kv: Vec<(Tensor, Tensor)> = kv
            .iter()
            .map(|(k, v)| {
                let spare = |t: &Tensor| {
                    let pad = Tensor::zeros((m / 4, c), ty, &Device::Cpu).unwrap();
                    Tensor::cat(&[&t.to_dtype(ty).unwrap(), &pad], 0)
                        .unwrap()
                        .narrow(0, 0, m)
                        .unwrap()
                };
                (spare(k), spare(v))
            })
            .collect();
        let best = (0..reps)
            .map(|_| {
                let t = Instant::now();
                for (k, v) in &kv {
                    std::hint::black_box(
                        CpuBackend.attention(&q, k, v, heads, heads, true).unwrap(),
                    );
                }
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min);
        let bytes = (layers * 2 * m * c * ty.size_in_bytes()) as f64;
        println!(
            "{:?} cache: {:.1} ms per decode step, {:.1} GB/s",
            ty,
            best * 1e3,
            bytes / best / 1e9
        );
    }
}
