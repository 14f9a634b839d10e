//! Quantizer throughput on one thread (the reference searches are the cost of `quantize` and of
//! verify's tensor check): `cargo run --release --example quantize_bench [MVALUES]` quantizes
//! MVALUES million pseudo-random weights (default 8) to each K-quant and Q8_0 and prints
//! million values per second, best of three.
use mmfuser_convert::quant::{quantize, GgmlType};

fn main() {
    let m: usize = std::env::args()
        .nth(1)
        .map_or(8, |s| s.parse().expect("MVALUES"));
    let n = m << 20;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let x: Vec<f32> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04
        })
        .collect();
    let mut types: Vec<GgmlType> = std::env::args()
        .skip(2)
        .map(|t| GgmlType::from_name(&t).expect("a ggml type name such as Q4_K"))
        .collect();
    if types.is_empty() {
        types = vec![GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q6K, GgmlType::Q8_0];
    }
    for ty in types {
        let mut best = f64::MAX;
        let mut sum = 0u64;
        for _ in 0..3 {
            let t = std::time::Instant::now();
            let q = quantize(ty, &x).expect("quantize");
            best = best.min(t.elapsed().as_secs_f64());
            sum = sum.wrapping_add(q.iter().map(|&b| b as u64).sum::<u64>());
        }
        println!(
            "{:<5} {:>7.1} M values/s  (best of 3, {m} M values, checksum {sum})",
            ty.name(),
            n as f64 / best / 1e6
        );
    }
}
