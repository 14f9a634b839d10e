//! verify: is this artefact what conversion makes from this checkpoint?
//!
//! The verdict is exactness, which holds at any scale and for any quantization type: the header
//! and every tensor's bytes against what the shared plan produces from the source
//! (`crate::verify::exactness`), then the artefact forward against the *expected* forward (the source's
//! weights passed through the types the artefact records, config.json's hyper-parameters, the
//! checkpoint's tokenizer). Quality (KL against the float source, as llama-perplexity's
//! `--kl-divergence` reports it) is always reported and judged only under `--tolerance`.
pub mod exactness;
pub mod metrics;
pub mod probe;
pub mod report;

pub use probe::DEFAULT_QUESTION;
pub use report::{render, Check, Integrity, Probe, Report, Row, Stage, REPORT_SCHEMA};

use metrics::{compare, first_nonfinite_f32, kl_stats};
use probe::probes;
use report::{check, dedup};

use crate::convert::manifest::Manifest;
use crate::convert::recipe::ArtefactKind;
use crate::convert::source::Source;
use crate::ground::digest::sha256_file;
use crate::ground::error::{Error, Result};
use crate::ground::progress::{Progress, Unit};
use crate::model::hparams::ModelHParams;
use crate::model::weights::{RawTensor, RopeMode, StoredAt};
use crate::model::{self, WeightSource};
use crate::runtime::device::Device as RunDevice;
use crate::runtime::weights::GgufWeights;
use candle_core::Tensor;
use exactness::{file_type_of, TensorCheck};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Bound on the relative RMS difference of logits and image embeddings between the artefact
/// forward and the expected forward, the same for every type and size. The two sides hold the
/// same values (row permutation commutes with per-row block quantization), run the same kernels
/// on the same device, and sum in the same order: the expected side's rotate_half rope writes each
/// rotated pair side by side (`Backend::rope_neox`), as the artefact's permuted rows have them, so
/// even the attention scores add up alike. A correct artefact therefore differs by exactly 0
/// (measured on the fixture for every type F32..Q4_0, tests/verify.rs prints it, and on the
/// synthetic 7B; the README has the figures). The bound leaves room only for a backend whose
/// results depend on where a row sits in a matrix; every fault the tests plant is above 16x it.
pub const EXACT_REL_RMS_BOUND: f64 = 1e-5;

#[derive(Debug, Clone)]
pub struct VerifyOptions {
    pub checkpoint: PathBuf,
    pub gguf: PathBuf,
    pub mmproj: PathBuf,
    pub vision_tower: Option<PathBuf>,
    /// Bound on the mean KL divergence against the float source (quality gate; none by default).
    pub tolerance: Option<f64>,
    /// Bound on the image embeddings' relative RMS error against the float source (quality gate).
    pub image_tolerance: Option<f64>,
    /// Skip the float-source forward (no quality figures).
    pub exact_only: bool,
    /// Images of the probes (repeatable; paired with `prompt` in order, or one broadcast).
    pub image: Vec<PathBuf>,
    pub pixel_values: Option<PathBuf>,
    /// Questions of the probes (repeatable).
    pub prompt: Vec<String>,
    pub input_ids: Option<PathBuf>,
    pub dump_logits: Option<PathBuf>,
}

/// The manifest written beside an artefact by the run that made it: `<stem>.manifest.json`
/// (for an mmproj, the run's `<name>-<TYPE>.manifest.json`).
fn own_manifest(path: &Path) -> Option<PathBuf> {
    let stem = path.file_stem()?.to_string_lossy().to_string();
    let dir = path.parent().unwrap_or(Path::new(""));
    [
        stem.clone(),
        stem.strip_prefix("mmproj-").unwrap_or(&stem).to_string(),
    ]
    .into_iter()
    .map(|s| dir.join(format!("{s}.manifest.json")))
    .find(|p| p.exists())
}

/// Check an artefact against the manifests that list it. A manifest of the artefact's own name
/// that cannot be read, or that does not list the artefact, is an integrity failure.
pub fn check_integrity(path: &Path) -> Result<Integrity> {
    let (_, sha) = sha256_file(path)?;
    let fname = path.file_name().map(|f| f.to_os_string());
    let lists = |m: &Manifest| {
        m.outputs
            .iter()
            .find(|o| o.path.file_name().map(|f| f.to_os_string()) == fname)
            .map(|o| o.sha256.clone())
    };
    let result = |status: &str, manifest: Option<PathBuf>, detail: Option<String>| Integrity {
        path: path.to_path_buf(),
        sha256: sha.clone(),
        status: status.into(),
        manifest,
        detail,
    };
    if let Some(mp) = own_manifest(path) {
        return Ok(match Manifest::read(&mp) {
            Err(e) => result(
                "bad-manifest",
                Some(mp),
                Some(format!("cannot be read: {e}")),
            ),
            Ok(m) => match lists(&m) {
                None => result(
                    "bad-manifest",
                    Some(mp),
                    Some("does not list this file (it names other outputs)".into()),
                ),
                Some(s) if s == sha => result("ok", Some(mp), None),
                Some(_) => result("mismatch", Some(mp), None),
            },
        });
    }
    for (mpath, m) in Manifest::find_for(path) {
        if let Some(s) = lists(&m) {
            let status = if s == sha { "ok" } else { "mismatch" };
            return Ok(result(status, Some(mpath), None));
        }
    }
    Ok(result("no-manifest", None, None))
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

/// The expected model, under the source's semantics: the checkpoint's own tensors as stored
/// (Q/K rows in HF's order, not through the plan's permutation) with HF's rotate_half rope, each
/// passed through the type the artefact records for it (the same encoder conversion uses). So the
/// plan's layout transforms are checked, not re-used: a wrong permutation in the plan would match
/// its own bytes, but not this forward. Tensors the plan does not transform and whose artefact
/// bytes were proven equal to their re-derivation are read from the artefact (the same bytes).
struct Expected<'a> {
    src: &'a Source,
    /// The artefact whose recorded types the weights pass through (none: the source's own types).
    art: Option<&'a GgufWeights>,
    proven: &'a HashSet<String>,
    /// The road that reproduced each file's quantized tensors (for tensors that did not match).
    via: Option<crate::ground::dtype::GgmlType>,
}

