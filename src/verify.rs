//! verify: run the whole model from the source checkpoint and from the GGUF artefacts on the same
//! probe (image + prompt), compare logits and image embeddings, and decide pass/fail.
use crate::artefact::GgufWeights;
use crate::checkpoint::tokenizer::SpmTokenizer;
use crate::device::Device as RunDevice;
use crate::error::{Error, Result};
use crate::gguf::{FileType, GgufFile};
use crate::hparams::ModelHParams;
use crate::manifest::{sha256_file, Manifest};
use crate::model::{self, WeightSource};
use crate::source::Source;
use candle_core::{Device, Tensor};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// llava_v1 conversation template (spec §3); `{question}` is replaced by the prompt.
pub const LLAVA_V1_TEMPLATE: &str = "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions. USER: <image>\n{question} ASSISTANT:";
pub const DEFAULT_QUESTION: &str = "Describe the image.";

/// Default bound on the mean KL divergence, per LLM file type, calibrated on the bundled fixture
/// (README, "verify tolerances"): measured there F32 0, BF16 2.8e-7, Q8_0 3.5e-4, Q6_K 4.2e-3,
/// Q4_K_S 5.4e-2, Q4_K_M 5.7e-2, Q4_0 7.7e-2 (a tiny random model is harsh on 4-bit; llama.cpp
/// reports 1.3e-2 for Q4_K_M on LLaMA-2 7B). Bounds are 2.5-3x the fixture's figure; broken
/// artefacts (unpermuted Q/K, swapped layers, zeroed gamma) measure 1e-2 and more against F16.
pub fn default_tolerance(ft: Option<FileType>) -> f64 {
    match ft {
        Some(FileType::AllF32) => 1e-6,
        Some(FileType::MostlyF16) | Some(FileType::MostlyBF16) => 1e-5,
        Some(FileType::MostlyQ8_0) => 1e-3,
        Some(FileType::MostlyQ6K) => 1e-2,
        Some(FileType::MostlyQ4KM) | Some(FileType::MostlyQ4KS) => 0.15,
        Some(FileType::MostlyQ4_0) => 0.2,
        None => 1e-5,
    }
}

/// Default bound on the image embeddings' relative RMS error, per mmproj file type: the image side
/// has no distribution to compare, and a broken mmproj must not hide behind a loose LLM bound.
/// Fixture: F16 0 (weights f16-exact), BF16 9.2e-4, Q8_0 (CLIP blocks) 2.9e-3; bounds ~10x that.
pub fn default_image_tolerance(ft: Option<FileType>) -> f64 {
    match ft {
        Some(FileType::AllF32) => 1e-5,
        Some(FileType::MostlyQ8_0) => 3e-2,
        _ => 1e-2,
    }
}

