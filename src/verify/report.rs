//! What verify says: the report (its JSON form is schemas/verify-report.schema.json) and the
//! table the CLI prints.
use super::exactness::TensorCheck;
use super::metrics::{KlStats, Metrics};
use serde::Serialize;
use std::collections::HashSet;
use std::path::PathBuf;

/// One comparison row: compared (with figures) or not, and why not.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// "compared" or "not compared".
    pub status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl: Option<KlStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why_not: Option<String>,
}

impl Row {
    pub(super) fn not(why: impl Into<String>) -> Row {
        Row {
            status: "not compared".into(),
            metrics: None,
            kl: None,
            why_not: Some(why.into()),
        }
    }
    pub(super) fn of(metrics: Metrics, kl: Option<KlStats>) -> Row {
        Row {
            status: "compared".into(),
            metrics: Some(metrics),
            kl,
            why_not: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Integrity {
    pub path: PathBuf,
    pub sha256: String,
    /// "ok", "mismatch", "no-manifest" or "bad-manifest".
    pub status: String,
    pub manifest: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// One check that ran (or not), its bound and outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    /// "pass", "fail" or "not run".
    pub status: String,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: String,
    pub checkpoint: PathBuf,
    pub gguf: PathBuf,
    pub mmproj: PathBuf,
    pub llm_file_type: String,
    pub mmproj_file_type: String,
    /// Positions over all probes.
    pub n_positions: usize,
    /// Each probe with its own figures (the report's rows pool all probes' positions).
    pub probes: Vec<Probe>,
    pub integrity: Vec<Integrity>,
    pub checks: Vec<Check>,
    pub header_mismatches: Vec<String>,
    pub tensors: TensorCheck,
    /// Artefact forward vs expected forward (exactness).
    pub exact_image_embeddings: Row,
    pub exact_logits: Row,
    pub exact_bound_rel_rms: f64,
    /// When the artefact and expected forwards ran side by side (`model::paired`): the expected
    /// model's products taken from the artefact forward, and those it computed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exact_shared_products: Option<crate::model::paired::Sharing>,
    /// Artefact forward vs float source forward (quality).
    pub quality_image_embeddings: Row,
    pub quality_logits: Row,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tolerance_kl_mean: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tolerance_image_rel_rms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub imatrix: Option<String>,
    pub passed: bool,
    pub reasons: Vec<String>,
    pub device: String,
    pub seconds: f64,
    /// Where the seconds went, step by step in the order they ran (for benchmarks): sha256,
    /// header, tensor bytes, probes, each forward that ran with its comparison, report.
    pub stages: Vec<Stage>,
}

/// One step of a verify run and its wall time.
#[derive(Debug, Clone, Serialize)]
pub struct Stage {
    pub name: String,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    pub image: String,
    pub prompt: String,
    pub n_positions: usize,
    pub n_image_positions: usize,
    pub exact_image_embeddings: Row,
    pub exact_logits: Row,
    pub quality_image_embeddings: Row,
    pub quality_logits: Row,
}

pub const REPORT_SCHEMA: &str = "mmfuser-convert/verify-report/v2";

pub(super) fn check(name: &str, status: &str, detail: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        status: status.into(),
        detail: detail.into(),
    }
}

/// The reasons in order, each once (the exact and quality comparisons can both name one NaN).
pub(super) fn dedup(reasons: Vec<String>) -> Vec<String> {
    let mut seen = HashSet::new();
    reasons
        .into_iter()
        .filter(|r| seen.insert(r.clone()))
        .collect()
}

fn render_row(name: &str, r: &Row) -> String {
    let Some(m) = &r.metrics else {
        return format!(
            "{name:<20} not compared: {}\n",
            r.why_not.as_deref().unwrap_or("-")
        );
    };
    let mut s = format!(
        "{name:<20} max|diff| {:.3e}  rel RMS {:.3e}  cosine {:.8}\n",
        m.max_abs_diff, m.rel_rms, m.cosine
    );
    if let Some(k) = &r.kl {
        s += &format!(
            "{:<20} KL mean {:.3e}  median {:.3e}  p99 {:.3e}  p99.9 {:.3e}  max {:.3e}  top-1 {:.3}  mean dp {:+.3e}\n",
            "", k.kl_mean, k.kl_median, k.kl_p99, k.kl_p999, k.kl_max, k.top1_agreement, k.delta_p_mean
        );
    }
    s
}

/// The human-readable report.
pub fn render(r: &Report) -> String {
    let mut s = String::new();
    s += &format!(
        "verify  {} ({}) + {} ({})\n",
        r.gguf.display(),
        r.llm_file_type,
        r.mmproj.display(),
        r.mmproj_file_type
    );
    s += &format!("source  {}\n", r.checkpoint.display());
    for (i, p) in r.probes.iter().enumerate() {
        s += &format!(
            "probe {}  image: {}; {} positions ({} image)\n",
            i + 1,
            p.image,
            p.n_positions,
            p.n_image_positions
        );
    }
    for i in &r.integrity {
        s += &format!("sha256  {}  {}\n", i.status, i.path.display());
    }
    if !r.tensors.roads.is_empty() {
        let roads: Vec<String> = r
            .tensors
            .roads
            .iter()
            .map(|(f, x)| format!("{f}: {x}"))
            .collect();
        s += &format!(
            "road    quantized tensors reproduced {}\n",
            roads.join(", ")
        );
    }
    if let Some(n) = &r.imatrix {
        s += &format!("note    {n}\n");
    }
    s += "\nexactness (artefact vs the source through the artefact's types)\n";
    s += &render_row("image embeddings", &r.exact_image_embeddings);
    s += &render_row("logits", &r.exact_logits);
    s += "\nquality (artefact vs the float source)\n";
    s += &render_row("image embeddings", &r.quality_image_embeddings);
    s += &render_row("logits", &r.quality_logits);
    if r.probes.len() > 1 {
        s += &format!(
            "\nper probe (the rows above pool all {} positions)\n",
            r.n_positions
        );
        for (i, p) in r.probes.iter().enumerate() {
            s += &format!("probe {}\n", i + 1);
            s += &render_row("  exact logits", &p.exact_logits);
            s += &render_row("  quality logits", &p.quality_logits);
        }
    }
    s += "\nchecks\n";
    for c in &r.checks {
        s += &format!("  {:<14} {:<9} {}\n", c.name, c.status, c.detail);
    }
    if r.passed {
        s += &format!("PASS ({:.2} s on {})\n", r.seconds, r.device);
    } else {
        for why in &r.reasons {
            s += &format!("FAIL: {why}\n");
        }
    }
    s += &format!("time    {}\n", render_stages(&r.stages));
    s
}

/// "sha256 3.1 s, header 0.2 s, ...": the stages on one line.
fn render_stages(stages: &[Stage]) -> String {
    stages
        .iter()
        .map(|t| format!("{} {:.1} s", t.name, t.seconds))
        .collect::<Vec<_>>()
        .join(", ")
}