impl WeightSource for Expected<'_> {
    fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        if let Some(art) = self.reused(name) {
            return art.raw(name);
        }
        let r = self.src.row(name).ok_or_else(|| {
            Error::input(
                &self.src.dir,
                format!("the recipe maps no source tensor to '{name}'"),
            )
        })?;
        let ty = match self.art.and_then(|a| a.file_of(name).tensor(name)) {
            Some(t) => t.info.ty,
            None => self.src.store(r.store).get(&r.row.src)?.ty,
        };
        if let Some(data) = self.unpermuted(name) {
            return Ok(RawTensor {
                ty,
                shape: r.row.shape.clone(),
                data: data.into(),
            });
        }
        let via = self.via.filter(|_| ty.is_quantized());
        let data = exactness::emit_as_stored(self.src, r, ty, via)?;
        Ok(RawTensor {
            ty,
            shape: r.row.shape.clone(),
            data: data.into(),
        })
    }
    fn has(&self, name: &str) -> bool {
        self.src.row(name).is_some()
    }
    fn origin(&self) -> PathBuf {
        self.src.dir.clone()
    }
    fn release(&self, name: &str) {
        if let Some(art) = self.reused(name) {
            art.release(name);
        } else {
            self.src.release(name);
        }
    }
    fn rope_mode(&self) -> RopeMode {
        RopeMode::Neox
    }
    /// The artefact's place for the tensors read from it (the same bytes, so the same products
    /// as the artefact forward's), with the rows' order for those put back in the checkpoint's
    /// (the same products, columns reordered); None for those encoded here.
    fn stored_at(&self, name: &str) -> Option<StoredAt> {
        if let Some(art) = self.reused(name) {
            return art.stored_at(name);
        }
        let (art, order) = self.reordered(name)?;
        let at = art.stored_at(name)?;
        Some(StoredAt {
            rows: Some(order),
            ..at
        })
    }
}

impl<'a> Expected<'a> {
    /// The artefact, if `name` is read from it: proven equal, and stored in the same layout.
    fn reused(&self, name: &str) -> Option<&'a GgufWeights> {
        self.art.filter(|_| {
            self.proven.contains(name)
                && self
                    .src
                    .row(name)
                    .is_some_and(|r| r.row.transform.is_none())
        })
    }

    /// A tensor the plan permutes, proven equal to the plan's output: the artefact (whose tensor
    /// has the checkpoint's shape) and the order of the plan's permutation (`order[dst] = src`).
    /// The order is the one the plan's own transform applies, found by running it
    /// (`Source::transform_order`), so a wrong permutation is undone, not trusted: the weights are
    /// the checkpoint's rows as stored whatever it did, and the forward still tells a wrong layout.
    fn reordered(&self, name: &str) -> Option<(&'a GgufWeights, Vec<usize>)> {
        let art = self.art.filter(|_| self.proven.contains(name))?;
        let r = self.src.row(name)?;
        let rows = *r.row.shape.first()?;
        let order = self.src.transform_order(r, rows)?;
        let g = art.file_of(name);
        let t = g.tensor(name)?;
        let shape: Vec<usize> = t.info.ne.iter().rev().map(|&d| d as usize).collect();
        (shape == r.row.shape && g.data(t).len() % rows == 0).then_some((art, order))
    }

    /// A [`reordered`](Self::reordered) tensor's bytes: the artefact's rows put back where the
    /// checkpoint stores them. These are the bytes `emit_as_stored` would encode again (blocks
    /// run along rows, so encoding commutes with moving whole rows), at the cost of a copy.
    /// None (encode again) in any other case.
    fn unpermuted(&self, name: &str) -> Option<Vec<u8>> {
        let (art, order) = self.reordered(name)?;
        let t = art.raw(name).ok()?;
        let row_bytes = t.data.len() / order.len();
        let mut data = vec![0u8; t.data.len()];
        for (dst, &src) in order.iter().enumerate() {
            data[src * row_bytes..(src + 1) * row_bytes]
                .copy_from_slice(&t.data[dst * row_bytes..(dst + 1) * row_bytes]);
        }
        drop(t);
        art.release(name);
        Some(data)
    }
}

/// A weight source that advances a progress bar as the model fetches its tensors (one forward
/// fetches each tensor once, layer by layer), so a long CPU forward shows where it is.
struct Counted<'a> {
    inner: &'a dyn WeightSource,
    progress: &'a dyn Progress,
}

impl WeightSource for Counted<'_> {
    fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        self.progress.advance(1, name);
        self.inner.raw(name)
    }
    fn has(&self, name: &str) -> bool {
        self.inner.has(name)
    }
    fn origin(&self) -> PathBuf {
        self.inner.origin()
    }
    fn origin_of(&self, name: &str) -> PathBuf {
        self.inner.origin_of(name)
    }
    fn release(&self, name: &str) {
        self.inner.release(name)
    }
    fn rope_mode(&self) -> RopeMode {
        self.inner.rope_mode()
    }
    fn stored_at(&self, name: &str) -> Option<StoredAt> {
        self.inner.stored_at(name)
    }
}

