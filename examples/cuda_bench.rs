//! GPU bench of the CUDA backend at full LLaVA-MMFuser-7B shapes, with random weights generated
//! here (nothing big is copied to the GPU machine): the fuser block (5 x 576 x 1024 in), the CLIP
//! ViT-L/14-336 tower (the 23 blocks MMFuser needs), a LLaMA-7B prefill of 640 tokens and a
//! one-token forward, both with Q4_K_M weights (llama-quantize's type mixture, random blocks).
//!
//!     cargo run --release --example cuda_bench -- [--iters-scale F] [--json FILE]
//!
//! Prints milliseconds per item (median of the timed runs, each synchronised; weights already on
//! the device) for both GEMM modes, plus the two ceilings measured on the same card (a device
//! copy for bandwidth, a cuBLAS f16 GEMM for tensor-core rate) and the per-token mat-vec time.
use candle_core::{Device, Tensor};
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::CudaContext;
use half::f16;
use mmfuser_convert::cuda::{CudaBackend, GemmMode};
use mmfuser_convert::ground::dtype::{FileType, GgmlType};
use mmfuser_convert::model::hparams::{ClipHParams, FuserHParams, LlamaHParams};
use mmfuser_convert::model::{clip, fuser, llama, Backend, MemWeights, Profiled};
use mmfuser_convert::quant::mixture::{choose_types, TensorDesc};
use rayon::prelude::*;
use std::time::Instant;

fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    }
}

