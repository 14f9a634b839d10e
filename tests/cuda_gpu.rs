//! The CUDA backend against the CPU backend, on a machine with an NVIDIA GPU. Every test here is
//! `#[ignore]`d (CI has no GPU: `cargo test` lists them as ignored, with the reason); run them on a
//! GPU machine with `--ignored`, where a missing or unusable GPU is a failure:
//!
//!     cargo test --release --test integration -- --ignored --nocapture --test-threads=1 cuda_gpu::
//!
//! (`scripts/gpu_run.sh` does this with the binary built by `scripts/gpu_prepare.sh`.)
//! - every op on random inputs (outputs poisoned with NaN first), each weight type and both
//!   linear paths (mat-vec for <= 8 rows, cuBLAS above), both GEMM modes;
//! - the whole model on the fixture (source checkpoint, F16 / Q8_0 / Q4_K_M artefacts): image
//!   embeddings and logits against the CPU backend (F16: within 1e-3 relative, same top-1), in
//!   both GEMM modes (bounds per mode below);
//! - `verify --device cuda` passes and fails exactly where `--device cpu` does.
use crate::common::sabotage;
use candle_core::{Device, Tensor};
use mmfuser_convert::convert::source::Source;
use mmfuser_convert::cpu::{CpuBackend, CpuF32Linear};
use mmfuser_convert::cuda::{CudaBackend, GemmMode};
use mmfuser_convert::ground::dtype::GgmlType;
use mmfuser_convert::model::{self, Backend, MemWeights, WeightSource};
use mmfuser_convert::runtime::weights::GgufWeights;
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_mmfuser-convert");
const CK: &str = "fixtures/tiny-llava-mmfuser";
const TOWER: &str = "fixtures/tiny-clip";

/// The backend; these tests run only when asked for (`--ignored`), so no GPU is a failure.
fn gpu(test: &str) -> CudaBackend {
    match CudaBackend::open() {
        Ok(b) => {
            println!("{test}: {} — {}", b.describe(), b.compile_note());
            b
        }
        Err(e) => panic!("{test} needs a usable NVIDIA GPU (it is #[ignore]d for that): {e}"),
    }
}

struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.next() * scale).collect()
    }
}

fn t(v: Vec<f32>, r: usize, c: usize) -> Tensor {
    Tensor::from_vec(v, (r, c), &Device::Cpu).unwrap()
}

fn flat(x: &Tensor) -> Vec<f32> {
    x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// max |a - b| / max(1, max |b|), NaN-aware (NaN anywhere -> infinity).
fn diff(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let scale = b.iter().fold(1f64, |m, &v| m.max((v as f64).abs()));
    let mut d = 0f64;
    for (&x, &y) in a.iter().zip(b) {
        if !x.is_finite() || !y.is_finite() {
            return f64::INFINITY;
        }
        d = d.max((x as f64 - y as f64).abs());
    }
    d / scale
}

/// Relative RMS error of a against the reference b.
fn rel_rms(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (x as f64 - y as f64).powi(2);
        den += (y as f64).powi(2);
    }
    if a.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    (num / den.max(1e-300)).sqrt()
}

/// A figure within its bound. NaN fails, and so does an infinite error (a NaN or Inf output)
/// whatever the bound.
fn passes(d: f64, tol: f64) -> bool {
    d.is_finite() && d <= tol
}

#[test]
fn a_nan_or_inf_figure_fails_any_bound() {
    assert!(passes(0.0, 0.0) && passes(1e-4, 1e-3));
    assert!(!passes(2e-3, 1e-3));
    for d in [f64::NAN, f64::INFINITY] {
        assert!(!passes(d, f64::INFINITY) && !passes(d, 1.0), "{d}");
    }
    assert_eq!(diff(&[f32::NAN], &[1.0]), f64::INFINITY);
    assert_eq!(rel_rms(&[f32::INFINITY], &[1.0]), f64::INFINITY);
    assert_eq!(rel_rms(&[1.0], &[1.0, 2.0]), f64::INFINITY);
}