/// Whether two hyper-parameter sets describe the same tensor shapes and layer structure (they
/// may differ in values such as rope theta, epsilons, image normalisation).
fn same_shapes(a: &ModelHParams, b: &ModelHParams) -> bool {
    let mut b = b.clone();
    b.llama.rms_eps = a.llama.rms_eps;
    b.llama.rope_theta = a.llama.rope_theta;
    b.clip.eps = a.clip.eps;
    b.clip.image_mean = a.clip.image_mean;
    b.clip.image_std = a.clip.image_std;
    b.clip.quick_gelu = a.clip.quick_gelu;
    if let (
        crate::model::hparams::ProjectorHParams::MmFuser(x),
        crate::model::hparams::ProjectorHParams::MmFuser(y),
    ) = (&a.projector, &mut b.projector)
    {
        y.eps = x.eps;
    }
    *a == b
}

/// Check a `--tolerance`-style bound: a finite number >= 0.
pub fn check_bound(flag: &str, v: Option<f64>) -> Result<()> {
    match v {
        Some(t) if !(t.is_finite() && t >= 0.0) => Err(Error::usage(format!(
            "{flag} must be a finite number >= 0, got {t}"
        ))),
        _ => Ok(()),
    }
}

/// Both outputs of one forward, flattened, with their widths.
struct Outputs {
    emb: Option<(Vec<f32>, usize)>,
    logits: Vec<f32>,
    vocab: usize,
}

fn outputs(r: (Option<Tensor>, Tensor)) -> Result<Outputs> {
    let flat = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
    let emb = match &r.0 {
        Some(e) => Some((flat(e)?, e.dim(1)?)),
        None => None,
    };
    Ok(Outputs {
        emb,
        logits: flat(&r.1)?,
        vocab: r.1.dim(1)?,
    })
}

/// All probes' outputs stacked (positions after positions).
fn pool(outs: &[Outputs]) -> Outputs {
    let emb_cols = outs.iter().find_map(|o| o.emb.as_ref().map(|e| e.1));
    Outputs {
        emb: emb_cols.map(|c| {
            let v = outs
                .iter()
                .flat_map(|o| o.emb.iter().flat_map(|e| e.0.iter().copied()))
                .collect();
            (v, c)
        }),
        logits: outs.iter().flat_map(|o| o.logits.iter().copied()).collect(),
        vocab: outs.first().map_or(0, |o| o.vocab),
    }
}

/// The comparison rows of one pair of sides: pooled over probes and per probe.
struct Rows {
    emb: Row,
    logits: Row,
    per_probe: Vec<(Row, Row)>,
}

impl Rows {
    fn not(why: &str, n: usize) -> Rows {
        Rows {
            emb: Row::not(why),
            logits: Row::not(why),
            per_probe: (0..n).map(|_| (Row::not(why), Row::not(why))).collect(),
        }
    }

    /// `side` (the artefact) against `reference`, probe by probe and pooled; non-finite values
    /// are reasons named by probe, side and position.
    fn compare(
        reference: &[Outputs],
        ref_name: &str,
        side: &[Outputs],
        with_kl: bool,
        tag: &dyn Fn(usize) -> String,
        reasons: &mut Vec<String>,
    ) -> Rows {
        let mut per_probe = vec![];
        for (i, (r, s)) in reference.iter().zip(side).enumerate() {
            let mut why = vec![];
            per_probe.push(compare_sides(r, ref_name, s, "artefact", with_kl, &mut why));
            reasons.extend(why.into_iter().map(|w| format!("{}{w}", tag(i))));
        }
        let (emb, logits) = if per_probe.len() == 1 {
            per_probe[0].clone()
        } else {
            compare_sides(
                &pool(reference),
                ref_name,
                &pool(side),
                "artefact",
                with_kl,
                &mut vec![],
            )
        };
        Rows {
            emb,
            logits,
            per_probe,
        }
    }
}

/// Compare one side's outputs with a reference side's: rows for image embeddings and logits,
/// plus the reasons to fail for non-finite values (named by side and position).
fn compare_sides(
    reference: &Outputs,
    ref_name: &str,
    side: &Outputs,
    side_name: &str,
    with_kl: bool,
    reasons: &mut Vec<String>,
) -> (Row, Row) {
    let mut row = |a: &[f32], b: &[f32], cols: usize, what: &str, kl: bool| -> Row {
        if a.len() != b.len() {
            return Row::not(format!("{what}: {} values vs {}", a.len(), b.len()));
        }
        for (x, name) in [(a, ref_name), (b, side_name)] {
            if let Some((r, c)) = first_nonfinite_f32(x, cols) {
                reasons.push(format!(
                    "{what} of the {name} forward: non-finite value at position {r}, column {c}"
                ));
                return Row::not(format!("non-finite {what} on the {name} side"));
            }
        }
        Row::of(compare(a, b), kl.then(|| kl_stats(a, b, cols)))
    };
    let emb = match (&reference.emb, &side.emb) {
        (Some((a, c)), Some((b, _))) => row(a, b, *c, "image embeddings", false),
        _ => Row::not("the probe has no image"),
    };
    let logits = row(
        &reference.logits,
        &side.logits,
        reference.vocab,
        "logits",
        with_kl,
    );
    (emb, logits)
}

