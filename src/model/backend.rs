//! The ops the model is written against. The model (clip / fuser / llama) only calls `Backend`
//! methods; a backend implements the ops, never the model. Activations are dense row-major f32
//! matrices `[rows, cols]` (tokens x features); multi-head layouts are the usual "heads
//! concatenated along the columns" (`[n, heads*hd]`, head h owning columns h*hd..(h+1)*hd).
//! Weights are fetched from a `WeightSource` right before the op that needs them and dropped
//! after, so a 7B model never sits in memory as f32.
use super::weights::WeightSource;
use crate::ground::error::{Error, Result};
use candle_core::Tensor;

/// A compute backend. All tensors are f32.
pub trait Backend {
    /// An activation on the backend: a row-major f32 matrix [rows, cols].
    type T: Clone;
    /// A weight matrix prepared for `linear` ([out, in]; a backend may keep it quantized).
    type W;

    fn name(&self) -> &'static str;

    // ---- moving data ------------------------------------------------------------------------
    /// Host (candle CPU, f32, any shape whose trailing dims are flattened into cols) -> backend.
    fn upload(&self, x: &Tensor) -> Result<Self::T>;
    /// Backend -> host, as a CPU candle Tensor [rows, cols].
    fn download(&self, x: &Self::T) -> Result<Tensor>;
    /// (rows, cols) of an activation.
    fn dims(&self, x: &Self::T) -> (usize, usize);
    /// A weight matrix for `linear`: PyTorch shape [out, d1, d2, ...] seen as [out, d1*d2*...].
    fn weight(&self, ws: &dyn WeightSource, name: &str) -> Result<Self::W>;
    /// (out, in) of a weight.
    fn weight_dims(&self, w: &Self::W) -> (usize, usize);
    /// Any other parameter as an activation: 1-D [n] becomes a row [1, n]; [a, b, ...] becomes
    /// [a, b*...]. Used for norm weights, biases, gammas, class/position embeddings.
    fn param(&self, ws: &dyn WeightSource, name: &str) -> Result<Self::T>;

    // ---- linear algebra ---------------------------------------------------------------------
    /// x [n, in] @ w^T [in, out] (+ bias [1, out]) -> [n, out].
    fn linear(&self, x: &Self::T, w: &Self::W, bias: Option<&Self::T>) -> Result<Self::T>;
    /// `linear` with the weight `name` of `ws`, held for this call only. By default it goes
    /// through `weight`; a backend may compute on the stored bytes instead (the CPU does for
    /// block-quantized weights).
    fn linear_from(
        &self,
        ws: &dyn WeightSource,
        name: &str,
        x: &Self::T,
        bias: Option<&Self::T>,
    ) -> Result<Self::T> {
        linear_via_weight(self, ws, name, x, bias)
    }
    /// Scaled dot-product attention, scale 1/sqrt(hd), softmax in f32.
    /// q [n, n_head*hd], k and v [m, n_head_kv*hd]; query head h reads kv head h / (n_head/n_head_kv)
    /// (GQA). `causal`: query i (position m-n+i) sees keys 0..=m-n+i. Returns [n, n_head*hd].
    fn attention(
        &self,
        q: &Self::T,
        k: &Self::T,
        v: &Self::T,
        n_head: usize,
        n_head_kv: usize,
        causal: bool,
    ) -> Result<Self::T>;

    // ---- normalisation ----------------------------------------------------------------------
    /// Per row: (x - mean) / sqrt(var + eps) * w + b (biased variance); w, b [1, cols].
    fn layer_norm(&self, x: &Self::T, w: &Self::T, b: &Self::T, eps: f32) -> Result<Self::T>;
    /// Per row: x / sqrt(mean(x^2) + eps) * w; w [1, cols].
    fn rms_norm(&self, x: &Self::T, w: &Self::T, eps: f32) -> Result<Self::T>;
    /// Softmax over each contiguous group of `group` columns of every row.
    fn softmax_groups(&self, x: &Self::T, group: usize) -> Result<Self::T>;

    // ---- element-wise -----------------------------------------------------------------------
    /// a + b; b has a's shape or is a row [1, cols] broadcast over rows.
    fn add(&self, a: &Self::T, b: &Self::T) -> Result<Self::T>;
    /// a * b; b has a's shape or is a row [1, cols] broadcast over rows.
    fn mul(&self, a: &Self::T, b: &Self::T) -> Result<Self::T>;
    /// x * sigmoid(1.702 x) (CLIP's quick_gelu).
    fn quick_gelu(&self, x: &Self::T) -> Result<Self::T>;
    /// 0.5 x (1 + erf(x / sqrt 2)) (exact GELU, torch.nn.GELU()).
    fn gelu_erf(&self, x: &Self::T) -> Result<Self::T>;
    /// silu(gate) * up (LLaMA's SwiGLU).
    fn silu_mul(&self, gate: &Self::T, up: &Self::T) -> Result<Self::T>;