struct Report {
    rows: Vec<(String, f64, f64)>,
}
impl Report {
    fn new() -> Self {
        Report { rows: vec![] }
    }
    fn add(&mut self, name: impl Into<String>, d: f64, tol: f64) {
        let name = name.into();
        println!(
            "  {:<48} {:>10.3e}  (tol {:.0e}) {}",
            name,
            d,
            tol,
            if passes(d, tol) { "ok" } else { "FAIL" }
        );
        self.rows.push((name, d, tol));
    }
    fn finish(self, what: &str) {
        let bad: Vec<_> = self
            .rows
            .iter()
            .filter(|(_, d, t)| !passes(*d, *t))
            .collect();
        assert!(
            bad.is_empty(),
            "{what}: {} check(s) failed: {bad:?}",
            bad.len()
        );
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run with --ignored there (scripts/gpu_run.sh)"]
fn ops_match_cpu() {
    let g = gpu("ops_match_cpu");
    g.set_poison(true);
    let c = CpuBackend;
    let mut rep = Report::new();
    let mut rng = Rng::new(17);
    let up = |x: &Tensor| g.upload(x).unwrap();
    let down = |x: &<CudaBackend as Backend>::T| flat(&g.download(x).unwrap());

    // upload / download / rows / concat
    let a = t(rng.vec(37 * 19, 3.0), 37, 19);
    let b = t(rng.vec(5 * 19, 3.0), 5, 19);
    let (ga, gb) = (up(&a), up(&b));
    rep.add("upload/download", diff(&down(&ga), &flat(&a)), 0.0);
    rep.add(
        "rows 3..+11",
        diff(
            &down(&g.rows(&ga, 3, 11).unwrap()),
            &flat(&c.rows(&a, 3, 11).unwrap()),
        ),
        0.0,
    );
    rep.add(
        "concat_rows",
        diff(
            &down(&g.concat_rows(&[&ga, &gb, &ga]).unwrap()),
            &flat(&c.concat_rows(&[&a, &b, &a]).unwrap()),
        ),
        0.0,
    );

    // element-wise
    let row = t(rng.vec(19, 2.0), 1, 19);
    let a2 = t(rng.vec(37 * 19, 3.0), 37, 19);
    let (grow, ga2) = (up(&row), up(&a2));
    for (name, gy, cy) in [
        ("add", g.add(&ga, &ga2).unwrap(), c.add(&a, &a2).unwrap()),
        (
            "add row-broadcast",
            g.add(&ga, &grow).unwrap(),
            c.add(&a, &row).unwrap(),
        ),
        ("mul", g.mul(&ga, &ga2).unwrap(), c.mul(&a, &a2).unwrap()),
        (
            "mul row-broadcast",
            g.mul(&ga, &grow).unwrap(),
            c.mul(&a, &row).unwrap(),
        ),
        (
            "quick_gelu",
            g.quick_gelu(&ga).unwrap(),
            c.quick_gelu(&a).unwrap(),
        ),
        (
            "gelu_erf",
            g.gelu_erf(&ga).unwrap(),
            c.gelu_erf(&a).unwrap(),
        ),
        (
            "silu_mul",
            g.silu_mul(&ga, &ga2).unwrap(),
            c.silu_mul(&a, &a2).unwrap(),
        ),
    ] {
        rep.add(name, diff(&down(&gy), &flat(&cy)), 1e-6);
    }

    // norms, softmax, rope
    for cols in [64usize, 1024, 4096] {
        let x = t(
            rng.vec(9 * cols, 4.0).iter().map(|v| v + 1.5).collect(),
            9,
            cols,
        );
        let w = t(rng.vec(cols, 1.0), 1, cols);
        let bb = t(rng.vec(cols, 1.0), 1, cols);
        let (gx, gw, gbb) = (up(&x), up(&w), up(&bb));
        rep.add(
            format!("layer_norm cols={cols}"),
            diff(
                &down(&g.layer_norm(&gx, &gw, &gbb, 1e-5).unwrap()),
                &flat(&c.layer_norm(&x, &w, &bb, 1e-5).unwrap()),
            ),
            1e-6,
        );
        rep.add(
            format!("rms_norm cols={cols}"),
            diff(
                &down(&g.rms_norm(&gx, &gw, 1e-6).unwrap()),
                &flat(&c.rms_norm(&x, &w, 1e-6).unwrap()),
            ),
            1e-6,
        );
    }
    let x = t(rng.vec(13 * 256, 6.0), 13, 256);
    for group in [4usize, 16, 256] {
        rep.add(
            format!("softmax_groups group={group}"),
            diff(
                &down(&g.softmax_groups(&up(&x), group).unwrap()),
                &flat(&c.softmax_groups(&x, group).unwrap()),
            ),
            1e-6,
        );
    }
    for (n_head, pos0) in [(4usize, 0usize), (32, 577), (2, 3)] {
        let hd = 128 / (n_head / 2).max(1);
        let x = t(rng.vec(11 * n_head * hd, 2.0), 11, n_head * hd);
        rep.add(
            format!("rope n_head={n_head} hd={hd} pos0={pos0}"),
            diff(
                &down(&g.rope_interleaved(&up(&x), n_head, pos0, 10000.0).unwrap()),
                &flat(&c.rope_interleaved(&x, n_head, pos0, 10000.0).unwrap()),
            ),
            1e-5,
        );
        rep.add(
            format!("rope_neox n_head={n_head} hd={hd} pos0={pos0}"),
            diff(
                &down(&g.rope_neox(&up(&x), n_head, pos0, 10000.0).unwrap()),
                &flat(&c.rope_neox(&x, n_head, pos0, 10000.0).unwrap()),
            ),
            1e-5,
        );
    }

    // attention
    for (n, m, nh, nkv, hd, causal) in [
        (7, 7, 4, 2, 16, true),
        (5, 9, 4, 4, 32, true),
        (6, 6, 2, 1, 64, false),
        (1, 1, 8, 8, 128, true),
        (1, 12, 8, 2, 64, true),
        (1, 640, 32, 32, 128, true),
        (8, 2000, 32, 8, 128, true),
        (9, 9, 4, 2, 16, true),
        (577, 577, 16, 16, 64, false),
        (300, 300, 32, 32, 128, true),
    ] {
        let q = t(rng.vec(n * nh * hd, 1.0), n, nh * hd);
        let k = t(rng.vec(m * nkv * hd, 1.0), m, nkv * hd);
        let v = t(rng.vec(m * nkv * hd, 1.0), m, nkv * hd);
        let cy = c.attention(&q, &k, &v, nh, nkv, causal).unwrap();
        // f16 attention rounds Q, K, P and V to f16 (2^-11 relative each) for the tensor cores.
        for (f16, tol) in [(false, 1e-5), (true, 2e-3)] {
            g.set_f16_attention(f16);
            let gy = g
                .attention(&up(&q), &up(&k), &up(&v), nh, nkv, causal)
                .unwrap();
            rep.add(
                format!(
                    "attention n={n} m={m} heads={nh}/{nkv} hd={hd} causal={causal}{}",
                    if f16 { " f16" } else { "" }
                ),
                diff(&down(&gy), &flat(&cy)),
                tol,
            );
        }
        g.set_f16_attention(false);
    }

    // deformable attention (fuser shapes: M=16 heads, L=4 levels of 24x24, P=4; and odd levels)
    for (levels, grid, nh, np, ch, off_scale) in [
        (
            vec![(24usize, 24usize); 4],
            (24usize, 24usize),
            16usize,
            4usize,
            1024usize,
            3.0f32,
        ),
        (vec![(24, 24)], (24, 24), 16, 4, 1024, 30.0),
        (vec![(3, 3), (3, 3), (2, 5)], (3, 3), 2, 3, 6, 3.0),
    ] {
        let nv: usize = levels.iter().map(|(h, w)| h * w).sum();
        let nq = grid.0 * grid.1;
        let per_q = nh * levels.len() * np;
        let value = t(rng.vec(nv * ch, 1.0), nv, ch);
        let off = t(rng.vec(nq * per_q * 2, off_scale), nq, per_q * 2);
        let wl = t(rng.vec(nq * per_q, 2.0), nq, per_q);
        let w = c.softmax_groups(&wl, levels.len() * np).unwrap();
        let gy = g
            .msda(&up(&value), &levels, &up(&off), &up(&w), grid, nh, np)
            .unwrap();
        let cy = c.msda(&value, &levels, &off, &w, grid, nh, np).unwrap();
        rep.add(
            format!(
                "msda L={} M={nh} P={np} C={ch} off~{off_scale}",
                levels.len()
            ),
            diff(&down(&gy), &flat(&cy)),
            1e-6,
        );
    }

    // linear: every weight type, both paths, with and without bias
    let types = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4K,
        GgmlType::Q6K,
    ];
    let mut ws = MemWeights::new();
    for ty in types {
        // 4352 columns = 17 steps of 256: the mat-vecs' batches of 4 and their remainder.
        for (out, inp) in [(96usize, 512usize), (33, 256), (64, 4352)] {
            let wv = rng.vec(out * inp, 0.1);
            let bytes = mmfuser_convert::quant::quantize(ty, &wv).unwrap();
            let name = format!("{}.{out}x{inp}", ty.name());
            ws.tensors.insert(name, (ty, vec![out, inp], bytes));
        }
    }
    // A float weight with an odd row length, and one big enough to dequantize in chunks.
    ws.insert_f32("odd", &[33, 100], &rng.vec(3300, 0.1));
    {
        let (out, inp) = (4160usize, 8192usize);
        let wv = rng.vec(out * inp, 0.05);
        let bytes = mmfuser_convert::quant::quantize(GgmlType::Q8_0, &wv).unwrap();
        ws.tensors.insert(
            "Q8_0.chunked".into(),
            (GgmlType::Q8_0, vec![out, inp], bytes),
        );
    }
    let mut names: Vec<String> = ws.tensors.keys().cloned().collect();
    names.sort();
    for name in &names {
        let cw = c.weight(&ws, name).unwrap();
        let gw = g.weight(&ws, name).unwrap();
        let (out, inp) = c.weight_dims(&cw);
        assert_eq!(g.weight_dims(&gw), (out, inp));
        let ty = ws.tensors[name].0;
        let bias = t(rng.vec(out, 0.5), 1, out);
        let gbias = up(&bias);
        let ns: &[usize] = if name == "Q8_0.chunked" {
            &[3, 9]
        } else {
            &[1, 5, 8, 9, 77]
        };
        for (i, &n) in ns.iter().enumerate() {
            let x = t(rng.vec(n * inp, 1.0), n, inp);
            let with_bias = i % 2 == 1;
            let cy = c
                .linear(&x, &cw, if with_bias { Some(&bias) } else { None })
                .unwrap();
            for mode in [GemmMode::Exact, GemmMode::Fast] {
                if n <= 8 && mode == GemmMode::Fast {
                    continue; // mat-vec: no mode
                }
                g.set_gemm_mode(mode);
                let gy = g
                    .linear(&up(&x), &gw, if with_bias { Some(&gbias) } else { None })
                    .unwrap();
                let tol = match (n <= 8, mode, ty) {
                    (true, _, _) => 2e-5,
                    (false, GemmMode::Exact, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16) => {
                        2e-5
                    }
                    // weights dequantized to f16 for the tensor cores: 2^-11 relative each
                    (false, GemmMode::Exact, _) => 3e-3,
                    (false, GemmMode::Fast, GgmlType::BF16) => 2e-2,
                    (false, GemmMode::Fast, _) => 5e-3,
                };
                rep.add(
                    format!(
                        "linear {name} n={n}{} {}",
                        if with_bias { " +bias" } else { "" },
                        if n <= 8 {
                            "matvec".to_string()
                        } else {
                            format!("{mode:?}")
                        }
                    ),
                    diff(&flat(&g.download(&gy).unwrap()), &flat(&cy)),
                    tol,
                );
            }
            g.set_gemm_mode(GemmMode::Exact);
            // One token of Q4_K: 1, 2 or 4 weight rows per warp give the same sums (33 rows
            // leave partial warps).
            if n == 1 && ty == GgmlType::Q4K {
                let b = with_bias.then_some(&gbias);
                let default = g.q4k_rows_per_warp();
                g.set_q4k_rows_per_warp(1);
                let one = flat(&g.download(&g.linear(&up(&x), &gw, b).unwrap()).unwrap());
                for r in [2u8, 4] {
                    g.set_q4k_rows_per_warp(r);
                    let gy = flat(&g.download(&g.linear(&up(&x), &gw, b).unwrap()).unwrap());
                    rep.add(
                        format!("linear {name} n=1 matvec {r} rows/warp vs CPU"),
                        diff(&gy, &flat(&cy)),
                        2e-5,
                    );
                    rep.add(
                        format!("linear {name} n=1 matvec {r} rows/warp vs 1 row/warp"),
                        diff(&gy, &one),
                        1e-6,
                    );
                }
                g.set_q4k_rows_per_warp(default);
            }
        }
    }
    println!("{}", g.memory_report());
    rep.finish("ops");
}

fn run(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(BIN).args(args).output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

/// The fixture converted to F16 GGUFs, plus Q8_0 and Q4_K_M LLMs.
fn artefacts(dir: &Path) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let d = dir.to_str().unwrap();
    let (rc, _, err) = run(&[
        "hf-to-gguf",
        CK,
        "--vision-tower",
        TOWER,
        "--out-dir",
        d,
        "-q",
    ]);
    assert_eq!(rc, 0, "{err}");
    let llm = dir.join("tiny-llava-mmfuser-F16.gguf");
    let mmproj = dir.join("mmproj-tiny-llava-mmfuser-F16.gguf");
    let mut q = vec![];
    for ty in ["Q8_0", "Q4_K_M"] {
        let out = dir.join(format!("q-{ty}.gguf"));
        let (rc, _, err) = run(&[
            "quantize",
            llm.to_str().unwrap(),
            "--type",
            ty,
            "-o",
            out.to_str().unwrap(),
            "-q",
        ]);
        assert_eq!(rc, 0, "{err}");
        q.push(out);
    }
    (llm, mmproj, q[0].clone(), q[1].clone())
}

/// One side of the whole-model comparison, with its bounds per GEMM mode: (largest relative
/// error allowed for every stage, smallest top-1 agreement of the logits).
struct Side {
    label: &'static str,
    ws: Box<dyn WeightSource>,
    exact: (f64, f64),
    fast: (f64, f64),
}

// Fast mode (`GemmMode::Fast`) rounds the activations of every cuBLAS product to one f16 plane
// (bf16 against BF16 weights). Its bounds come from `fast_mode_rounding_on_the_cpu`, which applies
// that rounding on the CPU and prints the figures. On this fixture (2026-12-02) the largest
// relative error of any stage was 6.4e-3 for the source checkpoint (bf16 LLM: activations rounded
// to 2^-9), 9.1e-4 for the F16 GGUF, 1.1e-3 / 1.2e-3 for Q8_0 / Q4_K_M, and top-1 agreement was
// 1.0 on every side. The bounds are about 3x those figures (the GPU adds its own summation order,
// far smaller), never below the Exact bound for the quantized sides (their LLM weights take the
// same f16 path in both modes); the top-1 floors allow one or two flipped positions of 89.
fn sides(llm: &Path, mmproj: &Path, q8: &Path, q4: &Path) -> Vec<Side> {
    let gguf = |l: &Path| -> Box<dyn WeightSource> {
        Box::new(GgufWeights::open(l, mmproj).unwrap_or_else(|e| panic!("{e}")))
    };
    let src = Source::open(Path::new(CK), Some(Path::new(TOWER))).unwrap_or_else(|e| panic!("{e}"));
    vec![
        Side {
            label: "source checkpoint (bf16)",
            ws: Box::new(src),
            exact: (1e-3, 1.0),
            fast: (2e-2, 0.97),
        },
        Side {
            label: "F16 GGUF",
            ws: gguf(llm),
            exact: (1e-3, 1.0),
            fast: (3e-3, 0.98),
        },
        Side {
            label: "Q8_0 GGUF",
            ws: gguf(q8),
            exact: (1e-2, 0.95),
            fast: (1e-2, 0.95),
        },
        Side {
            label: "Q4_K_M GGUF",
            ws: gguf(q4),
            exact: (1e-2, 0.95),
            fast: (1e-2, 0.95),
        },
    ]
}

/// The fixture's probe: pixel values, the image prompt's ids, the text-only ids.
fn probe() -> (Tensor, Vec<i64>, Vec<i64>) {
    let pv = mmfuser_convert::formats::npy::read("fixtures/reference/pixel_values.npy").unwrap();
    let pv = Tensor::from_vec(pv.to_f32().unwrap(), pv.shape.as_slice(), &Device::Cpu).unwrap();
    let ids = |f: &str| -> Vec<i64> {
        serde_json::from_str(&std::fs::read_to_string(f).unwrap()).unwrap()
    };
    (
        pv,
        ids("fixtures/reference/input_ids.json"),
        ids("fixtures/reference/text_only_ids.json"),
    )
}

/// The hyper-parameters of the fixture, with only the CLIP blocks the selected layers need.
fn fixture_hparams(llm: &Path, mmproj: &Path) -> mmfuser_convert::model::hparams::ModelHParams {
    let mut hp = GgufWeights::open(llm, mmproj)
        .and_then(|a| a.hparams())
        .unwrap_or_else(|e| panic!("{e}"));
    hp.clip.n_layer = hp.clip.blocks_needed();
    hp
}

/// Every stage of backend `b` against the CPU backend on one side, into `rep` with bounds
/// (t_rel, t_top).
#[allow(clippy::too_many_arguments)]
fn compare_with_cpu<B: Backend>(
    b: &B,
    tag: &str,
    ws: &dyn WeightSource,
    hp: &mmfuser_convert::model::hparams::ModelHParams,
    (pv, ids, text_ids): &(Tensor, Vec<i64>, Vec<i64>),
    (t_rel, t_top): (f64, f64),
    rep: &mut Report,
) {
    // The CPU on f32 weights: the CUDA backend multiplies dequantized weights by f32
    // activations, not 8-bit ones as CpuBackend does on quantized weights.
    let ci = model::encode_image_with(&CpuF32Linear, ws, hp, pv).unwrap();
    let gi = model::encode_image_with(b, ws, hp, pv).unwrap();
    let cl = model::logits_with(&CpuF32Linear, ws, hp, ids, Some(&ci.image_embeds)).unwrap();
    let gl = model::logits_with(b, ws, hp, ids, Some(&gi.image_embeds)).unwrap();
    let ct = model::logits_with(&CpuF32Linear, ws, hp, text_ids, None).unwrap();
    let gt = model::logits_with(b, ws, hp, text_ids, None).unwrap();
    let vocab = cl.dim(1).unwrap();
    let (cf, gf) = (flat(&cl), flat(&gl));
    let top1 = |a: &[f32], b: &[f32]| {
        assert_eq!(a.len(), b.len(), "{tag}: logits of different sizes");
        let am = |r: &[f32]| {
            r.iter()
                .enumerate()
                .fold((0, f32::MIN), |m, (i, &v)| if v > m.1 { (i, v) } else { m })
                .0
        };
        let rows = a.len() / vocab;
        (0..rows)
            .filter(|&r| am(&a[r * vocab..(r + 1) * vocab]) == am(&b[r * vocab..(r + 1) * vocab]))
            .count() as f64
            / rows as f64
    };
    assert_eq!(
        ci.selected.len(),
        gi.selected.len(),
        "{tag}: selected CLIP layers"
    );
    for (i, (cs, gs)) in ci.selected.iter().zip(&gi.selected).enumerate() {
        rep.add(
            format!("{tag} clip layer {i} rel RMS"),
            rel_rms(&flat(gs), &flat(cs)),
            t_rel,
        );
    }
    assert_eq!(
        ci.fuser_out.is_some(),
        gi.fuser_out.is_some(),
        "{tag}: fuser output"
    );
    if let (Some(a), Some(b)) = (&ci.fuser_out, &gi.fuser_out) {
        rep.add(
            format!("{tag} fuser out rel RMS"),
            rel_rms(&flat(b), &flat(a)),
            t_rel,
        );
    }
    rep.add(
        format!("{tag} image embeds rel RMS"),
        rel_rms(&flat(&gi.image_embeds), &flat(&ci.image_embeds)),
        t_rel,
    );
    rep.add(format!("{tag} logits rel RMS"), rel_rms(&gf, &cf), t_rel);
    rep.add(
        format!("{tag} logits max|diff| / max|logit|"),
        diff(&gf, &cf),
        t_rel,
    );
    rep.add(
        format!("{tag} logits top-1 disagreement"),
        1.0 - top1(&gf, &cf),
        1.0 - t_top,
    );
    rep.add(
        format!("{tag} text-only logits rel RMS"),
        rel_rms(&flat(&gt), &flat(&ct)),
        t_rel,
    );
    rep.add(
        format!("{tag} text-only top-1 disagreement"),
        1.0 - top1(&flat(&gt), &flat(&ct)),
        1.0 - t_top,
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU: run with --ignored there (scripts/gpu_run.sh)"]
fn whole_model_matches_cpu() {
    let g = gpu("whole_model_matches_cpu");
    let dir = tempfile::tempdir().unwrap();
    let (llm, mmproj, q8, q4) = artefacts(dir.path());
    let hp = fixture_hparams(&llm, &mmproj);
    let probe = probe();
    let mut rep = Report::new();
    for side in sides(&llm, &mmproj, &q8, &q4) {
        for (mode, bounds) in [(GemmMode::Exact, side.exact), (GemmMode::Fast, side.fast)] {
            g.set_gemm_mode(mode);
            let tag = format!("{} [{mode:?}]", side.label);
            compare_with_cpu(&g, &tag, side.ws.as_ref(), &hp, &probe, bounds, &mut rep);
            g.clear_weights();
        }
        g.set_gemm_mode(GemmMode::Exact);
    }
    println!("{}", g.memory_report());
    rep.finish("whole model");
}

/// `GemmMode::Fast`'s rounding applied on the CPU (src/cuda/mod.rs, gemm_linear): a product of
/// more than 8 rows (the GPU's cuBLAS path) rounds its activations to f16 (to bf16 against a
/// BF16 weight; F32 weights take f32) and uses a quantized weight dequantized to f16; fewer rows
/// (the mat-vec kernels) and everything else is the CPU backend.
struct FastRounding;

fn rounded(x: &Tensor, dt: candle_core::DType) -> mmfuser_convert::ground::error::Result<Tensor> {
    Ok(x.to_dtype(dt)?.to_dtype(candle_core::DType::F32)?)
}

impl Backend for FastRounding {
    type T = Tensor;
    type W = (Tensor, GgmlType);
    fn name(&self) -> &'static str {
        "cpu with GemmMode::Fast rounding"
    }
    fn upload(&self, x: &Tensor) -> mmfuser_convert::ground::error::Result<Tensor> {
        CpuBackend.upload(x)
    }
    fn download(&self, x: &Tensor) -> mmfuser_convert::ground::error::Result<Tensor> {
        CpuBackend.download(x)
    }
    fn dims(&self, x: &Tensor) -> (usize, usize) {
        CpuBackend.dims(x)
    }
    fn weight(
        &self,
        ws: &dyn WeightSource,
        name: &str,
    ) -> mmfuser_convert::ground::error::Result<Self::W> {
        let ty = ws.raw(name)?.ty;
        Ok((CpuBackend.weight(ws, name)?, ty))
    }
    fn weight_dims(&self, w: &Self::W) -> (usize, usize) {
        CpuBackend.weight_dims(&w.0)
    }
    fn param(
        &self,
        ws: &dyn WeightSource,
        name: &str,
    ) -> mmfuser_convert::ground::error::Result<Tensor> {
        CpuBackend.param(ws, name)
    }
    fn linear(
        &self,
        x: &Tensor,
        w: &Self::W,
        bias: Option<&Tensor>,
    ) -> mmfuser_convert::ground::error::Result<Tensor> {
        use candle_core::DType;
        if CpuBackend.dims(x).0 <= 8 || w.1 == GgmlType::F32 {
            return CpuBackend.linear(x, &w.0, bias);
        }
        let (xr, wr) = match w.1 {
            GgmlType::BF16 => (rounded(x, DType::BF16)?, w.0.clone()),
            GgmlType::F16 => (rounded(x, DType::F16)?, w.0.clone()),
            _ => (rounded(x, DType::F16)?, rounded(&w.0, DType::F16)?),
        };
        CpuBackend.linear(&xr, &wr, bias)
    }
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        n_head: usize,
        n_head_kv: usize,
        causal: bool,
    ) -> mmfuser_convert::ground::error::Result<Tensor> {
        CpuBackend.attention(q, k, v, n_head, n_head_kv, causal)
    }
    fn layer_norm(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        eps: f32,
    ) -> mmfuser_convert::ground::error::Result<Tensor> {
        CpuBackend.layer_norm(x, w, b, eps)
    }
    fn rms_norm(
        &self,
        x: &Tensor,
        w: &Tensor,
        eps: f32,
    ) -> mmfuser_convert::ground::error::Result<Tensor> {
        CpuBackend.rms_norm(x, w, eps)
    }
    fn softmax_groups(
        &self,
        x: &Tensor,
        group: usize,
    ) -> mmfuser_convert::ground::error::Result<Tensor> {
        CpuBackend.softmax_groups(x, group)
    }
    fn add(&self, a: &Tensor, b: &Tensor) -> mmfuser_convert::ground::error::Result<Tensor> {
        CpuBackend.add(a, b)
    }
    fn mul(&self, a: &Tensor, b: &Tensor) -> mmfuser_convert::ground::error::Result<Tensor> {
        CpuBackend.mul(a, b)
    }
    fn quick_gelu(&self, x: &Tensor) -> mmfuser_convert::ground::error::Result<Tensor> {
        CpuBackend.quick_gelu(x)
    }
    fn gelu_erf(&self, x: &Tensor) -> mmfuser_convert::ground::error::Result<Tensor> {
        CpuBackend.gelu_erf(x)
    }
    fn silu_mul(
        &self,
        gate: &Tensor,
        up: &Tensor,
    ) -> mmfuser_convert::ground::error::Result<Tensor> {
        CpuBackend.silu_mul(gate, up)
    }
    fn rope_interleaved(
        &self,
        x: &Tensor,
        n_head: usize,
        pos0: usize,
        theta: f32,
    ) -> mmfuser_convert::ground::error::Result<Tensor> {
        CpuBackend.rope_interleaved(x, n_head, pos0, theta)
    }
    fn rope_neox(
        &self,
        x: &Tensor,
        n_head: usize,
        pos0: usize,
        theta: f32,
    ) -> mmfuser_convert::ground::error::Result<Tensor> {
        CpuBackend.rope_neox(x, n_head, pos0, theta)
    }
    fn msda(
        &self,
        value: &Tensor,
        levels: &[(usize, usize)],
        offsets: &Tensor,
        weights: &Tensor,
        ref_grid: (usize, usize),
        n_heads: usize,
        n_points: usize,
    ) -> mmfuser_convert::ground::error::Result<Tensor> {
        CpuBackend.msda(value, levels, offsets, weights, ref_grid, n_heads, n_points)
    }
    fn rows(
        &self,
        x: &Tensor,
        start: usize,
        len: usize,
    ) -> mmfuser_convert::ground::error::Result<Tensor> {
        CpuBackend.rows(x, start, len)
    }
    fn concat_rows(&self, xs: &[&Tensor]) -> mmfuser_convert::ground::error::Result<Tensor> {
        CpuBackend.concat_rows(xs)
    }
}

/// Runs without a GPU (in CI): the Fast-mode bounds of `sides` against the error that Fast mode's
/// rounding alone causes. Its figures are where those bounds come from; a model or fixture change
/// that makes them exceed a bound fails here first.
#[test]
fn fast_mode_rounding_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let (llm, mmproj, q8, q4) = artefacts(dir.path());
    let hp = fixture_hparams(&llm, &mmproj);
    let probe = probe();
    let mut rep = Report::new();
    let mut largest = vec![];
    for side in sides(&llm, &mmproj, &q8, &q4) {
        let tag = format!("{} [Fast rounding, CPU]", side.label);
        let before = rep.rows.len();
        compare_with_cpu(
            &FastRounding,
            &tag,
            side.ws.as_ref(),
            &hp,
            &probe,
            side.fast,
            &mut rep,
        );
        let rows = &rep.rows[before..];
        let worst = rows
            .iter()
            .filter(|r| !r.0.contains("top-1"))
            .fold(0f64, |m, r| m.max(r.1));
        // Rounding must show: a comparison that measured nothing would pass any bound.
        assert!(
            worst > 0.0,
            "{tag}: no difference at all from the CPU backend"
        );
        largest.push(format!(
            "{}: {worst:.2e} (bound {:.0e})",
            side.label, side.fast.0
        ));
    }
    println!("largest relative error per side: {}", largest.join("; "));
    rep.finish("Fast-mode rounding on the CPU");
}

