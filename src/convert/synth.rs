//! Synthetic LLaVA-MMFuser checkpoints at real scale (issue "Real scale"), for benchmarks and
//! scale tests: `mmfuser-convert synth --size 7b|13b|tiny OUT_DIR [--seed N] [--llama-view]`.
//!
//! Writes, with the names and shapes of `../shared/spec/llava-mmfuser.md` sections 1, 2 and 4:
//! - `OUT_DIR/checkpoint/`: config.json (`llava_llama`, `mm_vision_select_layer`
//!   `"list-22/-17/-12/-7/-2"`, `mlp2x_gelu`), bf16 safetensors shards (7B: 3, 13B: 6, tiny: 2) +
//!   `model.safetensors.index.json` with the MMFuser fuser (C, M = 16, L = 4, P = 4; `gamma1`/`gamma2`
//!   in the LAST shard) and the MLP projector, a SentencePiece `tokenizer.model` written here
//!   (BPE, byte fallback, `<unk>`/`<s>`/`</s>`, 256 byte pieces, then NORMAL pieces), and the
//!   tokenizer_config.json / special_tokens_map.json.
//! - `OUT_DIR/clip/`: a `CLIPVisionModel` directory (ViT-L/14-336 for 7B/13B: 24 layers, C 1024,
//!   FFN 4096, 16 heads, image 336, patch 14, quick_gelu), f16 `model.safetensors`.
//! - with `--llama-view`, `OUT_DIR/llama/`: a plain `LlamaForCausalLM` directory with the same LLM
//!   tensors (same values: every value depends only on the seed, the tensor name and its index)
//!   and the same tokenizer, for llama.cpp's `convert_hf_to_gguf.py`.
//!
//! Values: seeded, finite, "realistic" scale: linear weights ~ N(0, 0.02) (the normal's 65536
//! quantiles, so bounded by +-4.32 sigma), norm weights ~ 1 + N(0, 0.05), biases ~ N(0, 0.02),
//! gammas uniform in [0.3, 0.7]. Values are generated in parallel (rayon) straight into the
//! page-aligned buffers of `ground::sink`, which writes them with direct I/O while the next buffer
//! fills: memory stays at four 8 MiB buffers whatever the model size, and the disk sets the pace.
use crate::convert::recipe::{self, ArtefactKind, PlanRow, Vars};
use crate::convert::source::shape_vars;
use crate::ground::error::{Error, IoContext, Result};
use crate::ground::fsutil::{write_error, AtomicFile};
use crate::ground::progress::Progress;
use crate::ground::sink::Sink;
use crate::model::hparams::{
    ClipHParams, FuserHParams, LlamaHParams, ModelHParams, ProjectorHParams,
};
use half::{bf16, f16};
use rayon::prelude::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SynthSize {
    /// 2 layers, H 256, vocab 512, CLIP C 64 (24 layers): a few MB, for tests.
    Tiny,
    /// Vicuna-7B-v1.5 + CLIP ViT-L/14-336 (about 13.5 GiB + 0.6 GiB).
    #[value(name = "7b")]
    B7,
    /// Vicuna-13B-v1.5 + CLIP ViT-L/14-336 (about 25 GiB + 0.6 GiB).
    #[value(name = "13b")]
    B13,
}

/// Hyper-parameters of one synthetic model.
#[derive(Clone, Debug)]
pub struct Dims {
    pub layers: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    pub shards: usize,
    pub max_pos: usize,
    pub clip_layers: usize,
    pub clip_c: usize,
    pub clip_ff: usize,
    pub clip_heads: usize,
    pub clip_image: usize,
    pub clip_patch: usize,
    pub clip_proj: usize,
    pub fuser_m: usize,
    pub fuser_l: usize,
    pub fuser_p: usize,
    pub hub_id: &'static str,
    pub name: &'static str,
}

impl SynthSize {
    pub fn dims(self) -> Dims {
        let clip_l = |d: Dims| Dims {
            clip_layers: 24,
            clip_c: 1024,
            clip_ff: 4096,
            clip_heads: 16,
            clip_image: 336,
            clip_patch: 14,
            clip_proj: 768,
            hub_id: "openai/clip-vit-large-patch14-336",
            ..d
        };
        let base = Dims {
            layers: 2,
            hidden: 256,
            ffn: 512,
            heads: 4,
            kv_heads: 4,
            vocab: 512,
            shards: 2,
            max_pos: 4096,
            clip_layers: 24,
            clip_c: 64,
            clip_ff: 128,
            clip_heads: 4,
            clip_image: 56,
            clip_patch: 14,
            clip_proj: 32,
            fuser_m: 16,
            fuser_l: 4,
            fuser_p: 4,
            hub_id: "synthetic/tiny-clip-vit-56",
            name: "synth-llava-mmfuser-tiny",
        };
        match self {
            SynthSize::Tiny => base,
            SynthSize::B7 => clip_l(Dims {
                layers: 32,
                hidden: 4096,
                ffn: 11008,
                heads: 32,
                kv_heads: 32,
                vocab: 32000,
                shards: 3,
                name: "synth-llava-mmfuser-7b",
                ..base
            }),
            SynthSize::B13 => clip_l(Dims {
                layers: 40,
                hidden: 5120,
                ffn: 13824,
                heads: 40,
                kv_heads: 40,
                vocab: 32000,
                shards: 6,
                name: "synth-llava-mmfuser-13b",
                ..base
            }),
        }
    }
}