/// The whole verification on the CPU. Errors are input/usage errors; a failed comparison is
/// `passed: false`.
pub fn run(opts: &VerifyOptions, command: &[String], progress: &dyn Progress) -> Result<Report> {
    run_on(opts, command, &RunDevice::Cpu, progress)
}

/// Check 1: the artefacts' sha256 against their manifests.
fn integrity_step(integrity: &[Integrity], checks: &mut Vec<Check>, reasons: &mut Vec<String>) {
    let mut integrity_ok = true;
    for i in integrity {
        let m = i
            .manifest
            .as_ref()
            .map(|m| m.display().to_string())
            .unwrap_or_default();
        match i.status.as_str() {
            "mismatch" => reasons.push(format!(
                "{}: sha256 differs from {m} (the file changed after it was written)",
                i.path.display()
            )),
            "bad-manifest" => reasons.push(format!(
                "{}: its manifest {m} {}",
                i.path.display(),
                i.detail.clone().unwrap_or_default()
            )),
            _ => continue,
        }
        integrity_ok = false;
    }
    checks.push(check(
        "integrity",
        if integrity_ok { "pass" } else { "fail" },
        "sha256 of each artefact against the manifest beside it (an artefact without one is not checked)",
    ));
}

/// Check 2: every metadata key and the tensor list against what conversion would write. Returns
/// the findings and whether a tensor is missing or reshaped (the artefact forward cannot run).
fn header_step(
    src: &mut Source,
    art: &GgufWeights,
    checks: &mut Vec<Check>,
    reasons: &mut Vec<String>,
    progress: &dyn Progress,
) -> (Vec<String>, bool) {
    let mut header = vec![];
    let mut shapes_differ = false;
    for (g, kind) in [
        (&art.llm, ArtefactKind::Llm),
        (&art.mmproj, ArtefactKind::Mmproj),
    ] {
        match exactness::plan_for(src, g, kind, progress) {
            Ok(plan) => {
                header.extend(exactness::metadata_diffs(&g.path, &plan.meta, &g.metadata));
                for d in exactness::tensor_list_diffs(&plan, g) {
                    shapes_differ |= d.stops_the_forward();
                    header.push(d.describe(&g.path));
                }
            }
            Err(e) => header.push(e),
        }
    }
    checks.push(check(
        "header",
        if header.is_empty() { "pass" } else { "fail" },
        format!(
            "every metadata key, tensor name, shape and type against what hf-to-gguf/quantize write from this checkpoint: {} difference(s)",
            header.len()
        ),
    ));
    for h in header.iter().take(20) {
        reasons.push(format!("header: {h}"));
    }
    if header.len() > 20 {
        reasons.push(format!(
            "header: ... and {} more differences",
            header.len() - 20
        ));
    }
    (header, shapes_differ)
}

/// Check 3: every tensor's bytes against the plan's output (not possible with an importance
/// matrix). Returns the findings and the names proven equal.
fn tensor_step(
    progress: &dyn Progress,
    src: &Source,
    art: &GgufWeights,
    imatrix: bool,
    checks: &mut Vec<Check>,
    reasons: &mut Vec<String>,
) -> Result<(TensorCheck, HashSet<String>)> {
    let (tensors, proven) = if imatrix {
        checks.push(check(
            "tensors",
            "not run",
            "importance matrix (see imatrix)",
        ));
        (TensorCheck::default(), HashSet::new())
    } else {
        progress.start(
            "tensor bytes vs the plan",
            (art.llm.tensors.len() + art.mmproj.tensors.len()) as u64,
            Unit::Tensors,
        );
        let (t, p) = exactness::check_tensors(src, art, &|n| progress.advance(1, n))?;
        progress.finish();
        let ok = t.mismatches.is_empty() && t.first_nonfinite.is_none();
        if t.mismatches.len() > 20 {
            reasons.push(format!(
                "{} tensors differ from the plan's output (the first 20 follow; all in the JSON report)",
                t.mismatches.len()
            ));
        }
        for m in t.mismatches.iter().take(20) {
            reasons.push(format!(
                "{}: tensor '{}' ({}) differs from the plan's output from the checkpoint: first at block {} (row {}), {} of {} blocks differ",
                m.file, m.tensor, m.ggml_type, m.first_block, m.first_row, m.blocks_differing, m.blocks
            ));
        }
        checks.push(check(
            "tensors",
            if ok { "pass" } else { "fail" },
            format!(
                "bytes of each tensor against the plan's output (our quantizers are byte-identical to llama.cpp's): {} of {} equal, {} not compared",
                t.equal, t.compared, t.not_compared
            ),
        ));
        (t, p)
    };
    if let Some(nf) = &tensors.first_nonfinite {
        reasons.push(format!("non-finite value stored in the artefacts: {nf}"));
    }
    Ok((tensors, proven))
}