#[test]
#[ignore = "needs an NVIDIA GPU: run with --ignored there (scripts/gpu_run.sh)"]
fn verify_on_cuda_passes_and_fails_where_cpu_does() {
    let g = gpu("verify_on_cuda_passes_and_fails_where_cpu_does");
    drop(g);
    let dir = tempfile::tempdir().unwrap();
    let (llm, mmproj, q8, q4) = artefacts(dir.path());
    let broken = sabotage::sabotaged_artefacts(dir.path(), &llm, &mmproj);
    let flipped = dir
        .path()
        .join("flipped")
        .join("tiny-llava-mmfuser-F16.gguf");
    std::fs::create_dir_all(flipped.parent().unwrap()).unwrap();
    for f in [
        "tiny-llava-mmfuser-F16.gguf",
        "tiny-llava-mmfuser-F16.manifest.json",
    ] {
        std::fs::copy(dir.path().join(f), flipped.parent().unwrap().join(f)).unwrap();
    }
    let mut bytes = std::fs::read(&flipped).unwrap();
    let n = bytes.len();
    bytes[n - 1000] ^= 0x01;
    std::fs::write(&flipped, &bytes).unwrap();

    let mut cases: Vec<(&str, &PathBuf, &PathBuf, bool)> = vec![
        ("good F16", &llm, &mmproj, true),
        ("good Q8_0", &q8, &mmproj, true),
        ("good Q4_K_M", &q4, &mmproj, true),
    ];
    cases.extend(broken.iter().map(|(w, l, m)| (*w, l, m, false)));
    cases.push(("flipped bit (sha256)", &flipped, &mmproj, false));
    println!(
        "  {:<22} {:>4} {:>4}  {:>11} {:>11}  {:>8} {:>8}",
        "case", "cpu", "cuda", "KL cpu", "KL cuda", "s cpu", "s cuda"
    );
    let mut mismatches = vec![];
    for (what, l, m, want_pass) in cases {
        let mut res = vec![];
        for dev in ["cpu", "cuda"] {
            let (rc, out, err) = run(&[
                "verify",
                CK,
                "--vision-tower",
                TOWER,
                "--gguf",
                l.to_str().unwrap(),
                "--mmproj",
                m.to_str().unwrap(),
                "--json",
                "--device",
                dev,
            ]);
            let v: serde_json::Value = serde_json::from_str(&out)
                .unwrap_or_else(|_| panic!("{what} on {dev}: rc {rc}, no report: {err}"));
            assert_eq!(v["device"], dev, "{what}");
            res.push((rc, v));
        }
        let kl = |v: &serde_json::Value| {
            v["quality_logits"]["kl"]["kl_mean"]
                .as_f64()
                .unwrap_or(f64::NAN)
        };
        let secs = |v: &serde_json::Value| v["seconds"].as_f64().unwrap_or(f64::NAN);
        println!(
            "  {:<22} {:>4} {:>4}  {:>11.3e} {:>11.3e}  {:>8.3} {:>8.3}",
            what,
            res[0].0,
            res[1].0,
            kl(&res[0].1),
            kl(&res[1].1),
            secs(&res[0].1),
            secs(&res[1].1)
        );
        let want_rc = if want_pass { 0 } else { 1 };
        if res[0].0 != want_rc || res[1].0 != want_rc || res[0].1["passed"] != res[1].1["passed"] {
            mismatches.push(what);
        }
        // Same verdict and KL of the same size on both devices.
        let (a, b) = (kl(&res[0].1), kl(&res[1].1));
        if (a - b).abs() > 0.05 * a.abs() + 1e-7 {
            mismatches.push(what);
        }
    }
    assert!(
        mismatches.is_empty(),
        "cpu and cuda disagree on: {mismatches:?}"
    );
}