#[derive(Debug, Clone)]
pub struct VerifyOptions {
    pub checkpoint: PathBuf,
    pub gguf: PathBuf,
    pub mmproj: PathBuf,
    pub vision_tower: Option<PathBuf>,
    pub tolerance: Option<f64>,
    /// Bound on the image embeddings' relative RMS error (default per mmproj type).
    pub image_tolerance: Option<f64>,
    pub image: Option<PathBuf>,
    pub pixel_values: Option<PathBuf>,
    pub prompt: Option<String>,
    pub input_ids: Option<PathBuf>,
    pub dump_logits: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Metrics {
    pub max_abs_diff: f64,
    pub rel_rms: f64,
    pub cosine: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl_mean: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl_max: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top1_agreement: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top5_overlap: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Integrity {
    pub path: PathBuf,
    pub sha256: String,
    /// "ok", "mismatch" or "no-manifest".
    pub status: String,
    pub manifest: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: String,
    pub checkpoint: PathBuf,
    pub gguf: PathBuf,
    pub mmproj: PathBuf,
    pub llm_file_type: String,
    pub mmproj_file_type: String,
    pub probe: Probe,
    pub integrity: Vec<Integrity>,
    pub image_embeddings: Metrics,
    pub logits: Metrics,
    pub tolerance_kl_mean: f64,
    pub tolerance_source: String,
    /// Bound on the image embeddings' relative RMS error (default per mmproj file type).
    pub tolerance_image_rel_rms: f64,
    pub passed: bool,
    pub reasons: Vec<String>,
    pub device: String,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    pub image: String,
    pub prompt: String,
    pub n_positions: usize,
    pub n_image_positions: usize,
}

pub const REPORT_SCHEMA: &str = "mmfuser-convert/verify-report/v1";

/// Compare two equally shaped [rows, cols] matrices; with `distributions`, treat rows as logits.
pub fn compare(a: &[f32], b: &[f32], cols: usize, distributions: bool) -> Metrics {
    let (mut dd, mut bb, mut ab, mut aa, mut max_abs) = (0f64, 0f64, 0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        dd += (x - y) * (x - y);
        aa += x * x;
        bb += y * y;
        ab += x * y;
        max_abs = max_abs.max((x - y).abs());
    }
    let mut m = Metrics {
        max_abs_diff: max_abs,
        rel_rms: if aa > 0.0 {
            (dd / aa).sqrt()
        } else {
            dd.sqrt()
        },
        cosine: if aa > 0.0 && bb > 0.0 {
            ab / (aa.sqrt() * bb.sqrt())
        } else {
            0.0
        },
        kl_mean: None,
        kl_max: None,
        top1_agreement: None,
        top5_overlap: None,
    };
    if distributions && cols > 0 {
        let rows = a.len() / cols;
        let (mut kl_sum, mut kl_max, mut top1, mut top5) = (0f64, 0f64, 0usize, 0f64);
        for r in 0..rows {
            let (ra, rb) = (&a[r * cols..(r + 1) * cols], &b[r * cols..(r + 1) * cols]);
            let (la, lb) = (log_softmax(ra), log_softmax(rb));
            let kl: f64 = la
                .iter()
                .zip(&lb)
                .map(|(p, q)| p.exp() * (p - q))
                .sum::<f64>()
                .max(0.0);
            kl_sum += kl;
            kl_max = kl_max.max(kl);
            let (ta, tb) = (top_k(ra, 5), top_k(rb, 5));
            top1 += (ta[0] == tb[0]) as usize;
            top5 += ta.iter().filter(|i| tb.contains(i)).count() as f64 / 5.0;
        }
        m.kl_mean = Some(kl_sum / rows.max(1) as f64);
        m.kl_max = Some(kl_max);
        m.top1_agreement = Some(top1 as f64 / rows.max(1) as f64);
        m.top5_overlap = Some(top5 / rows.max(1) as f64);
    }
    m
}

fn log_softmax(x: &[f32]) -> Vec<f64> {
    let max = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let lse = max + x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
    x.iter().map(|&v| v as f64 - lse).collect()
}

fn top_k(x: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..x.len()).collect();
    idx.sort_by(|&i, &j| {
        x[j].partial_cmp(&x[i])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(i.cmp(&j))
    });
    idx.truncate(k);
    idx
}

fn file_type_of(g: &GgufFile) -> Option<FileType> {
    g.get_u32("general.file_type")
        .ok()
        .and_then(FileType::from_id)
}

/// Check an artefact against the manifests that list it.
pub fn check_integrity(path: &Path) -> Result<Integrity> {
    let (_, sha) = sha256_file(path)?;
    let fname = path.file_name().map(|f| f.to_os_string());
    for (mpath, m) in Manifest::find_for(path) {
        if let Some(o) = m
            .outputs
            .iter()
            .find(|o| o.path.file_name().map(|f| f.to_os_string()) == fname)
        {
            let status = if o.sha256 == sha { "ok" } else { "mismatch" };
            return Ok(Integrity {
                path: path.to_path_buf(),
                sha256: sha,
                status: status.into(),
                manifest: Some(mpath),
            });
        }
    }
    Ok(Integrity {
        path: path.to_path_buf(),
        sha256: sha,
        status: "no-manifest".into(),
        manifest: None,
    })
}

fn read_ids(path: &Path) -> Result<Vec<i64>> {
    let text = crate::fsutil::read_input_text(path, crate::fsutil::CAP_PROBE)?;
    let ids = serde_json::from_str::<Vec<i64>>(&text).map_err(|e| {
        Error::input(
            path,
            format!("expected a JSON list of token ids (-200 marks the image): {e}"),
        )
    })?;
    if ids.is_empty() {
        return Err(Error::input(path, "the list of token ids is empty"));
    }
    Ok(ids)
}

fn pixel_values(opts: &VerifyOptions, hp: &ModelHParams) -> Result<(Vec<f32>, String)> {
    let s = hp.clip.image_size;
    if let Some(p) = &opts.pixel_values {
        let a = crate::npy::read(p)?;
        if a.shape != [3, s, s] {
            return Err(Error::input(
                p,
                format!(
                    "pixel values must have shape [3, {s}, {s}], got {:?}",
                    a.shape
                ),
            ));
        }
        let v = a.to_f32().map_err(|e| Error::input(p, e.to_string()))?;
        return Ok((v, p.display().to_string()));
    }
    if let Some(p) = &opts.image {
        return Ok((
            crate::image::preprocess(p, s, hp.clip.image_mean, hp.clip.image_std)?,
            p.display().to_string(),
        ));
    }
    Ok((
        crate::image::synthetic_probe(s, hp.clip.image_mean, hp.clip.image_std),
        "synthetic probe".into(),
    ))
}

/// The whole verification on the CPU. Errors are input/usage errors; a failed comparison is
/// `passed: false`.
pub fn run(opts: &VerifyOptions, command: &[String]) -> Result<Report> {
    run_on(opts, command, &RunDevice::Cpu)
}

/// Image embeddings (when the prompt has the marker) and logits of one model on one backend.
fn forward<B: model::Backend>(
    b: &B,
    ws: &dyn WeightSource,
    hp: &ModelHParams,
    pv: &Tensor,
    ids: &[i64],
) -> Result<(Option<Tensor>, Tensor)> {
    let emb = if ids.contains(&model::IMAGE_TOKEN) {
        Some(model::encode_image_with(b, ws, hp, pv)?.image_embeds)
    } else {
        None
    };
    let logits = model::logits_with(b, ws, hp, ids, emb.as_ref())?;
    Ok((emb, logits))
}

/// The whole verification with the model on `dev` (both sides on the same device).
pub fn run_on(opts: &VerifyOptions, command: &[String], dev: &RunDevice) -> Result<Report> {
    let _ = command;
    let t0 = Instant::now();
    let integrity = vec![check_integrity(&opts.gguf)?, check_integrity(&opts.mmproj)?];
    let src = Source::open(&opts.checkpoint, opts.vision_tower.as_deref())?;
    let art = GgufWeights::open(&opts.gguf, &opts.mmproj)?;
    // An mmproj keeps only the CLIP blocks the selected layers need: compare what the model uses.
    let effective = |mut hp: ModelHParams| {
        hp.clip.n_layer = hp.clip.blocks_needed();
        hp
    };
    let hp_src = effective(src.hparams.clone());
    let hp_art = effective(art.hparams()?);
    let mut reasons = vec![];
    for i in &integrity {
        if i.status == "mismatch" {
            reasons.push(format!(
                "{}: sha256 differs from {} (the file changed after it was written)",
                i.path.display(),
                i.manifest
                    .as_ref()
                    .map(|m| m.display().to_string())
                    .unwrap_or_default()
            ));
        }
    }
    if hp_src != hp_art {
        reasons.push(format!(
            "hyper-parameters differ: source {hp_src:?} vs artefact {hp_art:?}"
        ));
    }
    let (pixels, image_desc) = pixel_values(opts, &hp_src)?;
    let s = hp_src.clip.image_size;
    let pv = Tensor::from_vec(pixels, (3, s, s), &Device::Cpu)?;
    let (ids, prompt_desc) = match (&opts.input_ids, &opts.prompt) {
        (Some(p), None) => (read_ids(p)?, p.display().to_string()),
        (None, q) => {
            let q = q.clone().unwrap_or_else(|| DEFAULT_QUESTION.to_string());
            let text = if q.contains("<image>") {
                q
            } else {
                LLAVA_V1_TEMPLATE.replace("{question}", &q)
            };
            let tok = SpmTokenizer::from_file(&opts.checkpoint.join("tokenizer.model"))?;
            (tok.encode_llava_prompt(&text), text)
        }
        (Some(_), Some(_)) => return Err(Error::usage("give --prompt or --input-ids, not both")),
    };
    let ids_origin = || {
        opts.input_ids
            .clone()
            .unwrap_or_else(|| PathBuf::from("--prompt"))
    };
    if let Some(bad) = ids
        .iter()
        .find(|&&i| i >= hp_src.llama.n_vocab as i64 || (i < 0 && i != model::IMAGE_TOKEN))
    {
        return Err(Error::input(
            ids_origin(),
            format!(
                "token id {bad}: ids must be in 0..{} (or -200 for the image)",
                hp_src.llama.n_vocab
            ),
        ));
    }
    // Positions after the image marker expands: beyond the model's context the attention alone
    // would need n^2 floats (a 100k-token ids file asked for 160 GB).
    let n_pos = ids.len()
        + ids.iter().filter(|&&i| i == model::IMAGE_TOKEN).count()
            * hp_src.clip.n_patches().saturating_sub(1);
    if n_pos > hp_src.llama.n_ctx {
        return Err(Error::input(ids_origin(), format!(
            "the probe has {n_pos} positions, more than the model's context length {} (max_position_embeddings)",
            hp_src.llama.n_ctx
        )));
    }
    let has_image = ids.contains(&model::IMAGE_TOKEN);
    let run_side = |ws: &dyn WeightSource, hp: &ModelHParams| -> Result<(Option<Tensor>, Tensor)> {
        match dev {
            RunDevice::Cpu => forward(&model::CpuBackend, ws, hp, &pv, &ids),
            RunDevice::Cuda(b) => {
                // Each side's weights are uploaded once and dropped after it.
                let r = forward(b.as_ref(), ws, hp, &pv, &ids);
                b.clear_weights();
                r
            }
        }
    };
    let (emb_s, log_s) = run_side(&src, &hp_src)?;
    let (emb_a, log_a) = if hp_src == hp_art {
        run_side(&art, &hp_art)?
    } else {
        (None, log_s.zeros_like()?)
    };
    let flat = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
    let vocab = log_s.dim(1)?;
    let (ls, la) = (flat(&log_s)?, flat(&log_a)?);
    let logits = compare(&ls, &la, vocab, true);
    let image_embeddings = match (&emb_s, &emb_a) {
        (Some(a), Some(b)) => compare(&flat(a)?, &flat(b)?, a.dim(1)?, false),
        _ => Metrics {
            max_abs_diff: 0.0,
            rel_rms: 0.0,
            cosine: 1.0,
            kl_mean: None,
            kl_max: None,
            top1_agreement: None,
            top5_overlap: None,
        },
    };
    if let Some(dir) = &opts.dump_logits {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        crate::npy::write_f32(dir.join("source.npy"), &[ls.len() / vocab, vocab], &ls)?;
        crate::npy::write_f32(dir.join("artefact.npy"), &[la.len() / vocab, vocab], &la)?;
    }
    let llm_ft = file_type_of(&art.llm);
    let (tol, tol_src) = match opts.tolerance {
        Some(t) => (t, "--tolerance".to_string()),
        None => (
            default_tolerance(llm_ft),
            format!(
                "default for {}",
                llm_ft.map(|f| f.name()).unwrap_or("unknown file type")
            ),
        ),
    };
    let kl = logits.kl_mean.unwrap_or(f64::INFINITY);
    if !(kl <= tol) {
        reasons.push(format!(
            "mean KL divergence {kl:.3e} exceeds the tolerance {tol:.3e} ({tol_src})"
        ));
    }
    let mmproj_ft = file_type_of(&art.mmproj);
    let img_tol = opts
        .image_tolerance
        .unwrap_or_else(|| default_image_tolerance(mmproj_ft));
    if has_image && !(image_embeddings.rel_rms <= img_tol) {
        reasons.push(format!(
            "image embeddings differ by relative RMS {:.3e}, above the bound {img_tol:.1e} (the mmproj: CLIP, fuser or projector)",
            image_embeddings.rel_rms
        ));
    }
    if let Some(b) = dev.cuda() {
        eprintln!("{}", b.memory_report());
    }
    Ok(Report {
        schema: REPORT_SCHEMA.into(),
        checkpoint: opts.checkpoint.clone(),
        gguf: opts.gguf.clone(),
        mmproj: opts.mmproj.clone(),
        llm_file_type: llm_ft
            .map(|f| f.name().to_string())
            .unwrap_or_else(|| "unknown".into()),
        mmproj_file_type: mmproj_ft
            .map(|f| f.name().to_string())
            .unwrap_or_else(|| "unknown".into()),
        probe: Probe {
            image: image_desc,
            prompt: prompt_desc,
            n_positions: ls.len() / vocab,
            n_image_positions: if has_image {
                hp_src.clip.n_patches()
            } else {
                0
            },
        },
        integrity,
        image_embeddings,
        logits,
        tolerance_kl_mean: tol,
        tolerance_source: tol_src,
        tolerance_image_rel_rms: img_tol,
        passed: reasons.is_empty(),
        reasons,
        device: dev.name().into(),
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// The human-readable table.
pub fn render(r: &Report) -> String {
    let mut s = String::new();
    let fmt = |v: Option<f64>| v.map(|x| format!("{x:.3e}")).unwrap_or_else(|| "-".into());
    s += &format!(
        "verify  {} ({}) + {} ({})\n",
        r.gguf.display(),
        r.llm_file_type,
        r.mmproj.display(),
        r.mmproj_file_type
    );
    s += &format!("source  {}\n", r.checkpoint.display());
    s += &format!(
        "probe   image: {}; {} positions ({} image)\n",
        r.probe.image, r.probe.n_positions, r.probe.n_image_positions
    );
    for i in &r.integrity {
        s += &format!("sha256  {}  {}\n", i.status, i.path.display());
    }
    s += "\n                     max|diff|   rel RMS     cosine      KL mean     KL max      top-1   top-5\n";
    for (name, m) in [
        ("image embeddings", &r.image_embeddings),
        ("logits", &r.logits),
    ] {
        s += &format!(
            "{name:<20} {:<11.3e} {:<11.3e} {:<11.8} {:<11} {:<11} {:<7} {}\n",
            m.max_abs_diff,
            m.rel_rms,
            m.cosine,
            fmt(m.kl_mean),
            fmt(m.kl_max),
            m.top1_agreement
                .map(|x| format!("{:.3}", x))
                .unwrap_or("-".into()),
            m.top5_overlap
                .map(|x| format!("{:.3}", x))
                .unwrap_or("-".into())
        );
    }
    s += &format!(
        "\ntolerance: mean KL <= {:.1e} ({}); image embeddings rel RMS <= {:.1e}\n",
        r.tolerance_kl_mean, r.tolerance_source, r.tolerance_image_rel_rms
    );
    if r.passed {
        s += &format!("PASS ({:.2} s on {})\n", r.seconds, r.device);
    } else {
        for why in &r.reasons {
            s += &format!("FAIL: {why}\n");
        }
    }
    s
}