/// Check 4's verdict: the artefact forward against the expected model, one bound for every type.
// `!(x <= bound)` on purpose: a NaN figure fails.
#[allow(clippy::neg_cmp_op_on_partial_ord)]
fn exact_step(
    exact: &Rows,
    has_image: bool,
    imatrix: bool,
    sharing: Option<model::paired::Sharing>,
    checks: &mut Vec<Check>,
    reasons: &mut Vec<String>,
) {
    let mut exact_ok = true;
    for (what, row) in [("image embeddings", &exact.emb), ("logits", &exact.logits)] {
        if let Some(m) = &row.metrics {
            if !(m.rel_rms <= EXACT_REL_RMS_BOUND) {
                exact_ok = false;
                reasons.push(format!(
                    "exactness: {what} differ from the expected model's by relative RMS {:.3e}, {:.1}x the bound {EXACT_REL_RMS_BOUND:.0e}",
                    m.rel_rms,
                    m.rel_rms / EXACT_REL_RMS_BOUND
                ));
            }
        } else if what == "logits" || has_image {
            // Not compared although there was something to compare.
            exact_ok = false;
        }
    }
    checks.push(check(
        "exact forward",
        if imatrix {
            "not run"
        } else if exact_ok {
            "pass"
        } else {
            "fail"
        },
        match sharing {
            Some(sh) => format!(
                "artefact vs expected model, relative RMS of logits and image embeddings <= {EXACT_REL_RMS_BOUND:.0e} (run side by side: the expected model took {} of its {} products from the artefact forward, same weight bytes and inputs bit for bit, and computed the other {})",
                sh.shared,
                sh.shared + sh.computed,
                sh.computed
            ),
            None => format!("artefact vs expected model, relative RMS of logits and image embeddings <= {EXACT_REL_RMS_BOUND:.0e}"),
        },
    ));
}

/// Whether verify on the CPU runs the artefact and expected forwards side by side, sharing
/// their common products (`model::paired`): yes unless `MMFUSER_VERIFY_SHARE=0` (the same
/// figures either way, bit for bit; the switch exists to show that, and to time the difference).
fn share_products() -> bool {
    std::env::var("MMFUSER_VERIFY_SHARE").map_or(true, |v| v != "0")
}

/// Check 5: quality against the float source, judged only under --tolerance / --image-tolerance.
// `!(x <= bound)` on purpose: a NaN figure fails.
#[allow(clippy::neg_cmp_op_on_partial_ord)]
fn quality_step(
    opts: &VerifyOptions,
    quality: &Rows,
    imatrix_note: Option<&str>,
    checks: &mut Vec<Check>,
    reasons: &mut Vec<String>,
) {
    let (q_emb, q_logits) = (&quality.emb, &quality.logits);
    let mut q_status = if opts.exact_only {
        "not run"
    } else {
        "reported"
    };
    if let Some(tol) = opts.tolerance {
        q_status = "pass";
        match &q_logits.kl {
            Some(k) if k.kl_mean <= tol => {}
            Some(k) => {
                q_status = "fail";
                reasons.push(format!(
                    "quality: mean KL divergence {:.3e} exceeds --tolerance {tol:.3e}",
                    k.kl_mean
                ));
            }
            None => {
                q_status = "fail";
                reasons.push(
                    "quality: the logits were not compared, so --tolerance cannot be met".into(),
                );
            }
        }
    }
    if let Some(tol) = opts.image_tolerance {
        if let Some(m) = &q_emb.metrics {
            if !(m.rel_rms <= tol) {
                q_status = "fail";
                reasons.push(format!(
                    "quality: image embeddings differ from the source's by relative RMS {:.3e}, above --image-tolerance {tol:.1e}",
                    m.rel_rms
                ));
            }
        }
    }
    if let Some(note) = imatrix_note {
        if opts.tolerance.is_none() {
            reasons.push(format!("{note}; give --tolerance to judge it"));
        }
    }
    checks.push(check(
        "quality",
        q_status,
        match opts.tolerance {
            Some(t) => format!("mean KL(source float || artefact) <= {t:.3e} (--tolerance)"),
            None => "KL(source float || artefact) reported; judged only with --tolerance".into(),
        },
    ));
}