/// How a tensor's values are drawn.
#[derive(Clone, Copy, Debug)]
pub enum Init {
    /// mean + std * (approximately standard normal).
    Normal { mean: f32, std: f32 },
    /// Uniform in [lo, hi).
    Uniform { lo: f32, hi: f32 },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    Bf16,
    F16,
}

impl Dtype {
    fn st_name(self) -> &'static str {
        match self {
            Dtype::Bf16 => "BF16",
            Dtype::F16 => "F16",
        }
    }
}

#[derive(Clone, Debug)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

impl TensorSpec {
    fn new(name: impl Into<String>, shape: &[usize], init: Init) -> Self {
        TensorSpec {
            name: name.into(),
            shape: shape.to_vec(),
            init,
        }
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

const W: Init = Init::Normal {
    mean: 0.0,
    std: 0.02,
};
const B: Init = Init::Normal {
    mean: 0.0,
    std: 0.02,
};
const NORM: Init = Init::Normal {
    mean: 1.0,
    std: 0.05,
};
const LN_B: Init = Init::Normal {
    mean: 0.0,
    std: 0.05,
};

/// How a tensor's values are drawn, from what its name says it is (norm scales near 1, the class
/// embedding at CLIP's init scale, the fuser's offset biases spread over a sampling cell, gammas
/// as trained, everything else small).
fn init_for(name: &str, shape: &[usize]) -> Init {
    let leaf = name.rsplit('.').next().unwrap_or(name);
    if leaf.starts_with("gamma") {
        Init::Uniform { lo: 0.3, hi: 0.7 }
    } else if name.ends_with("class_embedding") {
        Init::Normal {
            mean: 0.0,
            std: (shape[0] as f32).powf(-0.5),
        }
    } else if name.ends_with("sampling_offsets.bias") {
        Init::Normal {
            mean: 0.0,
            std: 1.0,
        }
    } else if name.contains("norm") {
        if leaf == "bias" {
            LN_B
        } else {
            NORM
        }
    } else if leaf == "bias" {
        B
    } else {
        W
    }
}

/// The recipe the synthetic checkpoint is laid out for (its name maps give every name and shape).
const RECIPE: &str = "llava-mmfuser";
/// The tower's names as a CLIPVisionModel saved before transformers 5 spells them (an alias the
/// clip-vision name map reads), so that a synthetic run also exercises the aliases.
const TOWER_PREFIX: &str = "vision_model.";

/// The model `d` describes, as far as shapes go; the tower file keeps all its layers.
fn hparams_of(d: &Dims) -> ModelHParams {
    ModelHParams {
        llama: LlamaHParams {
            n_layer: d.layers,
            n_embd: d.hidden,
            n_ff: d.ffn,
            n_head: d.heads,
            n_head_kv: d.kv_heads,
            n_vocab: d.vocab,
            n_ctx: d.max_pos,
            ..Default::default()
        },
        clip: ClipHParams {
            image_size: d.clip_image,
            patch_size: d.clip_patch,
            n_embd: d.clip_c,
            n_ff: d.clip_ff,
            n_head: d.clip_heads,
            n_layer: d.clip_layers,
            feature_layers: vec![d.clip_layers],
            ..Default::default()
        },
        projector: ProjectorHParams::MmFuser(FuserHParams {
            n_heads: d.fuser_m,
            n_levels: d.fuser_l,
            n_points: d.fuser_p,
            eps: 1e-6,
        }),
    }
}

/// A name's chunks of digits and non-digits, digits compared as numbers ("layers.2" < "layers.10").
fn natural_key(name: &str) -> Vec<(u64, String)> {
    let mut out: Vec<(u64, String)> = vec![];
    let mut text = String::new();
    let mut num: Option<u64> = None;
    for ch in name.chars() {
        match (ch.to_digit(10), num) {
            (Some(dg), Some(n)) => num = Some(n.saturating_mul(10).saturating_add(dg as u64)),
            (Some(dg), None) => {
                out.push((0, std::mem::take(&mut text)));
                num = Some(dg as u64);
            }
            (None, Some(n)) => {
                out.push((n, String::new()));
                num = None;
                text.push(ch);
            }
            (None, None) => text.push(ch),
        }
    }
    if let Some(n) = num {
        out.push((n, String::new()));
    }
    out.push((0, text));
    out
}

/// One component's rows from its name map (converters/ + schemas/names/), under `prefix`.
fn component_rows(component: &str, prefix: &str, d: &Dims) -> Result<Vec<PlanRow>> {
    let map = recipe::name_map(component)?;
    let mut vars = Vars::default();
    shape_vars(&hparams_of(d), &mut vars);
    Ok(recipe::expand(&map, prefix, &vars)?.0)
}

fn spec(r: &PlanRow) -> TensorSpec {
    TensorSpec::new(&r.src, &r.shape, init_for(&r.src, &r.shape))
}

/// The tensors of the recipe's `kind` artefact that the checkpoint holds (the tower has a
/// directory of its own), where the recipe puts them, each component in its name map's order.
fn checkpoint_tensors(kind: ArtefactKind, d: &Dims) -> Result<Vec<TensorSpec>> {
    let r = recipe::recipe(RECIPE)?;
    let mut v = vec![];
    for art in r.artefacts.iter().filter(|a| a.kind == kind) {
        for c in art
            .components
            .iter()
            .filter(|c| *c != recipe::TOWER_COMPONENT)
        {
            let map = recipe::name_map(c)?;
            v.extend(component_rows(c, r.prefix(&map), d)?.iter().map(spec));
        }
    }
    Ok(v)
}

/// The LLM tensors (HF names) in the order real shards hold them: the decoder (`model.*`) in
/// natural name order, then the head.
pub fn llm_tensors(d: &Dims) -> Result<Vec<TensorSpec>> {
    let mut v = checkpoint_tensors(ArtefactKind::Llm, d)?;
    v.sort_by_cached_key(|t| (!t.name.starts_with("model."), natural_key(&t.name)));
    Ok(v)
}

/// The projector tensors (fuser and MLP), in the name map's order.
pub fn projector_tensors(d: &Dims) -> Result<Vec<TensorSpec>> {
    checkpoint_tensors(ArtefactKind::Mmproj, d)
}

/// The CLIP vision tower (every layer, not just those the converter keeps), layer by layer in the
/// name map's order, with the final `post_layernorm` a CLIPVisionModel has (the converter drops
/// it: schemas/names/clip-vision.json `drop`).
pub fn clip_tensors(d: &Dims) -> Result<Vec<TensorSpec>> {
    let mut rows = component_rows(recipe::TOWER_COMPONENT, TOWER_PREFIX, d)?;
    // expand() lists a per-layer rule for every layer before the next rule; a file holds layers.
    rows.sort_by_key(|r| r.layer.map_or(0, |l| l + 1));
    let mut v: Vec<TensorSpec> = rows.iter().map(spec).collect();
    for leaf in ["weight", "bias"] {
        let name = format!("{TOWER_PREFIX}post_layernorm.{leaf}");
        let init = init_for(&name, &[d.clip_c]);
        v.push(TensorSpec::new(name, &[d.clip_c], init));
    }
    Ok(v)
}

// ---------------------------------------------------------------------------------------------
// Values
//
// Every value is a pure function of (seed, tensor name, element index), so a tensor reads the same
// whatever the buffer boundaries, the thread count or the file it lands in (the llama view). One
// 64-bit hash of (tensor key, index / 4) gives four 16-bit lanes; each lane indexes a 65536-entry
// table of the tensor's distribution, already in the output dtype: a hash and four table loads per
// four values, fast enough that the disk, not the generator, sets synth's speed.

/// Values drawn per 64-bit hash (16-bit table indices).
const LANES: usize = 4;
/// Entries in a quantile table: one per 16-bit index.
const TABLE: usize = 1 << 16;
/// Elements per parallel piece of a fill (a multiple of LANES).
const PIECE: usize = 1 << 16;

/// The splitmix64 finaliser: a well-mixed 64-bit hash of `z`.
#[inline]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Word `w` of a tensor's random stream (counter-based: any word is computed directly).
#[inline]
fn word(key: u64, w: u64) -> u64 {
    mix64(key.wrapping_add(w.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15)))
}

fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The stream key of tensor `name` under `seed`.
fn tensor_key(seed: u64, name: &str) -> u64 {
    mix64(seed ^ fnv1a(name))
}

/// Standard normal quantile: the x with Phi(x) = p, by bisection on Phi = erfc(-x / sqrt 2) / 2.
fn probit(p: f64) -> f64 {
    let (mut lo, mut hi) = (-12.0f64, 12.0f64);
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if 0.5 * libm::erfc(-mid * std::f64::consts::FRAC_1_SQRT_2) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// Quantiles of N(0, 1) at (k + 0.5) / 65536 (|x| <= 4.32), computed once per process.
fn normal_quantiles() -> &'static [f32] {
    static Q: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    Q.get_or_init(|| {
        let half: Vec<f64> = (0..TABLE / 2)
            .map(|k| probit((k as f64 + 0.5) / TABLE as f64))
            .collect();
        // Symmetric by construction: the upper half mirrors the lower one.
        let mut q: Vec<f32> = half.iter().map(|&x| x as f32).collect();
        q.extend(half.iter().rev().map(|&x| -x as f32));
        q
    })
}

/// The 65536 values a tensor draws from, as output-dtype bits: its distribution's quantiles at
/// (k + 0.5) / 65536, so a uniform 16-bit index samples the distribution.
fn value_table(init: Init, dtype: Dtype) -> Vec<u16> {
    let to_bits = |v: f32| match dtype {
        Dtype::Bf16 => bf16::from_f32(v).to_bits(),
        Dtype::F16 => f16::from_f32(v).to_bits(),
    };
    match init {
        Init::Normal { mean, std } => normal_quantiles()
            .iter()
            .map(|&z| to_bits(mean + std * z))
            .collect(),
        Init::Uniform { lo, hi } => (0..TABLE)
            .map(|k| to_bits(lo + (hi - lo) * ((k as f32 + 0.5) / TABLE as f32)))
            .collect(),
    }
}

/// Fill `out` (2-byte little-endian elements) with elements `first..` of the stream `key` drawn
/// from `table`, in parallel pieces.
fn fill(table: &[u16], key: u64, first: usize, out: &mut [u8]) {
    debug_assert!(table.len() == TABLE && out.len().is_multiple_of(2));
    // The first piece ends where the element index reaches a multiple of PIECE, so every later
    // piece starts on a hash-word boundary.
    let head = ((PIECE - first % PIECE) % PIECE).min(out.len() / 2);
    let (a, b) = out.split_at_mut(head * 2);
    fill_serial(table, key, first, a);
    b.par_chunks_mut(PIECE * 2)
        .enumerate()
        .for_each(|(i, piece)| fill_serial(table, key, first + head + i * PIECE, piece));
}

fn fill_serial(table: &[u16], key: u64, first: usize, out: &mut [u8]) {
    // A start inside a hash word takes the rest of that word's lanes; later words start at lane 0.
    let lead = ((LANES - first % LANES) % LANES).min(out.len() / 2);
    let (head, body) = out.split_at_mut(2 * lead);
    if lead > 0 {
        put_lanes(
            table,
            word(key, (first / LANES) as u64),
            first % LANES,
            head,
        );
    }
    let w0 = (first + lead) / LANES;
    for (j, e) in body.chunks_mut(2 * LANES).enumerate() {
        put_lanes(table, word(key, (w0 + j) as u64), 0, e);
    }
}

/// Lanes `from..` of hash word `r`, as table values, into `out` (one 2-byte element per lane).
#[inline]
fn put_lanes(table: &[u16], r: u64, from: usize, out: &mut [u8]) {
    for (l, x) in (from..LANES).zip(out.chunks_exact_mut(2)) {
        x.copy_from_slice(&table[(r >> (16 * l)) as usize & 0xFFFF].to_le_bytes());
    }
}

/// Write one safetensors file: the header, then every tensor's values generated straight into
/// the output sink's page-aligned buffers (see `ground::sink`: direct I/O, buffers recycled,
/// generation overlapping the write of the previous buffer). Returns the bytes written.
pub fn write_safetensors(
    path: &Path,
    tensors: &[TensorSpec],
    dtype: Dtype,
    seed: u64,
) -> Result<u64> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut off = 0usize;
    for t in tensors {
        let n = t.numel() * 2;
        header.insert(
            t.name.clone(),
            json!({"dtype": dtype.st_name(), "shape": t.shape, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    let mut hbytes =
        serde_json::to_vec(&Value::Object(header)).map_err(|e| Error::other(e.to_string()))?;
    while hbytes.len() % 8 != 0 {
        hbytes.push(b' ');
    }
    let file = AtomicFile::create(path)?;
    let tmp = file.temp_path().to_path_buf();
    let mut sink = Sink::unhashed(file);
    let ok = sink.put(&(hbytes.len() as u64).to_le_bytes())
        && sink.put(&hbytes)
        && tensors
            .iter()
            .all(|t| put_tensor(&mut sink, t, dtype, seed));
    let end = sink.join();
    let file = match (end.error, end.file) {
        (None, Some(f)) if ok => f,
        (e, _) => {
            let e = e.unwrap_or_else(|| std::io::Error::other("writer thread failed"));
            return Err(write_error(path, &tmp, e));
        }
    };
    file.commit()?;
    Ok((8 + hbytes.len() + off) as u64)
}

/// Generate tensor `t` into the sink's buffers. False once the sink failed.
fn put_tensor(sink: &mut Sink, t: &TensorSpec, dtype: Dtype, seed: u64) -> bool {
    let table = value_table(t.init, dtype);
    let key = tensor_key(seed, &t.name);
    let Ok(ok) = sink.put_with(t.numel() * 2, 2, |off, dst| {
        fill(&table, key, off / 2, dst);
        Ok::<(), std::convert::Infallible>(())
    });
    ok
}

/// Split `tensors` (in order) into `shards` consecutive groups of about equal bytes; the last
/// tensors always land in the last shard.
fn split_shards(tensors: &[TensorSpec], shards: usize) -> Vec<Vec<TensorSpec>> {
    let total: usize = tensors.iter().map(|t| t.numel()).sum();
    let mut out: Vec<Vec<TensorSpec>> = vec![Vec::new(); shards];
    let mut cum = 0usize;
    for t in tensors {
        let mid = cum + t.numel() / 2;
        let k = ((mid as u128 * shards as u128) / total.max(1) as u128) as usize;
        out[k.min(shards - 1)].push(t.clone());
        cum += t.numel();
    }
    out.retain(|s| !s.is_empty());
    out
}

/// Write `tensors` as `model-0000K-of-0000N.safetensors` + `model.safetensors.index.json` in `dir`.
fn write_sharded(
    dir: &Path,
    tensors: &[TensorSpec],
    shards: usize,
    seed: u64,
    progress: &dyn Progress,
) -> Result<u64> {
    let groups = split_shards(tensors, shards);
    let n = groups.len();
    let mut map = BTreeMap::new();
    let mut total = 0u64;
    let mut bytes = 0u64;
    for (k, g) in groups.iter().enumerate() {
        let fname = format!("model-{:05}-of-{:05}.safetensors", k + 1, n);
        let t0 = Instant::now();
        let b = write_safetensors(&dir.join(&fname), g, Dtype::Bf16, seed)?;
        let s = t0.elapsed().as_secs_f64();
        progress.note(&format!(
            "  {}: {} tensors, {:.2} GB in {:.1} s ({:.2} GB/s)",
            dir.join(&fname).display(),
            g.len(),
            b as f64 / 1e9,
            s,
            b as f64 / 1e9 / s.max(1e-9)
        ));
        bytes += b;
        for t in g {
            map.insert(t.name.clone(), fname.clone());
            total += (t.numel() * 2) as u64;
        }
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": map});
    write_json(&dir.join("model.safetensors.index.json"), &index)?;
    Ok(bytes)
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v).map_err(|e| Error::other(e.to_string()))?;
    s.push('\n');
    std::fs::write(path, s).at(path)
}

// ---------------------------------------------------------------------------------------------
// Tokenizer (a SentencePiece ModelProto written by hand)

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}
fn put_key(out: &mut Vec<u8>, field: u32, wire: u8) {
    put_varint(out, ((field as u64) << 3) | wire as u64);
}
fn put_len(out: &mut Vec<u8>, field: u32, body: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, body.len() as u64);
    out.extend_from_slice(body);
}
fn put_int(out: &mut Vec<u8>, field: u32, v: i64) {
    put_key(out, field, 0);
    put_varint(out, v as u64); // negative int32 -> 10-byte two's complement, as protobuf does
}

/// A LLaMA-style SentencePiece BPE model with `vocab` pieces: `<unk>` (UNKNOWN), `<s>`, `</s>`
/// (CONTROL), `<0x00>`..`<0xFF>` (BYTE), then NORMAL pieces (`▁`, printable ASCII characters,
/// `▁tok{i}`) with descending scores; byte fallback on, identity normaliser, dummy prefix.
pub fn tokenizer_model(vocab: usize) -> Vec<u8> {
    let mut pieces: Vec<(String, f32, i32)> = vec![
        ("<unk>".into(), 0.0, 2),
        ("<s>".into(), 0.0, 3),
        ("</s>".into(), 0.0, 3),
    ];
    for b in 0..256 {
        pieces.push((format!("<0x{b:02X}>"), 0.0, 6));
    }
    let mut normal: Vec<String> = vec!["\u{2581}".into()];
    normal.extend((0x21u8..0x7f).map(|c| (c as char).to_string()));
    let mut i = 0usize;
    while pieces.len() + normal.len() < vocab {
        normal.push(format!("\u{2581}tok{i}"));
        i += 1;
    }
    normal.truncate(vocab.saturating_sub(pieces.len()));
    for (k, p) in normal.into_iter().enumerate() {
        pieces.push((p, -(k as f32), 1));
    }
    let mut out = Vec::new();
    for (p, score, kind) in &pieces {
        let mut body = Vec::new();
        put_len(&mut body, 1, p.as_bytes());
        put_key(&mut body, 2, 5);
        body.extend_from_slice(&score.to_le_bytes());
        if *kind != 1 {
            put_int(&mut body, 3, *kind as i64);
        }
        put_len(&mut out, 1, &body);
    }
    let mut ts = Vec::new();
    put_int(&mut ts, 3, 2); // model_type BPE
    put_int(&mut ts, 4, vocab as i64); // vocab_size
    put_int(&mut ts, 25, 1); // split_digits
    put_int(&mut ts, 35, 1); // byte_fallback
    put_int(&mut ts, 40, 0); // unk_id
    put_int(&mut ts, 41, 1); // bos_id
    put_int(&mut ts, 42, 2); // eos_id
    put_int(&mut ts, 43, -1); // pad_id
    put_len(&mut out, 2, &ts);
    let mut ns = Vec::new();
    put_len(&mut ns, 1, b"identity");
    put_int(&mut ns, 3, 1); // add_dummy_prefix
    put_int(&mut ns, 4, 0); // remove_extra_whitespaces
    put_int(&mut ns, 5, 1); // escape_whitespaces
    put_len(&mut out, 3, &ns);
    out
}

fn write_tokenizer(dir: &Path, vocab: usize) -> Result<()> {
    let p = dir.join("tokenizer.model");
    std::fs::write(&p, tokenizer_model(vocab)).at(&p)?;
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({
            "add_bos_token": true, "add_eos_token": false, "bos_token": "<s>",
            "clean_up_tokenization_spaces": false, "eos_token": "</s>", "legacy": false,
            "model_max_length": 4096, "pad_token": "<unk>", "padding_side": "right",
            "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>",
            "use_default_system_prompt": false
        }),
    )?;
    write_json(
        &dir.join("special_tokens_map.json"),
        &json!({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>"}),
    )
}

fn llama_config(d: &Dims) -> serde_json::Map<String, Value> {
    let v = json!({
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": false, "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
        "hidden_act": "silu", "hidden_size": d.hidden, "initializer_range": 0.02,
        "intermediate_size": d.ffn, "max_position_embeddings": d.max_pos, "model_type": "llama",
        "num_attention_heads": d.heads, "num_hidden_layers": d.layers, "num_key_value_heads": d.kv_heads,
        "pad_token_id": 0, "pretraining_tp": 1, "rms_norm_eps": 1e-5, "rope_scaling": null,
        "rope_theta": 10000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16",
        "use_cache": true, "vocab_size": d.vocab
    });
    match v {
        Value::Object(m) => m,
        _ => unreachable!(),
    }
}

fn llava_config(d: &Dims) -> Value {
    let mut m = llama_config(d);
    m.insert(
        "_name_or_path".into(),
        json!(format!("synthetic/{}", d.name)),
    );
    m.insert("architectures".into(), json!(["LlavaLlamaForCausalLM"]));
    m.insert("model_type".into(), json!("llava_llama"));
    for (k, v) in [
        ("freeze_mm_mlp_adapter", json!(false)),
        ("image_aspect_ratio", json!("pad")),
        ("mm_hidden_size", json!(d.clip_c)),
        ("mm_patch_merge_type", json!("flat")),
        ("mm_projector_lr", Value::Null),
        ("mm_projector_type", json!("mlp2x_gelu")),
        ("mm_use_im_patch_token", json!(false)),
        ("mm_use_im_start_end", json!(false)),
        ("mm_vision_select_feature", json!("patch")),
        ("mm_vision_select_layer", json!("list-22/-17/-12/-7/-2")),
        ("mm_vision_tower", json!(d.hub_id)),
        ("tune_mm_mlp_adapter", json!(false)),
        ("tune_mm_vision_resampler", json!(false)),
        ("unfreeze_mm_vision_tower", json!(false)),
        ("use_mm_proj", json!(true)),
    ] {
        m.insert(k.into(), v);
    }
    let sorted: BTreeMap<String, Value> = m.into_iter().collect();
    json!(sorted)
}

fn clip_config(d: &Dims) -> Value {
    json!({
        "architectures": ["CLIPVisionModel"], "attention_dropout": 0.0, "dropout": 0.0,
        "hidden_act": "quick_gelu", "hidden_size": d.clip_c, "image_size": d.clip_image,
        "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": d.clip_ff,
        "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": d.clip_heads,
        "num_channels": 3, "num_hidden_layers": d.clip_layers, "patch_size": d.clip_patch,
        "projection_dim": d.clip_proj, "torch_dtype": "float16"
    })
}

fn preprocessor_config(d: &Dims) -> Value {
    json!({
        "crop_size": {"height": d.clip_image, "width": d.clip_image}, "do_center_crop": true,
        "do_convert_rgb": true, "do_normalize": true, "do_rescale": true, "do_resize": true,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3,
        "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": d.clip_image}
    })
}

// ---------------------------------------------------------------------------------------------

pub struct SynthOptions {
    pub size: SynthSize,
    pub out_dir: PathBuf,
    pub seed: u64,
    pub llama_view: bool,
}

#[derive(Debug, serde::Serialize)]
pub struct SynthSummary {
    pub checkpoint: PathBuf,
    pub clip: PathBuf,
    pub llama: Option<PathBuf>,
    pub parameters: u64,
    pub bytes_written: u64,
    pub seconds: f64,
}

fn fresh_dir(p: &Path) -> Result<()> {
    if p.exists() {
        std::fs::remove_dir_all(p).at(p)?;
    }
    std::fs::create_dir_all(p).at(p)
}

pub fn run(o: &SynthOptions, progress: &dyn Progress) -> Result<SynthSummary> {
    let t0 = Instant::now();
    let d = o.size.dims();
    let ck = o.out_dir.join("checkpoint");
    let clip = o.out_dir.join("clip");
    fresh_dir(&ck)?;
    fresh_dir(&clip)?;
    let llm = llm_tensors(&d)?;
    let mut all = llm.clone();
    all.extend(projector_tensors(&d)?);
    let ctens = clip_tensors(&d)?;
    let params = all
        .iter()
        .chain(ctens.iter())
        .map(|t| t.numel() as u64)
        .sum::<u64>();
    progress.note(&format!(
        "synth {}: {:.3e} parameters (LLM + projector + CLIP), seed {}",
        d.name, params as f64, o.seed
    ));
    let mut bytes = write_sharded(&ck, &all, d.shards, o.seed, progress)?;
    write_json(&ck.join("config.json"), &llava_config(&d))?;
    write_tokenizer(&ck, d.vocab)?;

    let t1 = Instant::now();
    bytes += write_safetensors(&clip.join("model.safetensors"), &ctens, Dtype::F16, o.seed)?;
    progress.note(&format!(
        "  {}: {} tensors in {:.1} s",
        clip.join("model.safetensors").display(),
        ctens.len(),
        t1.elapsed().as_secs_f64()
    ));
    write_json(&clip.join("config.json"), &clip_config(&d))?;
    write_json(
        &clip.join("preprocessor_config.json"),
        &preprocessor_config(&d),
    )?;

    let llama = if o.llama_view {
        let ld = o.out_dir.join("llama");
        fresh_dir(&ld)?;
        bytes += write_sharded(&ld, &llm, d.shards, o.seed, progress)?;
        let cfg: BTreeMap<String, Value> = llama_config(&d).into_iter().collect();
        write_json(&ld.join("config.json"), &json!(cfg))?;
        write_json(
            &ld.join("generation_config.json"),
            &json!({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}),
        )?;
        write_tokenizer(&ld, d.vocab)?;
        Some(ld)
    } else {
        None
    };
    Ok(SynthSummary {
        checkpoint: ck,
        clip,
        llama,
        parameters: params,
        bytes_written: bytes,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::checkpoint::tokenizer::proto::{piece_type, SpmModel};
    use crate::formats::checkpoint::tokenizer::spm::SpmTokenizer;

    #[test]
    fn tokenizer_32000_parses_and_encodes() {
        let bytes = tokenizer_model(32000);
        let m = SpmModel::parse(&bytes).expect("parse");
        assert_eq!(m.pieces.len(), 32000);
        assert_eq!(m.pieces[0].piece, "<unk>");
        assert_eq!(m.pieces[0].kind, piece_type::UNKNOWN);
        assert_eq!(m.pieces[1].kind, piece_type::CONTROL);
        assert_eq!(m.pieces[2].piece, "</s>");
        assert_eq!(m.pieces[3].piece, "<0x00>");
        assert_eq!(m.pieces[258].piece, "<0xFF>");
        assert!(m.pieces[3..259].iter().all(|p| p.kind == piece_type::BYTE));
        assert!(m.pieces[259..].iter().all(|p| p.kind == piece_type::NORMAL));
        assert!(m.pieces[260..].windows(2).all(|w| w[0].score > w[1].score));
        assert!(m.byte_fallback);
        assert_eq!((m.unk_id, m.bos_id, m.eos_id, m.pad_id), (0, 1, 2, -1));
        assert_eq!(m.normalizer_name, "identity");
        let names: std::collections::HashSet<&str> =
            m.pieces.iter().map(|p| p.piece.as_str()).collect();
        assert_eq!(names.len(), 32000, "pieces are unique");
        let t = SpmTokenizer::from_model(&m).expect("tokenizer");
        assert_eq!(t.vocab_size(), 32000);
        let ids = t.encode("Hello, world! é", true);
        assert_eq!(ids[0], 1);
        assert!(ids.iter().all(|&i| (i as usize) < 32000));
    }

    #[test]
    fn shapes_and_shards() {
        let d = SynthSize::B7.dims();
        let mut all = llm_tensors(&d).unwrap();
        all.extend(projector_tensors(&d).unwrap());
        let llm_params: usize = llm_tensors(&d).unwrap().iter().map(|t| t.numel()).sum();
        assert_eq!(llm_params, 6_738_415_616); // Vicuna-7B / LLaMA-2-7B
        let clip: usize = clip_tensors(&d).unwrap().iter().map(|t| t.numel()).sum();
        assert_eq!(clip, 303_507_456); // CLIPVisionModel ViT-L/14-336
        let g = split_shards(&all, 3);
        assert_eq!(g.len(), 3);
        assert!(
            g[2].iter().any(|t| t.name.ends_with("gamma1"))
                && g[2].iter().any(|t| t.name.ends_with("gamma2"))
        );
        let d13 = SynthSize::B13.dims();
        let mut all13 = llm_tensors(&d13).unwrap();
        all13.extend(projector_tensors(&d13).unwrap());
        assert_eq!(split_shards(&all13, 6).len(), 6);
    }

    /// Decode 2-byte elements.
    fn values(bytes: &[u8], dtype: Dtype) -> Vec<f32> {
        bytes
            .chunks_exact(2)
            .map(|c| match dtype {
                Dtype::Bf16 => bf16::from_le_bytes([c[0], c[1]]).to_f32(),
                Dtype::F16 => f16::from_le_bytes([c[0], c[1]]).to_f32(),
            })
            .collect()
    }

    fn mean_sd(v: &[f32]) -> (f64, f64) {
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let sd = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        (mean, sd)
    }

    #[test]
    fn values_are_deterministic_and_scaled() {
        let n = 3 * PIECE + 5;
        let table = value_table(W, Dtype::Bf16);
        let mut a = vec![0u8; n * 2];
        let mut b = vec![0u8; n * 2];
        fill(&table, tensor_key(7, "x"), 0, &mut a);
        fill(&table, tensor_key(7, "x"), 0, &mut b);
        assert_eq!(a, b);
        let v = values(&a, Dtype::Bf16);
        let (mean, sd) = mean_sd(&v);
        assert!(
            mean.abs() < 1e-3 && (sd - 0.02).abs() < 1e-3,
            "mean {mean} sd {sd}"
        );
        // Finite, and inside the table's +-4.32 sigma (bf16 rounding aside).
        assert!(v.iter().all(|x| x.is_finite() && x.abs() < 0.0875));
        let mut c = vec![0u8; n * 2];
        fill(&table, tensor_key(8, "x"), 0, &mut c);
        assert_ne!(a, c);
        fill(&table, tensor_key(7, "y"), 0, &mut c);
        assert_ne!(a, c);
    }

    /// The values at an index do not depend on where a fill starts or stops (sink buffers cut
    /// tensors at arbitrary element offsets), nor on the thread count.
    #[test]
    fn values_do_not_depend_on_buffer_boundaries() {
        let n = 2 * PIECE + 11;
        let table = value_table(NORM, Dtype::F16);
        let key = tensor_key(1, "model.norm.weight");
        let mut whole = vec![0u8; n * 2];
        fill(&table, key, 0, &mut whole);
        for cuts in [
            vec![1, 2, 3, 7],
            vec![PIECE - 1, PIECE + 2],
            vec![5, PIECE + 3, 2 * PIECE + 1],
        ] {
            let mut parts = vec![0u8; n * 2];
            let mut from = 0;
            for &to in cuts.iter().chain(std::iter::once(&n)) {
                fill(&table, key, from, &mut parts[2 * from..2 * to]);
                from = to;
            }
            assert!(parts == whole, "cut at {cuts:?}");
        }
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let mut serial = vec![0u8; n * 2];
        one.install(|| fill(&table, key, 0, &mut serial));
        assert!(serial == whole);
        let (mean, sd) = mean_sd(&values(&whole, Dtype::F16));
        assert!(
            (mean - 1.0).abs() < 2e-3 && (sd - 0.05).abs() < 2e-3,
            "mean {mean} sd {sd}"
        );
    }

    /// The quantile table against published values of the standard normal quantile function.
    #[test]
    fn normal_quantiles_match_published_values() {
        for (p, x) in [
            (0.5, 0.0),
            (0.975, 1.959_963_985),
            (0.841_344_746_068_543, 1.0),
            (0.001, -3.090_232_306),
        ] {
            assert!((probit(p) - x).abs() < 1e-8, "probit({p}) = {}", probit(p));
        }
        let q = normal_quantiles();
        assert_eq!(q.len(), TABLE);
        assert!(q.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(q[0], -q[TABLE - 1]);
        // p = 0.5 / 65536: the extreme, -4.3249190 (Python statistics.NormalDist().inv_cdf).
        assert!((q[0] + 4.324_919).abs() < 1e-5, "{}", q[0]);
        let u = value_table(Init::Uniform { lo: 0.3, hi: 0.7 }, Dtype::F16);
        let u = values(
            &u.iter().flat_map(|b| b.to_le_bytes()).collect::<Vec<u8>>(),
            Dtype::F16,
        );
        // In [0.3, 0.7] up to f16 rounding (0.3 itself is 0.2998 in f16; spacing 2^-12 there).
        assert!(u.iter().all(|&x| (0.2997..=0.7003).contains(&x)));
        assert!(u.windows(2).all(|w| w[0] <= w[1]));
    }
}