/// Uniform values in [-scale, scale), generated in parallel.
fn uniform(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut v = vec![0f32; n];
    v.par_chunks_mut(1 << 16).enumerate().for_each(|(i, c)| {
        let mut r = xorshift(seed ^ ((i as u64 + 1) << 20));
        for x in c {
            *x = ((r() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale;
        }
    });
    v
}

fn put_f16(ws: &mut MemWeights, name: &str, shape: &[usize], scale: f32, seed: u64) {
    let n: usize = shape.iter().product();
    let v = uniform(n, scale, seed);
    let bytes: Vec<u8> = v
        .par_iter()
        .flat_map_iter(|&x| f16::from_f32(x).to_le_bytes())
        .collect();
    ws.tensors
        .insert(name.into(), (GgmlType::F16, shape.to_vec(), bytes));
}

fn put_f32(ws: &mut MemWeights, name: &str, shape: &[usize], scale: f32, offset: f32, seed: u64) {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = uniform(n, scale, seed).iter().map(|x| x + offset).collect();
    ws.insert_f32(name, shape, &v);
}

/// Random blocks of a quantized type with small, finite scales (any bit pattern of the quants
/// is a valid block).
fn put_quant(ws: &mut MemWeights, name: &str, ty: GgmlType, shape: &[usize], seed: u64) {
    let n: usize = shape.iter().product();
    let nbytes = ty.bytes_for(n as u64).expect("whole blocks") as usize;
    let bs = ty.type_size();
    let mut bytes = vec![0u8; nbytes];
    let scale_at: &[usize] = match ty {
        GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
        GgmlType::Q6K => &[208],
        GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q5_0 => &[0],
        GgmlType::Q5_1 => &[0, 2],
        t => panic!("bench: no random blocks for {t}"),
    };
    bytes
        .par_chunks_mut(bs * 4096)
        .enumerate()
        .for_each(|(i, c)| {
            let mut r = xorshift(seed ^ ((i as u64 + 1) << 24));
            for b in c.chunks_mut(8) {
                let v = r().to_le_bytes();
                b.copy_from_slice(&v[..b.len()]);
            }
            for blk in c.chunks_mut(bs) {
                for &o in scale_at {
                    let d = 2e-5 + (r() >> 40) as f32 / (1u64 << 24) as f32 * 6e-5;
                    blk[o..o + 2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
                }
            }
        });
    ws.tensors.insert(name.into(), (ty, shape.to_vec(), bytes));
}

fn fuser_weights(ws: &mut MemWeights, fh: &FuserHParams, c: usize) {
    let mut seed = 100;
    let mut s = || {
        seed += 1;
        seed
    };
    for (att, lv) in [("cross_attn", fh.n_levels), ("self_attn", 1)] {
        let k = fh.n_heads * lv * fh.n_points;
        let p = format!("mm.fuser.{att}");
        put_f16(
            ws,
            &format!("{p}.sampling_offsets.weight"),
            &[2 * k, c],
            0.02,
            s(),
        );
        put_f32(
            ws,
            &format!("{p}.sampling_offsets.bias"),
            &[2 * k],
            3.0,
            0.0,
            s(),
        );
        put_f16(
            ws,
            &format!("{p}.attention_weights.weight"),
            &[k, c],
            0.02,
            s(),
        );
        put_f32(
            ws,
            &format!("{p}.attention_weights.bias"),
            &[k],
            0.1,
            0.0,
            s(),
        );
        for t in ["value_proj", "output_proj"] {
            put_f16(ws, &format!("{p}.{t}.weight"), &[c, c], 0.03, s());
            put_f32(ws, &format!("{p}.{t}.bias"), &[c], 0.01, 0.0, s());
        }
    }
    for t in ["query_norm", "feat_norm", "norm1"] {
        put_f32(ws, &format!("mm.fuser.{t}.weight"), &[c], 0.1, 1.0, s());
        put_f32(ws, &format!("mm.fuser.{t}.bias"), &[c], 0.1, 0.0, s());
    }
    put_f32(ws, "mm.fuser.gamma1", &[c], 0.05, 0.1, s());
    put_f32(ws, "mm.fuser.gamma2", &[c], 0.05, 0.1, s());
}

fn clip_weights(ws: &mut MemWeights, hp: &ClipHParams) {
    let (c, ff, p) = (hp.n_embd, hp.n_ff, hp.patch_size);
    let n = hp.n_patches();
    let mut seed = 1000;
    let mut s = || {
        seed += 1;
        seed
    };
    put_f16(ws, "v.patch_embd.weight", &[c, 3, p, p], 0.04, s());
    put_f32(ws, "v.class_embd", &[c], 0.5, 0.0, s());
    put_f16(ws, "v.position_embd.weight", &[n + 1, c], 0.5, s());
    put_f32(ws, "v.pre_ln.weight", &[c], 0.1, 1.0, s());
    put_f32(ws, "v.pre_ln.bias", &[c], 0.1, 0.0, s());
    for i in 0..hp.blocks_needed() {
        for t in ["attn_q", "attn_k", "attn_v", "attn_out"] {
            put_f16(ws, &format!("v.blk.{i}.{t}.weight"), &[c, c], 0.03, s());
            put_f32(ws, &format!("v.blk.{i}.{t}.bias"), &[c], 0.01, 0.0, s());
        }
        for t in ["ln1", "ln2"] {
            put_f32(ws, &format!("v.blk.{i}.{t}.weight"), &[c], 0.1, 1.0, s());
            put_f32(ws, &format!("v.blk.{i}.{t}.bias"), &[c], 0.1, 0.0, s());
        }
        put_f16(ws, &format!("v.blk.{i}.ffn_up.weight"), &[ff, c], 0.03, s());
        put_f32(ws, &format!("v.blk.{i}.ffn_up.bias"), &[ff], 0.01, 0.0, s());
        put_f16(
            ws,
            &format!("v.blk.{i}.ffn_down.weight"),
            &[c, ff],
            0.015,
            s(),
        );
        put_f32(
            ws,
            &format!("v.blk.{i}.ffn_down.bias"),
            &[c],
            0.01,
            0.0,
            s(),
        );
    }
}

/// LLaMA-7B with llama-quantize's Q4_K_M type choice; returns bytes of matrices per type.
fn llama_weights(ws: &mut MemWeights, l: &LlamaHParams) -> Vec<(String, usize)> {
    let (h, ff, v) = (l.n_embd, l.n_ff, l.n_vocab);
    let mut mats: Vec<(String, Vec<usize>)> = vec![
        ("token_embd.weight".into(), vec![v, h]),
        ("output.weight".into(), vec![v, h]),
    ];
    for i in 0..l.n_layer {
        for t in ["attn_q", "attn_k", "attn_v", "attn_output"] {
            mats.push((format!("blk.{i}.{t}.weight"), vec![h, h]));
        }
        mats.push((format!("blk.{i}.ffn_gate.weight"), vec![ff, h]));
        mats.push((format!("blk.{i}.ffn_up.weight"), vec![ff, h]));
        mats.push((format!("blk.{i}.ffn_down.weight"), vec![h, ff]));
    }
    let nes: Vec<Vec<u64>> = mats
        .iter()
        .map(|(_, s)| s.iter().rev().map(|&d| d as u64).collect())
        .collect();
    let descs: Vec<TensorDesc> = mats
        .iter()
        .zip(&nes)
        .map(|((n, _), ne)| TensorDesc {
            name: n,
            ne,
            ty: GgmlType::F16,
        })
        .collect();
    let types = choose_types(FileType::MostlyQ4KM, &descs, l.n_layer);
    let mut per_type: std::collections::BTreeMap<String, usize> = Default::default();
    for (i, ((name, shape), (ty, _))) in mats.iter().zip(&types).enumerate() {
        put_quant(ws, name, *ty, shape, 7 + i as u64);
        if name != "token_embd.weight" {
            *per_type.entry(ty.name().to_string()).or_default() += ws.tensors[name].2.len();
        }
    }
    put_f32(ws, "output_norm.weight", &[h], 0.1, 1.0, 3);
    for i in 0..l.n_layer {
        put_f32(
            ws,
            &format!("blk.{i}.attn_norm.weight"),
            &[h],
            0.1,
            1.0,
            50 + i as u64,
        );
        put_f32(
            ws,
            &format!("blk.{i}.ffn_norm.weight"),
            &[h],
            0.1,
            1.0,
            90 + i as u64,
        );
    }
    per_type.into_iter().collect()
}

/// Median and min of `iters` synchronised runs after `warm` untimed ones, in ms.
fn time(b: &CudaBackend, warm: usize, iters: usize, mut f: impl FnMut()) -> (f64, f64) {
    for _ in 0..warm {
        f();
    }
    b.synchronize().unwrap();
    let mut ts: Vec<f64> = (0..iters)
        .map(|_| {
            let t0 = Instant::now();
            f();
            b.synchronize().unwrap();
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ts.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (ts[ts.len() / 2], ts[0])
}

/// The activation a LLaMA-7B matrix with `cols` inputs reads: the model width (4096) or, for
/// ffn_down, the feed-forward width (11008).
fn input_for<'a, T>(cols: usize, embd: &'a T, ff: &'a T) -> &'a T {
    if cols == 11008 {
        ff
    } else {
        embd
    }
}

/// Every matrix of `wts` applied once to the matching activation (`input_for`).
fn linear_all(
    b: &CudaBackend,
    wts: &[std::sync::Arc<mmfuser_convert::cuda::DevWeight>],
    embd: &<CudaBackend as Backend>::T,
    ff: &<CudaBackend as Backend>::T,
) {
    for w in wts {
        b.linear(input_for(b.weight_dims(w).1, embd, ff), w, None)
            .unwrap();
    }
}

/// One more run on the profiled backend (every op timed between two synchronisations): where
/// the time goes.
fn profile(b: &CudaBackend, what: &str, mut f: impl FnMut(&Profiled<CudaBackend>)) {
    let p = Profiled::new(b);
    b.synchronize().unwrap();
    let t0 = Instant::now();
    f(&p);
    b.synchronize().unwrap();
    let wall = t0.elapsed().as_secs_f64() * 1e3;
    let ops = p.report().unwrap();
    let dev: f64 = ops.iter().map(|o| o.device_ms).sum();
    let host: f64 = ops.iter().map(|o| o.host_ms).sum();
    let calls: usize = ops.iter().map(|o| o.calls).sum();
    println!(
        "  profile {what}: wall {wall:.3} ms (synchronised per op), {calls} ops, host issuing {host:.3} ms, device span {dev:.3} ms"
    );
    for o in ops.iter().take(9) {
        let (name, n, h, d) = (&o.name, o.calls, o.host_ms, o.device_ms);
        println!("    {name:<40} {n:>5} calls  host {h:>8.3} ms  device {d:>8.3} ms");
    }
}

fn ceilings() -> (f64, f64) {
    let ctx = CudaContext::new(0).unwrap();
    let s = ctx.default_stream();
    // Device-to-device copy of 1 GiB: bytes read + written over time.
    let n = 1usize << 30;
    let host: Vec<u8> = (0..n / 4096)
        .flat_map(|i| [(i % 251) as u8; 4096])
        .collect();
    let a = s.clone_htod(&host).unwrap();
    drop(host);
    let mut bb = unsafe { s.alloc::<u8>(n) }.unwrap();
    s.memcpy_dtod(&a, &mut bb).unwrap();
    s.synchronize().unwrap();
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t0 = Instant::now();
        s.memcpy_dtod(&a, &mut bb).unwrap();
        s.synchronize().unwrap();
        best = best.min(t0.elapsed().as_secs_f64());
    }
    let bw = 2.0 * n as f64 / best / 1e9;
    drop((a, bb));
    // f16 GEMM 8192^3 on random data.
    let m = 8192usize;
    let v: Vec<f16> = uniform(m * m, 1.0, 5)
        .iter()
        .map(|&x| f16::from_f32(x))
        .collect();
    let x = s.clone_htod(&v).unwrap();
    let y = s.clone_htod(&v).unwrap();
    let mut z = unsafe { s.alloc::<f16>(m * m) }.unwrap();
    let blas = CudaBlas::new(s.clone()).unwrap();
    let cfg = GemmConfig {
        transa: cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N,
        transb: cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N,
        m: m as i32,
        n: m as i32,
        k: m as i32,
        alpha: f16::ONE,
        lda: m as i32,
        ldb: m as i32,
        beta: f16::ZERO,
        ldc: m as i32,
    };
    unsafe { blas.gemm(cfg, &x, &y, &mut z) }.unwrap();
    s.synchronize().unwrap();
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t0 = Instant::now();
        unsafe { blas.gemm(cfg, &x, &y, &mut z) }.unwrap();
        s.synchronize().unwrap();
        best = best.min(t0.elapsed().as_secs_f64());
    }
    let tflops = 2.0 * (m as f64).powi(3) / best / 1e12;
    (bw, tflops)
}

fn main() {
    let mut json_out = None;
    let mut scale = 1.0f64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--json" => json_out = args.next(),
            "--iters-scale" => scale = args.next().and_then(|s| s.parse().ok()).unwrap_or(1.0),
            _ => {
                eprintln!("usage: cuda_bench [--iters-scale F] [--json FILE]");
                std::process::exit(2);
            }
        }
    }
    let it = |n: usize| ((n as f64 * scale).ceil() as usize).max(3);
    let b = match CudaBackend::open() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("cuda_bench: {e}");
            std::process::exit(2);
        }
    };
    println!("device: {}; {}", b.describe(), b.compile_note());
    let mut results: Vec<serde_json::Value> = vec![];
    let mut row = |item: &str, mode: &str, (med, min): (f64, f64), goal: Option<f64>| {
        println!(
            "{item:<44} {mode:<6} {med:>9.3} ms (min {min:.3}){}",
            goal.map(|g| format!(
                "   goal <= {g} ms{}",
                if med <= g { "" } else { "  MISSED" }
            ))
            .unwrap_or_default()
        );
        results.push(serde_json::json!({"item": item, "mode": mode, "median_ms": med, "min_ms": min, "goal_ms": goal}));
    };

    let (bw, tflops) = ceilings();
    println!("ceilings: device copy {bw:.0} GB/s (read+write), cuBLAS f16 GEMM 8192^3 {tflops:.0} TFLOP/s");

    // ---- fuser block -------------------------------------------------------------------------
    let fh = FuserHParams {
        n_heads: 16,
        n_levels: 4,
        n_points: 4,
        eps: 1e-6,
    };
    let (e, c) = (24usize, 1024usize);
    let mut ws = MemWeights::new();
    fuser_weights(&mut ws, &fh, c);
    let srcs: Vec<_> = (0..5)
        .map(|i| {
            let v = uniform(e * e * c, 1.7, 500 + i);
            b.upload(&Tensor::from_vec(v, (e * e, c), &Device::Cpu).unwrap())
                .unwrap()
        })
        .collect();
    for mode in [GemmMode::Exact, GemmMode::Fast] {
        b.set_gemm_mode(mode);
        let t = time(&b, 3, it(50), || {
            fuser::fuser(&b, &ws, &fh, &srcs, e).unwrap();
        });
        row(
            "fuser block, 5 x 576 x 1024 in (F16)",
            &format!("{mode:?}"),
            t,
            Some(0.15),
        );
        profile(&b, "fuser", |p| {
            fuser::fuser(p, &ws, &fh, &srcs, e).unwrap();
        });
    }
    drop(srcs);
    b.clear_weights();
    drop(ws);

    // ---- CLIP ViT-L/14-336, 23 blocks ---------------------------------------------------------
    let chp = ClipHParams {
        image_size: 336,
        patch_size: 14,
        n_embd: 1024,
        n_ff: 4096,
        n_head: 16,
        n_layer: 24,
        eps: 1e-5,
        quick_gelu: true,
        image_mean: [0.48145466, 0.4578275, 0.40821073],
        image_std: [0.26862954, 0.261_302_6, 0.275_777_1],
        feature_layers: vec![3, 8, 13, 18, 23],
    };
    let mut ws = MemWeights::new();
    clip_weights(&mut ws, &chp);
    let px = Tensor::from_vec(uniform(3 * 336 * 336, 2.0, 9), (3, 336, 336), &Device::Cpu).unwrap();
    // Fast + f16 attention: the setting PyTorch's fp16 anchor compares with.
    for (mode, f16_attn) in [
        (GemmMode::Exact, false),
        (GemmMode::Fast, false),
        (GemmMode::Fast, true),
    ] {
        b.set_gemm_mode(mode);
        b.set_f16_attention(f16_attn);
        let t = time(&b, 2, it(20), || {
            clip::clip_hidden_states(&b, &ws, &chp, &px).unwrap();
        });
        row(
            "CLIP ViT-L/14-336, 23 blocks (F16)",
            &format!("{mode:?}{}", if f16_attn { " +f16 attn" } else { "" }),
            t,
            Some(5.0),
        );
        profile(&b, "CLIP", |p| {
            clip::clip_hidden_states(p, &ws, &chp, &px).unwrap();
        });
    }
    b.set_f16_attention(false);
    b.clear_weights();
    drop(ws);

    // ---- LLaMA-7B, Q4_K_M ---------------------------------------------------------------------
    let lhp = LlamaHParams {
        n_layer: 32,
        n_embd: 4096,
        n_ff: 11008,
        n_head: 32,
        n_head_kv: 32,
        n_vocab: 32000,
        n_ctx: 4096,
        rms_eps: 1e-5,
        rope_theta: 10000.0,
    };
    let t0 = Instant::now();
    let mut ws = MemWeights::new();
    let per_type = llama_weights(&mut ws, &lhp);
    let mat_bytes: usize = per_type.iter().map(|(_, n)| n).sum();
    println!(
        "LLaMA-7B Q4_K_M random weights: {} in {:.1} s; matrices read per token: {:.2} GB",
        per_type
            .iter()
            .map(|(t, n)| format!("{t} {:.2} GB", *n as f64 / 1e9))
            .collect::<Vec<_>>()
            .join(", "),
        t0.elapsed().as_secs_f64(),
        mat_bytes as f64 / 1e9
    );
    let emb640 = Tensor::from_vec(uniform(640 * 4096, 1.0, 11), (640, 4096), &Device::Cpu).unwrap();
    let emb1 = Tensor::from_vec(uniform(4096, 1.0, 12), (1, 4096), &Device::Cpu).unwrap();
    // Upload every weight once (first forward), then time.
    let t0 = Instant::now();
    llama::decode(&b, &ws, &lhp, &emb1).unwrap();
    b.synchronize().unwrap();
    println!(
        "first forward (uploads the weights): {:.2} s",
        t0.elapsed().as_secs_f64()
    );
    // Quantized weights take one f16 activation plane in either GEMM mode.
    b.set_gemm_mode(GemmMode::Exact);
    let t = time(&b, 2, it(10), || {
        llama::decode(&b, &ws, &lhp, &emb640).unwrap();
    });
    row("LLaMA-7B prefill 640 tokens, Q4_K_M", "-", t, Some(40.0));
    profile(&b, "prefill", |p| {
        llama::decode(p, &ws, &lhp, &emb640).unwrap();
    });
    profile(&b, "one token", |p| {
        llama::decode(p, &ws, &lhp, &emb1).unwrap();
    });

    // Where the one-token time goes: the mat-vecs alone (every matrix of the forward, n = 1).
    let x4096 = b.upload(&emb1).unwrap();
    let x11008 = b
        .upload(&Tensor::from_vec(uniform(11008, 1.0, 13), (1, 11008), &Device::Cpu).unwrap())
        .unwrap();
    let mut names: Vec<String> = vec!["output.weight".into()];
    for i in 0..lhp.n_layer {
        for t in [
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ] {
            names.push(format!("blk.{i}.{t}.weight"));
        }
    }
    let wts: Vec<_> = names.iter().map(|n| b.weight(&ws, n).unwrap()).collect();
    // The Q4_K one-token kernel with 1, 2 and 4 weight rows per warp (same sums; the default
    // last, so later rows of the table use it).
    let default_rows = b.q4k_rows_per_warp();
    let mut variants: Vec<u8> = [1u8, 2, 4]
        .into_iter()
        .filter(|&r| r != default_rows)
        .collect();
    variants.push(default_rows);
    for r in variants {
        b.set_q4k_rows_per_warp(r);
        let tag = format!("Q4_K {r} row(s)/warp");
        let t = time(&b, 3, it(30), || {
            llama::decode(&b, &ws, &lhp, &emb1).unwrap();
        });
        row("LLaMA-7B one token, Q4_K_M", &tag, t, Some(2.0));
        let t = time(&b, 2, it(20), || linear_all(&b, &wts, &x4096, &x11008));
        row("  of which: the 225 mat-vecs alone", &tag, t, None);
        println!(
            "  mat-vecs: {:.0} GB/s effective ({:.2} GB in {:.3} ms); device copy ceiling {bw:.0} GB/s",
            mat_bytes as f64 / t.0 / 1e6,
            mat_bytes as f64 / 1e9,
            t.0
        );
        // One matrix of each shape, alone: per-launch time against its bytes.
        for name in [
            "blk.0.attn_q.weight",
            "blk.0.ffn_up.weight",
            "blk.0.ffn_down.weight",
        ] {
            let w = b.weight(&ws, name).unwrap();
            let (o, i) = b.weight_dims(&w);
            let x = input_for(i, &x4096, &x11008);
            // 50 launches back to back per sample: the launch cost without a sync in each.
            let t = time(&b, 2, it(20), || {
                for _ in 0..50 {
                    b.linear(x, &w, None).unwrap();
                }
            });
            let t = (t.0 / 50.0, t.1 / 50.0);
            let bytes = ws.tensors[name].2.len() as f64;
            println!(
                "    {name} [{o} x {i}] {}: {:.4} ms, {:.0} GB/s",
                ws.tensors[name].0.name(),
                t.0,
                bytes / t.0 / 1e6
            );
        }
    }
    // The same matrices, 640 rows: the prefill's GEMMs alone.
    let x640 = b.upload(&emb640).unwrap();
    let x640b = b
        .upload(
            &Tensor::from_vec(uniform(640 * 11008, 1.0, 14), (640, 11008), &Device::Cpu).unwrap(),
        )
        .unwrap();
    {
        let t = time(&b, 2, it(5), || linear_all(&b, &wts, &x640, &x640b));
        let flops: f64 = wts
            .iter()
            .map(|w| {
                let (o, i) = b.weight_dims(w);
                2.0 * 640.0 * o as f64 * i as f64
            })
            .sum();
        row(
            "  of which: the 225 dequant + GEMMs alone (640 rows)",
            "-",
            t,
            None,
        );
        println!(
            "  GEMMs: {:.0} TFLOP/s of useful work ({:.2} TFLOP); cuBLAS f16 ceiling {tflops:.0} TFLOP/s",
            flops / t.0 / 1e9,
            flops / 1e12
        );
    }
    println!("{}", b.memory_report());
    if let Some(p) = json_out {
        let v = serde_json::json!({
            "device": b.describe(),
            "copy_GBps": bw,
            "f16_gemm_TFLOPs": tflops,
            "results": results,
        });
        std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    }
}
