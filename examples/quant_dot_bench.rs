//! Micro-bench of the CPU linear on quantized weights (not a test: timings depend on the box).
//!
//!     cargo run --release --example quant_dot_bench [-- REPS]
//!
//! For LLaMA-7B shapes in Q4_K_M's types (attn_q/k/o 4096x4096 Q4_K, ffn_gate/up 11008x4096
//! Q4_K, ffn_down 4096x11008 Q6_K), times one mat-vec (1 row) and one 512-row matmul:
//! - "dot": `quant::dot::matmul` on the quantized bytes (8-bit activations, integer dots);
//! - "f32": the road before it: dequantize the whole matrix to f32 (in parallel, as
//!   `WeightSource::tensor_f32`) and multiply with candle (gemm), dequantization included;
//! - "candle": candle-core's own quantized matmul (`QMatMul` on a `QTensor` made from the same
//!   bytes by `qtensor_from_ggml`, which copies them into its block structs; copy not timed, and
//!   its x86 kernels' repacking of the weight is cached in the QTensor after the first call). A
//!   line on stderr times a fresh QTensor per call (copy + repack + product), what using it on
//!   weights read once per forward would cost.
//!
//! `BENCH_DOT_ONLY=1`: our kernels only (to compare settings quickly).
//! `BENCH_TYPES=Q5_K,Q8_0,...`: our kernels only, on 4096x4096 weights of those types.
//! `BENCH_ROWS=1,32,512`: the activation row counts timed (default 1 and 512).
//!
//! Prints seconds (best of REPS), GFLOP/s (2*rows*out*in / s) and GB/s of weight bytes read.
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QMatMul};
use candle_core::{Device, Module, Tensor};
use mmfuser_convert::quant::{self, dot, GgmlType};
use rayon::prelude::*;
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

fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    (0..n)
        .into_par_iter()
        .map(|i| {
            let mut s = (i as u64 ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            s ^= s >> 29;
            s = s.wrapping_mul(0xbf58_476d_1ce4_e5b9);
            s ^= s >> 32;
            ((s % 20001) as f32 / 10000.0 - 1.0) * scale
        })
        .collect()
}

fn f32_road(ty: GgmlType, w: &[u8], out: usize, k: usize, x: &Tensor) -> Tensor {
    let block = 65536;
    let mut wf = vec![0f32; out * k];
    wf.par_chunks_mut(block)
        .zip(w.par_chunks(block / ty.block_size() * ty.type_size()))
        .for_each(|(o, b)| quant::dequantize_into(ty, b, o).unwrap());
    let wt = Tensor::from_vec(wf, (out, k), &Device::Cpu).unwrap();
    x.matmul(&wt.t().unwrap()).unwrap()
}

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3);
    // BENCH_DOT_ONLY=1: our kernels only (for comparing their settings).
    let dot_only = std::env::var_os("BENCH_DOT_ONLY").is_some();
    println!(
        "threads {}, isa {:?}, best of {reps}",
        rayon::current_num_threads(),
        dot::Isa::current()
    );
    println!(
        "{:<24} {:>5} {:>5} {:>9} {:>8} {:>7} {:>9} {:>8} {:>7} {:>9} {:>8} {:>7}",
        "weight",
        "type",
        "rows",
        "dot s",
        "GFLOP/s",
        "GB/s",
        "f32 s",
        "GFLOP/s",
        "x dot",
        "candle s",
        "GFLOP/s",
        "x dot"
    );
    let mut shapes = vec![
        ("attn_q 4096x4096", GgmlType::Q4K, 4096, 4096),
        ("ffn_up 11008x4096", GgmlType::Q4K, 11008, 4096),
        ("ffn_down 4096x11008", GgmlType::Q6K, 4096, 11008),
    ];
    // BENCH_ROWS: activation row counts (default 1,512: decode's mat-vec and a prefill).
    let rows: Vec<usize> = std::env::var("BENCH_ROWS")
        .map(|v| {
            v.split(',')
                .map(|n| {
                    n.trim()
                        .parse()
                        .expect("BENCH_ROWS: row counts, comma-separated")
                })
                .collect()
        })
        .unwrap_or_else(|_| vec![1, 512]);
    let mut dot_only = dot_only;
    if let Ok(types) = std::env::var("BENCH_TYPES") {
        dot_only = true;
        // BENCH_OUT: weight rows (default 4096; more than the caches hold times decode honestly).
        let out: usize = std::env::var("BENCH_OUT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(4096);
        shapes = types
            .split(',')
            .map(|t| {
                let ty = GgmlType::from_name(t).unwrap_or_else(|| panic!("unknown type {t}"));
                ("out x 4096", ty, out, 4096)
            })
            .collect();
    }
    for (name, ty, out, k) in shapes {
        let w = quant::quantize_par(ty, &values(out * k, 1, 0.05), k).unwrap();
        let cty = match ty {
            GgmlType::Q4K => GgmlDType::Q4K,
            _ => GgmlDType::Q6K,
        };
        let qm = (!dot_only).then(|| {
            QMatMul::from_qtensor(qtensor_from_ggml(cty, &w, vec![out, k], &Device::Cpu).unwrap())
                .unwrap()
        });
        for &n in &rows {
            let x = values(n * k, 2, 1.0);
            let xt = Tensor::from_vec(x.clone(), (n, k), &Device::Cpu).unwrap();
            let t_dot = best(reps, || dot::matmul(ty, &w, out, k, &x, n).unwrap());
            if dot_only {
                let flop = 2.0 * (n * out * k) as f64;
                println!(
                    "{name:<24} {:>5} {n:>5} {t_dot:>9.4} {:>8.1}",
                    ty.name(),
                    flop / t_dot / 1e9
                );
                continue;
            }
            let t_f32 = best(reps, || f32_road(ty, &w, out, k, &xt));
            let qm = qm.as_ref().unwrap();
            let t_candle = best(reps, || qm.forward(&xt).unwrap());
            let t_fresh = best(reps, || {
                let q = QMatMul::from_qtensor(
                    qtensor_from_ggml(cty, &w, vec![out, k], &Device::Cpu).unwrap(),
                )
                .unwrap();
                q.forward(&xt).unwrap()
            });
            eprintln!("{name} n={n}: candle with a fresh QTensor (copy + repack) {t_fresh:.4} s");
            let flop = 2.0 * (n * out * k) as f64;
            let gb = w.len() as f64 / 1e9;
            println!(
                "{:<24} {:>5} {:>5} {:>9.4} {:>8.1} {:>7.2} {:>9.4} {:>8.1} {:>7.2} {:>9.4} {:>8.1} {:>7.2}",
                name,
                ty.name(),
                n,
                t_dot,
                flop / t_dot / 1e9,
                gb / t_dot,
                t_f32,
                flop / t_f32 / 1e9,
                t_f32 / t_dot,
                t_candle,
                flop / t_candle / 1e9,
                t_candle / t_dot
            );
        }
    }
}