    // ---- positional / sampling --------------------------------------------------------------
    /// Rotary embedding, interleaved-pairs form (ggml "NORM" rope) on x [n, n_head*hd]: row t is at
    /// position pos0 + t; within each head, (x[2i], x[2i+1]) is rotated by pos * theta^(-2i/hd).
    /// On Q/K weights permuted as llama.cpp's converter does, this equals HF's rotate_half rope.
    fn rope_interleaved(
        &self,
        x: &Self::T,
        n_head: usize,
        pos0: usize,
        theta: f32,
    ) -> Result<Self::T>;
    /// Rotary embedding, rotate_half form (HF LLaMA, ggml "NEOX" rope) on x [n, n_head*hd]: within
    /// each head, (x[i], x[i + hd/2]) is rotated by pos * theta^(-2i/hd), and the rotated pair is
    /// written to columns (2i, 2i+1). Writing pairs side by side is a permutation of the head's
    /// columns; applied to Q and K alike it leaves every q.k of attention unchanged (HF's model
    /// exactly), and it makes the attention sum in the order of the interleaved road: on Q/K rows
    /// as HF stores them this gives bit for bit what `rope_interleaved` gives on llama.cpp's
    /// permuted rows, so verify's two sides differ by nothing a correct conversion does.
    fn rope_neox(&self, x: &Self::T, n_head: usize, pos0: usize, theta: f32) -> Result<Self::T>;
    /// Multi-scale deformable attention core (Deformable-DETR), fused; see `msda_core`.
    /// value [sum_l H_l*W_l, C] (levels stacked row-major in order), offsets [Nq, M*L*P*2]
    /// (the raw sampling_offsets output, (x, y) last), weights [Nq, M*L*P] already softmaxed over
    /// L*P per head; query t's reference point is the centre of cell t of the ref_grid (rows, cols).
    /// Returns [Nq, C] (heads concatenated, before output_proj).
    #[allow(clippy::too_many_arguments)]
    fn msda(
        &self,
        value: &Self::T,
        levels: &[(usize, usize)],
        offsets: &Self::T,
        weights: &Self::T,
        ref_grid: (usize, usize),
        n_heads: usize,
        n_points: usize,
    ) -> Result<Self::T>;

    // ---- shape ------------------------------------------------------------------------------
    /// Rows start..start+len.
    fn rows(&self, x: &Self::T, start: usize, len: usize) -> Result<Self::T>;
    /// Stack along rows (all with the same number of columns).
    fn concat_rows(&self, xs: &[&Self::T]) -> Result<Self::T>;

    // ---- KV cache ---------------------------------------------------------------------------
    /// A KV cache buffer with `new`'s rows after the first `used` rows of `cache` (None: a new
    /// cache). By default the exact concatenation (a copy of the cache per call); a backend may
    /// keep spare rows and write the new ones in place (the CPU does).
    fn kv_append(&self, cache: Option<(Self::T, usize)>, new: &Self::T) -> Result<Self::T> {
        match cache {
            None => Ok(new.clone()),
            Some((c, used)) => {
                let prev = self.kv_view(&c, used)?;
                self.concat_rows(&[&prev, new])
            }
        }
    }
    /// The first `used` rows of a KV cache buffer, for attention.
    fn kv_view(&self, cache: &Self::T, used: usize) -> Result<Self::T> {
        if self.dims(cache).0 == used {
            Ok(cache.clone())
        } else {
            self.rows(cache, 0, used)
        }
    }
}

/// [`Backend::linear_from`] through [`Backend::weight`], checking the input width.
pub fn linear_via_weight<B: Backend + ?Sized>(
    b: &B,
    ws: &dyn WeightSource,
    name: &str,
    x: &B::T,
    bias: Option<&B::T>,
) -> Result<B::T> {
    let wt = b.weight(ws, name)?;
    let (_, win) = b.weight_dims(&wt);
    if b.dims(x).1 != win {
        return Err(Error::tensor(
            ws.origin_of(name),
            name,
            format!("input has {} columns, weight expects {win}", b.dims(x).1),
        ));
    }
    b.linear(x, &wt, bias)
}

/// The shape rules of [`Backend::attention`], shared by every backend: q [n, n_head*hd],
/// k and v [m, n_head_kv*hd], n_head a multiple of n_head_kv, and m >= n when causal.
/// Returns the head dimension, or why the shapes do not fit.
pub fn attention_head_dim(
    q: (usize, usize),
    k: (usize, usize),
    v: (usize, usize),
    n_head: usize,
    n_head_kv: usize,
    causal: bool,
) -> std::result::Result<usize, String> {
    let ((n, qc), (m, kc)) = (q, k);
    if n_head == 0
        || n_head_kv == 0
        || !qc.is_multiple_of(n_head)
        || !n_head.is_multiple_of(n_head_kv)
    {
        return Err(format!(
            "attention: {qc} columns, {n_head} heads, {n_head_kv} kv heads"
        ));
    }
    let hd = qc / n_head;
    if kc != n_head_kv * hd || v != (m, kc) || (causal && m < n) {
        return Err(format!(
            "attention: q [{n}, {qc}], k [{m}, {kc}], v [{}, {}]",
            v.0, v.1
        ));
    }
    Ok(hd)
}
