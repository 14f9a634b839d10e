//! The figures verify reports: element-wise differences of two sides' outputs and the logit
//! distributions' KL divergence (as llama-perplexity's `--kl-divergence` reports them). Pure
//! functions of the numbers.
use serde::Serialize;

/// Differences of two equally shaped matrices (all values finite: see `first_nonfinite_f32`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Metrics {
    pub max_abs_diff: f64,
    pub rel_rms: f64,
    pub cosine: f64,
}

/// Logit-distribution figures over positions, as llama-perplexity's `--kl-divergence` reports them.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct KlStats {
    pub kl_mean: f64,
    pub kl_median: f64,
    pub kl_p99: f64,
    pub kl_p999: f64,
    pub kl_max: f64,
    /// Share of positions whose most likely token is the same.
    pub top1_agreement: f64,
    /// Mean over positions of p_artefact(t) - p_source(t), t the source's most likely token.
    pub delta_p_mean: f64,
}

/// (row, column) of the first NaN/Inf of a [rows, cols] matrix.
pub fn first_nonfinite_f32(x: &[f32], cols: usize) -> Option<(usize, usize)> {
    x.iter()
        .position(|v| !v.is_finite())
        .map(|i| (i / cols.max(1), i % cols.max(1)))
}

/// Differences of two equally long, finite vectors (`a` the reference).
pub fn compare(a: &[f32], b: &[f32]) -> Metrics {
    let (mut dd, mut aa, mut bb, mut ab, mut max_abs) = (0f64, 0f64, 0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        dd += (x - y) * (x - y);
        aa += x * x;
        bb += y * y;
        ab += x * y;
        max_abs = max_abs.max((x - y).abs());
    }
    Metrics {
        max_abs_diff: max_abs,
        rel_rms: if aa > 0.0 {
            (dd / aa).sqrt()
        } else {
            dd.sqrt()
        },
        cosine: if aa > 0.0 && bb > 0.0 {
            ab / (aa.sqrt() * bb.sqrt())
        } else if aa == 0.0 && bb == 0.0 {
            1.0
        } else {
            0.0
        },
    }
}

/// The `q` quantile (0..=1) of sorted values, interpolating linearly between neighbours (numpy's
/// default `percentile` method).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// KL(softmax(source) || softmax(artefact)) per position and the figures over positions
/// (finite [rows, cols] logits; `src` the reference).
pub fn kl_stats(src: &[f32], art: &[f32], cols: usize) -> KlStats {
    let rows = src.len() / cols.max(1);
    let mut kls = Vec::with_capacity(rows);
    let (mut top1, mut dp) = (0usize, 0f64);
    for r in 0..rows {
        let (ra, rb) = (
            &src[r * cols..(r + 1) * cols],
            &art[r * cols..(r + 1) * cols],
        );
        let (la, lb) = (log_softmax(ra), log_softmax(rb));
        // Rounding can leave a tiny negative sum for equal distributions; KL itself is >= 0.
        let kl: f64 = la.iter().zip(&lb).map(|(p, q)| p.exp() * (p - q)).sum();
        kls.push(kl.max(0.0));
        let (ta, tb) = (argmax(ra), argmax(rb));
        top1 += (ta == tb) as usize;
        dp += lb[ta].exp() - la[ta].exp();
    }
    let n = rows.max(1) as f64;
    let mean = kls.iter().sum::<f64>() / n;
    kls.sort_by(f64::total_cmp);
    KlStats {
        kl_mean: mean,
        kl_median: quantile(&kls, 0.5),
        kl_p99: quantile(&kls, 0.99),
        kl_p999: quantile(&kls, 0.999),
        kl_max: kls.last().copied().unwrap_or(0.0),
        top1_agreement: top1 as f64 / n,
        delta_p_mean: dp / n,
    }
}

fn log_softmax(x: &[f32]) -> Vec<f64> {
    let max = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let lse = max + x.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
    x.iter().map(|&v| v as f64 - lse).collect()
}

/// Index of the largest value (the first of equals).
fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}