/// The whole verification with the model on `dev` (all sides on the same device).
pub fn run_on(
    opts: &VerifyOptions,
    command: &[String],
    dev: &RunDevice,
    progress: &dyn Progress,
) -> Result<Report> {
    let _ = command;
    let t0 = Instant::now();
    check_bound("--tolerance", opts.tolerance)?;
    check_bound("--image-tolerance", opts.image_tolerance)?;
    if opts.exact_only && (opts.tolerance.is_some() || opts.image_tolerance.is_some()) {
        return Err(Error::usage(
            "--exact-only skips the quality forward that --tolerance / --image-tolerance bound",
        ));
    }
    let mut clock = Clock::new(t0);
    let integrity = vec![check_integrity(&opts.gguf)?, check_integrity(&opts.mmproj)?];
    clock.lap("sha256");
    let mut src = Source::open(&opts.checkpoint, opts.vision_tower.as_deref())?;
    let art = GgufWeights::open(&opts.gguf, &opts.mmproj)?;
    let mut reasons = vec![];
    let mut checks = vec![];

    integrity_step(&integrity, &mut checks, &mut reasons);
    let imatrix: Vec<String> = [&art.llm, &art.mmproj]
        .iter()
        .flat_map(|g| exactness::imatrix_keys(g))
        .collect();
    let (header, shapes_differ) = header_step(&mut src, &art, &mut checks, &mut reasons, progress);
    clock.lap("header");
    let imatrix_note = (!imatrix.is_empty()).then(|| {
        format!(
            "quantized with an importance matrix ({}): its bytes cannot be re-derived without that matrix, so exactness is not checked and the verdict rests on the quality bound (--tolerance)",
            imatrix.join(", ")
        )
    });
    let (tensors, proven) = tensor_step(
        progress,
        &src,
        &art,
        imatrix_note.is_some(),
        &mut checks,
        &mut reasons,
    )?;
    clock.lap("tensor bytes");
    // 4. Forwards: artefact, expected (exactness), float source (quality), over every probe.
    let effective = |mut hp: ModelHParams| {
        hp.clip.n_layer = hp.clip.blocks_needed();
        hp
    };
    let hp_src = effective(src.hparams.clone());
    let hp_art = art.hparams().map(effective);
    let probes_in = probes(opts, &art, &hp_src)?;
    clock.lap("probes");
    let n_probes = probes_in.len();
    let tag = |i: usize| {
        if n_probes > 1 {
            format!("probe {}: ", i + 1)
        } else {
            String::new()
        }
    };
    let n_weights = src.rows.len() as u64 * n_probes as u64;
    // One side over all probes (on CUDA its weights are uploaded once and dropped after it).
    let run_side = |ws: &dyn WeightSource,
                    hp: &ModelHParams,
                    art_ids: bool,
                    what: &str|
     -> Result<Vec<Outputs>> {
        progress.start(what, n_weights, Unit::Tensors);
        let ws = Counted {
            inner: ws,
            progress,
        };
        let ws = &ws;
        let mut outs = vec![];
        for p in &probes_in {
            let ids = if art_ids { &p.art_ids } else { &p.ids };
            let r = match dev {
                RunDevice::Cpu => forward(&crate::cpu::CpuBackend, ws, hp, &p.pv, ids),
                RunDevice::Cuda(c) => forward(c.as_ref(), ws, hp, &p.pv, ids),
            };
            match r.and_then(outputs) {
                Ok(o) => outs.push(o),
                Err(e) => {
                    if let Some(c) = dev.cuda() {
                        c.clear_weights();
                    }
                    return Err(e);
                }
            }
        }
        if let Some(c) = dev.cuda() {
            c.clear_weights();
        }
        progress.finish();
        Ok(outs)
    };

    // Why the artefact forward cannot run, if it cannot.
    let mut art_blocked: Option<String> = None;
    // A differing value (rope theta, an epsilon) is a named failure, and the artefact forward
    // still runs with the artefact's values so the effect is measured; differing shapes stop it.
    let hp_art = match hp_art {
        Ok(h) => {
            let d = crate::convert::hparams_table::hparam_diffs(&hp_src, &h);
            for x in &d {
                reasons.push(format!("hyper-parameter {x}"));
            }
            if !same_shapes(&hp_src, &h) {
                art_blocked = Some(format!("hyper-parameters differ ({})", d.join("; ")));
            }
            h
        }
        // An artefact whose hyper-parameters cannot be read cannot be run at all (exit 2).
        Err(e) => return Err(e),
    };
    for (i, p) in probes_in.iter().enumerate() {
        if let Some(why) = &p.art_ids_problem {
            reasons.push(format!("{}{why}", tag(i)));
            if p.art_ids.len() != p.ids.len() {
                art_blocked.get_or_insert_with(|| {
                    "the artefact's vocabulary tokenizes the probe to another length".into()
                });
            }
        }
    }
    if shapes_differ {
        art_blocked.get_or_insert_with(|| {
            "tensors are missing from the artefact or have other shapes".into()
        });
    }
    let road = tensors.roads.values().next().and_then(|r| {
        exactness::INTERMEDIATES
            .iter()
            .find(|v| v.map_or("one pass".to_string(), |t| format!("via {t}")) == *r)
            .copied()
            .flatten()
    });
    let exp = Expected {
        src: &src,
        art: Some(&art),
        proven: &proven,
        via: road,
    };
    // On the CPU the artefact and expected forwards run side by side and the expected one takes
    // the products it has in common with the artefact's (model::paired: same weight bytes, same
    // inputs bit for bit, so the same results); elsewhere, one after the other.
    let pair = art_blocked.is_none()
        && imatrix_note.is_none()
        && matches!(dev, RunDevice::Cpu)
        && share_products();
    let mut sharing = None;
    // An error in the artefact forward is one the probe itself causes (as on the source side).
    let (art_out, exp_out) = match &art_blocked {
        None if pair => {
            // The bar follows the artefact side, which sets the pace: the expected side waits
            // for it, and fetches no weight for the products it takes.
            let what = "forwards 1-2/3, artefact and expected side by side";
            progress.start(what, n_weights, Unit::Tensors);
            let a_ws = Counted {
                inner: &art,
                progress,
            };
            let (mut a_outs, mut e_outs) = (vec![], vec![]);
            let mut total = model::paired::Sharing::default();
            for p in &probes_in {
                let (a, e, sh) = model::paired::run(
                    &crate::cpu::CpuBackend,
                    |b| forward(b, &a_ws, &hp_art, &p.pv, &p.art_ids),
                    |b| forward(b, &exp, &hp_src, &p.pv, &p.ids),
                );
                a_outs.push(a.and_then(outputs)?);
                e_outs.push(e.and_then(outputs)?);
                total.shared += sh.shared;
                total.computed += sh.computed;
            }
            progress.finish();
            clock.lap("artefact and expected forwards");
            sharing = Some(total);
            (Some(a_outs), Some(e_outs))
        }
        None => {
            let out = run_side(&art, &hp_art, true, "forward 1/3, artefact")?;
            clock.lap("artefact forward");
            (Some(out), None)
        }
        Some(_) => (None, None),
    };
    let blocked = art_blocked
        .clone()
        .unwrap_or_else(|| "the artefact forward did not run".into());
    let exact = match (&art_out, &imatrix_note) {
        (_, Some(_)) => Rows::not(
            "importance matrix: the expected model cannot be re-derived",
            n_probes,
        ),
        (None, _) => Rows::not(&blocked, n_probes),
        (Some(a), None) => match exp_out {
            Some(e) => Rows::compare(&e, "expected", a, false, &tag, &mut reasons),
            None => {
                let e = run_side(&exp, &hp_src, false, "forward 2/3, expected")?;
                let rows = Rows::compare(&e, "expected", a, false, &tag, &mut reasons);
                clock.lap("expected forward");
                rows
            }
        },
    };
    exact_step(
        &exact,
        probes_in.iter().any(|p| p.has_image),
        imatrix_note.is_some(),
        sharing,
        &mut checks,
        &mut reasons,
    );

    // 5. Quality against the float source.
    let (quality, src_out) = match (&art_out, opts.exact_only) {
        (_, true) => (Rows::not("--exact-only", n_probes), None),
        (None, false) => (Rows::not(&blocked, n_probes), None),
        (Some(a), false) => {
            let s = run_side(&src, &hp_src, false, "forward 3/3, float source")?;
            let rows = Rows::compare(&s, "source", a, true, &tag, &mut reasons);
            clock.lap("source forward");
            // The logits are kept only to be dumped (at 7B each side's are 100 MB).
            (rows, opts.dump_logits.is_some().then_some(s))
        }
    };
    quality_step(
        opts,
        &quality,
        imatrix_note.as_deref(),
        &mut checks,
        &mut reasons,
    );

    if let Some(dir) = &opts.dump_logits {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let dump = |name: &str, o: &Outputs| {
            crate::formats::npy::write_f32(
                dir.join(name),
                &[o.logits.len() / o.vocab.max(1), o.vocab],
                &o.logits,
            )
        };
        if let Some(o) = &src_out {
            dump("source.npy", &pool(o))?;
        }
        if let Some(o) = &art_out {
            dump("artefact.npy", &pool(o))?;
        }
    }
    clock.lap("report");
    if let Some(b) = dev.cuda() {
        progress.warn(&b.memory_report());
    }
    let ft_name = |g: &crate::formats::gguf::GgufFile| {
        file_type_of(g)
            .map(|f| f.name().to_string())
            .unwrap_or_else(|| "unknown".into())
    };
    Ok(Report {
        schema: REPORT_SCHEMA.into(),
        checkpoint: opts.checkpoint.clone(),
        gguf: opts.gguf.clone(),
        mmproj: opts.mmproj.clone(),
        llm_file_type: ft_name(&art.llm),
        mmproj_file_type: ft_name(&art.mmproj),
        n_positions: probes_in.iter().map(|p| p.n_pos).sum(),
        probes: probes_in
            .iter()
            .enumerate()
            .map(|(i, p)| Probe {
                image: p.image.clone(),
                prompt: p.prompt.clone(),
                n_positions: p.n_pos,
                n_image_positions: if p.has_image {
                    hp_src.clip.n_patches()
                } else {
                    0
                },
                exact_image_embeddings: exact.per_probe[i].0.clone(),
                exact_logits: exact.per_probe[i].1.clone(),
                quality_image_embeddings: quality.per_probe[i].0.clone(),
                quality_logits: quality.per_probe[i].1.clone(),
            })
            .collect(),
        integrity,
        checks,
        header_mismatches: header,
        tensors,
        exact_image_embeddings: exact.emb.clone(),
        exact_logits: exact.logits.clone(),
        exact_bound_rel_rms: EXACT_REL_RMS_BOUND,
        exact_shared_products: sharing,
        quality_image_embeddings: quality.emb.clone(),
        quality_logits: quality.logits.clone(),
        tolerance_kl_mean: opts.tolerance,
        tolerance_image_rel_rms: opts.image_tolerance,
        imatrix: imatrix_note,
        passed: reasons.is_empty(),
        reasons: dedup(reasons),
        device: dev.name().into(),
        seconds: t0.elapsed().as_secs_f64(),
        stages: clock.stages,
    })
}

