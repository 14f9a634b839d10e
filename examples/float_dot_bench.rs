//! Micro-bench of the CPU linear on 16-bit float weights (not a test: timings depend on the box).
//!
//!     cargo run --release --example float_dot_bench [-- REPS]
//!
//! For LLaMA-7B's ffn_up shape (11008 x 4096, BF16 as checkpoints store it) against 773
//! activation rows (verify's default probe), times:
//! - "float_dot": `quant::float_dot::matmul` on the stored bytes (panels widened in cache);
//! - "widen + gemm": the road before it: the whole matrix widened to f32, then candle's matmul.
//!
//! Prints seconds (best of REPS) and GFLOP/s (2 * rows * out * in / s).
use candle_core::{Device, Tensor};
use mmfuser_convert::quant::{self, float_dot, GgmlType};
use std::time::Instant;

fn best<T>(reps: usize, mut f: impl FnMut() -> T) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(f());
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3);
    let (n, k, out) = (773usize, 4096usize, 11008usize);
    let x: Vec<f32> = (0..n * k)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let w: Vec<u8> = (0..out * k)
        .flat_map(|i| {
            half::bf16::from_f32(((i * 104729) % 1000) as f32 / 1000.0 - 0.5).to_le_bytes()
        })
        .collect();
    let flop = 2.0 * (n * k * out) as f64;
    let t = best(reps, || {
        float_dot::matmul(GgmlType::BF16, &w, out, k, &x, n).unwrap()
    });
    println!("float_dot     {t:.3} s  {:6.1} GFLOP/s", flop / t / 1e9);
    let xt = Tensor::from_vec(x.clone(), (n, k), &Device::Cpu).unwrap();
    let t = best(reps, || {
        let wf = quant::dequantize(GgmlType::BF16, &w, out * k).unwrap();
        let wt = Tensor::from_vec(wf, (out, k), &Device::Cpu).unwrap();
        xt.matmul(&wt.t().unwrap()).unwrap()
    });
    println!("widen + gemm  {t:.3} s  {:6.1} GFLOP/s", flop / t / 1e9);
}