/// Wall time per step of a run: each `lap` files the time since the previous one.
struct Clock {
    last: Instant,
    stages: Vec<Stage>,
}

impl Clock {
    fn new(start: Instant) -> Self {
        Clock {
            last: start,
            stages: vec![],
        }
    }
    fn lap(&mut self, name: &str) {
        let now = Instant::now();
        self.stages.push(Stage {
            name: name.into(),
            seconds: (now - self.last).as_secs_f64(),
        });
        self.last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::recipe::{permute_rows, Transform};
    use candle_core::Device;

    /// The plan's layout with a faulty Q/K permutation: what a wrong plan would write (and then
    /// match byte for byte, so only the forward against the expected model can tell).
    struct WrongPlan<'a> {
        src: &'a Source,
        /// Heads the faulty plan permutes K with (None: Q/K left as stored).
        k_heads: Option<usize>,
    }

    impl WeightSource for WrongPlan<'_> {
        fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
            let r = self.src.row(name).expect("a planned tensor");
            let t = self.src.store(r.store).get(&r.row.src)?;
            let (rows, cols) = (t.shape[0], t.shape[1..].iter().product());
            let heads = match (r.row.transform, self.k_heads) {
                (Some(Transform::PermuteK), Some(h)) => Some(h),
                (Some(Transform::PermuteQ), Some(_)) => Some(self.src.hparams.llama.n_head),
                _ => None,
            };
            let data = match heads {
                Some(h) => permute_rows(&t.data, rows, cols, h, t.ty.type_size()).into(),
                None => t.data,
            };
            Ok(RawTensor {
                ty: t.ty,
                shape: t.shape,
                data,
            })
        }
        fn has(&self, name: &str) -> bool {
            self.src.row(name).is_some()
        }
    }

    fn logits(ws: &dyn WeightSource, src: &Source, ids: &[i64]) -> Vec<f32> {
        let pv = Tensor::zeros((1, 3, 2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let (_, l) = forward(&crate::cpu::CpuBackend, ws, &src.hparams, &pv, ids).unwrap();
        l.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// The expected model takes a proven Q/K tensor from the artefact, its rows put back in the
    /// checkpoint's order: byte for byte what encoding the stored tensor again gives (one-pass
    /// files of three types), and only for those tensors, and only once proven.
    #[test]
    fn unpermuted_artefact_rows_are_the_stored_tensor_encoded() {
        use crate::convert::from_checkpoint::{run, ConvertOptions};
        use crate::ground::dtype::FileType;
        let ck = Path::new("fixtures/tiny-llava-mmfuser");
        let tower = Some(Path::new("fixtures/tiny-clip"));
        let src = Source::open(ck, tower).unwrap();
        let dir = tempfile::tempdir().unwrap();
        for ft in [
            FileType::MostlyQ4KM,
            FileType::MostlyQ8_0,
            FileType::MostlyF16,
        ] {
            let opts = ConvertOptions {
                checkpoint: ck.into(),
                vision_tower: tower.map(Into::into),
                out_dir: dir.path().join(ft.name()),
                file_type: ft,
                vision_type: None,
                name: None,
                allow_nonfinite: false,
                command_line: vec![],
            };
            let sum = run(&opts, &crate::ground::progress::Silent).unwrap();
            let path = |kind| {
                sum.outputs
                    .iter()
                    .find(|o| o.kind == kind)
                    .map(|o| o.path.clone())
                    .unwrap()
            };
            let art =
                GgufWeights::open(&path(ArtefactKind::Llm), &path(ArtefactKind::Mmproj)).unwrap();
            let (_, proven) = exactness::check_tensors(&src, &art, &|_| {}).unwrap();
            let exp = Expected {
                src: &src,
                art: Some(&art),
                proven: &proven,
                via: None,
            };
            let mut moved = 0;
            for r in &src.rows {
                let name = &r.row.dst;
                let ty = art.raw(name).unwrap().ty;
                let got = exp.unpermuted(name);
                let art_at = art.stored_at(name).unwrap();
                if r.row.transform.is_none() {
                    assert!(got.is_none(), "{name}");
                    // Read from the artefact itself: its place, rows in order.
                    assert_eq!(exp.stored_at(name), Some(art_at), "{name}");
                    continue;
                }
                // The artefact's place, with the rows' order undone.
                let order = src.transform_order(r, r.row.shape[0]).unwrap();
                assert_eq!(
                    exp.stored_at(name),
                    Some(crate::model::StoredAt {
                        rows: Some(order),
                        ..art_at
                    }),
                    "{name}"
                );
                let want = exactness::emit_as_stored(&src, r, ty, None).unwrap();
                assert!(got.as_ref() == Some(&want), "{ft:?} {name}");
                assert_eq!(exp.raw(name).unwrap().data.as_ref(), &want[..]);
                // Not proven: encoded again, never taken from the artefact.
                let unproven = Expected {
                    proven: &HashSet::new(),
                    ..exp
                };
                assert!(unproven.unpermuted(name).is_none());
                assert!(unproven.stored_at(name).is_none());
                moved += 1;
            }
            assert_eq!(moved, 2 * src.hparams.llama.n_layer, "{ft:?}");
        }
    }

    /// The expected model runs under the source's semantics (Q/K rows as stored, rotate_half
    /// rope), so it agrees with the plan's layout (permuted rows, interleaved rope) within the
    /// bound, and a plan with a wrong permutation fails the forward comparison even though its
    /// artefact would match the plan's own bytes.
    #[test]
    fn wrong_permutation_in_the_plan_fails_the_forward_comparison() {
        let src = Source::open(
            Path::new("fixtures/tiny-llava-mmfuser"),
            Some(Path::new("fixtures/tiny-clip")),
        )
        .unwrap();
        let hp = &src.hparams.llama;
        assert!(
            hp.n_head_kv < hp.n_head,
            "the fixture must use GQA for the K case"
        );
        let ids: Vec<i64> = (0..40).map(|i| (i * 7 + 1) % hp.n_vocab as i64).collect();
        let none = HashSet::new();
        let expected = Expected {
            src: &src,
            art: None,
            proven: &none,
            via: None,
        };
        let want = logits(&expected, &src, &ids);
        let plan = compare(&want, &logits(&src, &src, &ids)).rel_rms;
        println!("correct plan: logits relative RMS {plan:.3e}");
        // Not merely under the bound: both sides sum in one order (see EXACT_REL_RMS_BOUND).
        assert_eq!(
            plan, 0.0,
            "the correct plan must reproduce the expected model exactly"
        );
        for (what, k_heads) in [
            (
                "K permuted with n_head instead of n_head_kv",
                Some(hp.n_head),
            ),
            ("Q/K not permuted", None),
        ] {
            let wrong = WrongPlan { src: &src, k_heads };
            let d = compare(&want, &logits(&wrong, &src, &ids)).rel_rms;
            println!(
                "{what}: logits relative RMS {d:.3e}, {:.0}x the bound",
                d / EXACT_REL_RMS_BOUND
            );
            assert!(d > 100.0 * EXACT_REL_RMS_BOUND, "{what}: {d}");
        }
    }
}
