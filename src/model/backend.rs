//! The ops the model is written against, and the front that checks their shapes.
//!
//! Design:
//! - `Backend` is the contract. The model (clip / fuser / llama) only calls `Backend` methods;
//!   a backend implements the ops, never the model, and knows no verdicts (it computes or says
//!   why it cannot, as an `Err`).
//! - `Checked` is the one front: it implements `Backend` by checking every op's operand shapes
//!   against the shape rules below (attention's head split, linear's input width and bias,
//!   add/mul's row broadcast, silu_mul's equal shapes, the norms' weight widths, softmax groups,
//!   rope heads, msda's value / offsets / weights, the rows range, concat's columns, the KV
//!   cache's rows) and then calling the backend. A mismatch is `"<backend> backend: <why>"`.
//!   The model's entry points (`encode_image_with`, `llama::decode`, `llama::decode_cached`)
//!   wrap their backend in it, so a backend computes on shapes known to fit and does not check
//!   them again: each rule is written once, here.
//! - Two exceptions. `linear_from`'s weight is only known once the backend fetches it, so its
//!   width is checked where it is fetched (`linear_via_weight`, the CPU's stored-bytes road).
//!   And a CUDA kernel cannot bounds-check: the CUDA ops whose kernels index operands by these
//!   shapes keep a guard that calls the same rule function (the ops are public; a wrong shape
//!   would read past a device buffer).
//! - `profile::Profiled` implements `Backend` by timing each call of any backend: `sync` (a
//!   no-op by default; CUDA waits for its stream) before and after each op, so the time is the
//!   op's own; the `*_label` hooks let a backend name the road a call takes.
//!
//! Activations are dense row-major f32 matrices `[rows, cols]` (tokens x features); multi-head
//! layouts are the usual "heads concatenated along the columns" (`[n, heads*hd]`, head h owning
//! columns h*hd..(h+1)*hd). Weights are fetched from a `WeightSource` right before the op that
//! needs them and dropped after, so a 7B model never sits in memory as f32.
use super::weights::WeightSource;
use crate::ground::error::{Error, Result};
use candle_core::{Storage, Tensor};

/// How a KV cache stores keys and values: f32 (the values the layer computed, so decoding with
/// the cache gives the logits of the whole sequence recomputed), or f16 as llama.cpp stores them
/// (half the memory and half the bytes each decode step reads, each value rounded to f16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvType {
    #[default]
    F32,
    F16,
}

impl KvType {
    /// Every type (their names are `--kv-cache`'s values and the generate report's).
    pub const ALL: [KvType; 2] = [KvType::F32, KvType::F16];

    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::F16 => "f16",
        }
    }

    pub fn from_name(name: &str) -> Option<KvType> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }
}

/// Each value of a host tensor rounded to the nearest f16 (ties to even), as f32.
pub fn round_to_f16(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(candle_core::DType::F16)?
        .to_dtype(candle_core::DType::F32)?)
}

/// A compute backend. All tensors are f32 (a CPU KV cache may hold f16, see `kv_append`).
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
    /// cache), the rows stored as `ty` says (`KvType::F16`: each value rounded to the nearest
    /// f16, what `attention` then reads). By default the exact concatenation (a copy of the cache
    /// per call), f16 values rounded on the host and kept as f32; a backend may keep spare rows
    /// and write the new ones in place, and keep f16 as f16 (the CPU does both).
    fn kv_append(
        &self,
        cache: Option<(Self::T, usize)>,
        new: &Self::T,
        ty: KvType,
    ) -> Result<Self::T> {
        let rounded;
        let new = match ty {
            KvType::F32 => new,
            KvType::F16 => {
                rounded = self.upload(&round_to_f16(&self.download(new)?)?)?;
                &rounded
            }
        };
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

    // ---- timing (`profile::Profiled`) -------------------------------------------------------
    /// Wait until every op issued so far has finished. A backend that queues work (CUDA) waits
    /// for it; the default is for backends whose ops are done when they return.
    fn sync(&self) -> Result<()> {
        Ok(())
    }
    /// What a profile files a `linear` of x by w under. A backend may name the road it takes.
    fn linear_label(&self, x: &Self::T, w: &Self::W) -> String {
        let _ = (x, w);
        "linear".into()
    }
    /// What a profile files a `linear_from` of the weight `name` under (see `linear_label`).
    /// It must not fetch the weight: it is asked before the call.
    fn linear_from_label(&self, ws: &dyn WeightSource, name: &str, x: &Self::T) -> String {
        let _ = (ws, name, x);
        "linear".into()
    }
    /// What a profile files an `attention` of q over k with `n_head` heads under.
    fn attention_label(&self, q: &Self::T, k: &Self::T, n_head: usize) -> String {
        let _ = (q, k, n_head);
        "attention".into()
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

// ---- the shape rules ------------------------------------------------------------------------
// Each returns why the shapes (rows, cols) do not fit the op; `Checked` turns that into the
// error, and the CUDA ops call the same functions to guard their kernels' reads.

type Dims = (usize, usize);
type Rule<T = ()> = std::result::Result<T, String>;

fn show((r, c): Dims) -> String {
    format!("[{r}, {c}]")
}

/// `linear`: x [n, in] by a weight [out, in], bias [1, out].
pub fn linear_shapes(x: Dims, w: Dims, bias: Option<Dims>) -> Rule {
    if x.1 != w.1 {
        return Err(format!(
            "linear: input {} does not match weight {}",
            show(x),
            show(w)
        ));
    }
    match bias {
        Some(b) if b != (1, w.0) => Err(format!("linear: bias {} for {} outputs", show(b), w.0)),
        _ => Ok(()),
    }
}

/// `add` / `mul`: b has a's shape or is a row of a's width.
pub fn broadcast_shapes(op: &str, a: Dims, b: Dims) -> Rule {
    if a.1 != b.1 || (a.0 != b.0 && b.0 != 1) {
        return Err(format!(
            "{op}: shapes {} and {} do not match",
            show(a),
            show(b)
        ));
    }
    Ok(())
}

/// `silu_mul`: gate and up of one shape.
pub fn same_shapes(op: &str, a: Dims, b: Dims) -> Rule {
    if a != b {
        return Err(format!("{op}: {} vs {}", show(a), show(b)));
    }
    Ok(())
}

/// A norm's weight or bias (`what`): one row as wide as x.
pub fn norm_param(what: &str, x: Dims, p: Dims) -> Rule {
    if p != (1, x.1) {
        return Err(format!("{what}: expected [1, {}], found {}", x.1, show(p)));
    }
    Ok(())
}

/// `softmax_groups`: groups of `group` columns tile every row.
pub fn softmax_groups_shape(x: Dims, group: usize) -> Rule {
    if group == 0 || !x.1.is_multiple_of(group) {
        return Err(format!("softmax over groups of {group} in {} columns", x.1));
    }
    Ok(())
}

/// The rope ops: `n_head` heads of an even width. Returns the head width.
pub fn rope_head_dim(x: Dims, n_head: usize) -> Rule<usize> {
    let c = x.1;
    if n_head == 0 || !c.is_multiple_of(n_head) || !(c / n_head).is_multiple_of(2) {
        return Err(format!("rope: {c} columns in {n_head} heads"));
    }
    Ok(c / n_head)
}

/// `msda`: value [sum H_l*W_l, C] with C a multiple of the heads; offsets [Nq, M*L*P*2] and
/// weights [Nq, M*L*P] for the Nq = rows*cols queries of the ref grid.
pub fn msda_shapes(
    value: Dims,
    levels: &[(usize, usize)],
    offsets: Dims,
    weights: Dims,
    ref_grid: (usize, usize),
    n_heads: usize,
    n_points: usize,
) -> Rule {
    let (nv, c) = value;
    let nq = ref_grid.0 * ref_grid.1;
    let per_q = n_heads * levels.len() * n_points;
    let n_tokens: usize = levels.iter().map(|(h, w)| h * w).sum();
    if n_heads == 0 || !c.is_multiple_of(n_heads) || nv != n_tokens {
        return Err(format!(
            "msda: value {} for levels {levels:?} and {n_heads} heads",
            show(value)
        ));
    }
    if offsets != (nq, per_q * 2) || weights != (nq, per_q) {
        return Err(format!(
            "msda: offsets {} / weights {} for {nq} queries x {per_q} samples",
            show(offsets),
            show(weights)
        ));
    }
    Ok(())
}

/// `rows`: start..start+len within x's rows.
pub fn rows_range(x: Dims, start: usize, len: usize) -> Rule {
    if start > x.0 || len > x.0 - start {
        return Err(format!(
            "rows {start}..{} of a {} tensor",
            start.saturating_add(len),
            show(x)
        ));
    }
    Ok(())
}

/// `concat_rows`: at least one tensor, all of one width.
pub fn concat_shapes(xs: &[Dims]) -> Rule {
    let Some(&(_, cols)) = xs.first() else {
        return Err("concat of no tensors".into());
    };
    match xs.iter().find(|x| x.1 != cols) {
        Some(x) => Err(format!("concat: {} columns vs {cols}", x.1)),
        None => Ok(()),
    }
}

// ---- the front ------------------------------------------------------------------------------

/// The checked front of a backend: `Backend` with every op's shapes checked by the rules above
/// before the backend runs it (see the module docs). Same activations and weights as `B`.
pub struct Checked<'a, B: Backend + ?Sized>(&'a B);

impl<'a, B: Backend + ?Sized> Checked<'a, B> {
    pub fn new(b: &'a B) -> Self {
        Checked(b)
    }

    fn ensure<R>(&self, rule: Rule<R>) -> Result<R> {
        rule.map_err(|why| Error::other(format!("{} backend: {why}", self.0.name())))
    }
}

impl<B: Backend + ?Sized> Backend for Checked<'_, B> {
    type T = B::T;
    type W = B::W;

    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn upload(&self, x: &Tensor) -> Result<B::T> {
        self.0.upload(x)
    }
    fn download(&self, x: &B::T) -> Result<Tensor> {
        self.0.download(x)
    }
    fn dims(&self, x: &B::T) -> (usize, usize) {
        self.0.dims(x)
    }
    fn weight(&self, ws: &dyn WeightSource, name: &str) -> Result<B::W> {
        self.0.weight(ws, name)
    }
    fn weight_dims(&self, w: &B::W) -> (usize, usize) {
        self.0.weight_dims(w)
    }
    fn param(&self, ws: &dyn WeightSource, name: &str) -> Result<B::T> {
        self.0.param(ws, name)
    }
    fn linear(&self, x: &B::T, w: &B::W, bias: Option<&B::T>) -> Result<B::T> {
        let b = self.0;
        self.ensure(linear_shapes(
            b.dims(x),
            b.weight_dims(w),
            bias.map(|t| b.dims(t)),
        ))?;
        b.linear(x, w, bias)
    }
    /// The backend's own road: the weight's width is checked where it is fetched.
    fn linear_from(
        &self,
        ws: &dyn WeightSource,
        name: &str,
        x: &B::T,
        bias: Option<&B::T>,
    ) -> Result<B::T> {
        self.0.linear_from(ws, name, x, bias)
    }
    fn attention(
        &self,
        q: &B::T,
        k: &B::T,
        v: &B::T,
        n_head: usize,
        n_head_kv: usize,
        causal: bool,
    ) -> Result<B::T> {
        let b = self.0;
        self.ensure(attention_head_dim(
            b.dims(q),
            b.dims(k),
            b.dims(v),
            n_head,
            n_head_kv,
            causal,
        ))?;
        b.attention(q, k, v, n_head, n_head_kv, causal)
    }
    fn layer_norm(&self, x: &B::T, w: &B::T, bias: &B::T, eps: f32) -> Result<B::T> {
        let b = self.0;
        self.ensure(norm_param("layer_norm weight", b.dims(x), b.dims(w)))?;
        self.ensure(norm_param("layer_norm bias", b.dims(x), b.dims(bias)))?;
        b.layer_norm(x, w, bias, eps)
    }
    fn rms_norm(&self, x: &B::T, w: &B::T, eps: f32) -> Result<B::T> {
        let b = self.0;
        self.ensure(norm_param("rms_norm weight", b.dims(x), b.dims(w)))?;
        b.rms_norm(x, w, eps)
    }
    fn softmax_groups(&self, x: &B::T, group: usize) -> Result<B::T> {
        self.ensure(softmax_groups_shape(self.0.dims(x), group))?;
        self.0.softmax_groups(x, group)
    }
    fn add(&self, a: &B::T, b: &B::T) -> Result<B::T> {
        self.ensure(broadcast_shapes("add", self.0.dims(a), self.0.dims(b)))?;
        self.0.add(a, b)
    }
    fn mul(&self, a: &B::T, b: &B::T) -> Result<B::T> {
        self.ensure(broadcast_shapes("mul", self.0.dims(a), self.0.dims(b)))?;
        self.0.mul(a, b)
    }
    fn quick_gelu(&self, x: &B::T) -> Result<B::T> {
        self.0.quick_gelu(x)
    }
    fn gelu_erf(&self, x: &B::T) -> Result<B::T> {
        self.0.gelu_erf(x)
    }
    fn silu_mul(&self, gate: &B::T, up: &B::T) -> Result<B::T> {
        self.ensure(same_shapes("silu_mul", self.0.dims(gate), self.0.dims(up)))?;
        self.0.silu_mul(gate, up)
    }
    fn rope_interleaved(&self, x: &B::T, n_head: usize, pos0: usize, theta: f32) -> Result<B::T> {
        self.ensure(rope_head_dim(self.0.dims(x), n_head))?;
        self.0.rope_interleaved(x, n_head, pos0, theta)
    }
    fn rope_neox(&self, x: &B::T, n_head: usize, pos0: usize, theta: f32) -> Result<B::T> {
        self.ensure(rope_head_dim(self.0.dims(x), n_head))?;
        self.0.rope_neox(x, n_head, pos0, theta)
    }
    fn msda(
        &self,
        value: &B::T,
        levels: &[(usize, usize)],
        offsets: &B::T,
        weights: &B::T,
        ref_grid: (usize, usize),
        n_heads: usize,
        n_points: usize,
    ) -> Result<B::T> {
        let b = self.0;
        self.ensure(msda_shapes(
            b.dims(value),
            levels,
            b.dims(offsets),
            b.dims(weights),
            ref_grid,
            n_heads,
            n_points,
        ))?;
        b.msda(value, levels, offsets, weights, ref_grid, n_heads, n_points)
    }
    fn rows(&self, x: &B::T, start: usize, len: usize) -> Result<B::T> {
        self.ensure(rows_range(self.0.dims(x), start, len))?;
        self.0.rows(x, start, len)
    }
    fn concat_rows(&self, xs: &[&B::T]) -> Result<B::T> {
        let dims: Vec<Dims> = xs.iter().map(|x| self.0.dims(x)).collect();
        self.ensure(concat_shapes(&dims))?;
        self.0.concat_rows(xs)
    }
    /// The cache's first `used` rows and the new rows must make one matrix (the rules of `rows`
    /// and `concat_rows`, which the default road runs on the backend itself).
    fn kv_append(&self, cache: Option<(B::T, usize)>, new: &B::T, ty: KvType) -> Result<B::T> {
        if let Some((c, used)) = &cache {
            let (c, n) = (self.0.dims(c), self.0.dims(new));
            self.ensure(rows_range(c, 0, *used))?;
            self.ensure(concat_shapes(&[c, n]))?;
        }
        self.0.kv_append(cache, new, ty)
    }
    fn kv_view(&self, cache: &B::T, used: usize) -> Result<B::T> {
        self.ensure(rows_range(self.0.dims(cache), 0, used))?;
        self.0.kv_view(cache, used)
    }
    fn sync(&self) -> Result<()> {
        self.0.sync()
    }
    fn linear_label(&self, x: &B::T, w: &B::W) -> String {
        self.0.linear_label(x, w)
    }
    fn linear_from_label(&self, ws: &dyn WeightSource, name: &str, x: &B::T) -> String {
        self.0.linear_from_label(ws, name, x)
    }
    fn attention_label(&self, q: &B::T, k: &B::T, n_head: usize) -> String {
        self.0.attention_label(q, k, n_head)
    }
}

/// Run `f` on the contiguous f32 data of a host tensor (what `upload` takes and `download` gives).
pub fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    with_host(t, f)
}

/// Run `f` on the contiguous data of a host tensor whose elements are `E` (f32 activations; the
/// CPU's f16 KV cache).
pub fn with_host<E: candle_core::WithDType, R>(t: &Tensor, f: impl FnOnce(&[E]) -> R) -> Result<R> {
    let t = if t.is_contiguous() {
        t.clone()
    } else {
        t.contiguous()?
    };
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(Error::other("host tensor: not on the CPU"));
    };
    let data = cpu.as_slice::<E>()?;
    let (a, b) = layout
        .contiguous_offsets()
        .ok_or_else(|| Error::other("host tensor: not contiguous"))?;
    Ok(f(&data[a..b]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuBackend;
    use candle_core::Device;

    fn t(r: usize, c: usize) -> Tensor {
        let v: Vec<f32> = (0..r * c).map(|i| (i as f32 * 0.37).sin()).collect();
        Tensor::from_vec(v, (r, c), &Device::Cpu).unwrap()
    }

    fn why<R>(r: Result<R>) -> String {
        match r {
            Ok(_) => panic!("expected a shape error"),
            Err(e) => e.to_string(),
        }
    }

    /// The host rounding behind the default f16 KV cache (other backends than the CPU) is half's
    /// round-to-nearest-even, overflow to infinity and NaN kept.
    #[test]
    fn round_to_f16_is_nearest_even() {
        let v = vec![
            1.0f32 + 1.0 / 4096.0,
            1.0 + 3.0 / 4096.0,
            65520.0,
            -1e-8,
            0.1,
            f32::NAN,
        ];
        let got = round_to_f16(&Tensor::from_vec(v.clone(), (2, 3), &Device::Cpu).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // Ties to even: 1 + 2^-12 -> 1, 1 + 3*2^-12 -> 1 + 2^-10; 65520 overflows.
        assert_eq!(
            &got[..5],
            &[1.0, 1.0 + 1.0 / 1024.0, f32::INFINITY, -0.0, 0.099975586]
        );
        assert!(got[5].is_nan());
        for (g, x) in got.iter().zip(&v).take(5) {
            assert_eq!(*g, half::f16::from_f32(*x).to_f32());
        }
    }

    /// Every rule turns a mismatch into the backend's error, before the backend runs.
    #[test]
    fn the_front_rejects_what_does_not_fit() {
        let b = Checked::new(&CpuBackend);
        let cases: Vec<(String, &str)> = vec![
            (
                why(b.linear(&t(2, 3), &t(4, 5), None)),
                "linear: input [2, 3] does not match weight [4, 5]",
            ),
            (
                why(b.linear(&t(2, 3), &t(4, 3), Some(&t(1, 3)))),
                "linear: bias [1, 3] for 4 outputs",
            ),
            (
                why(b.add(&t(2, 3), &t(2, 4))),
                "add: shapes [2, 3] and [2, 4] do not match",
            ),
            (
                why(b.mul(&t(3, 3), &t(2, 3))),
                "mul: shapes [3, 3] and [2, 3] do not match",
            ),
            (
                why(b.silu_mul(&t(2, 3), &t(3, 2))),
                "silu_mul: [2, 3] vs [3, 2]",
            ),
            (
                why(b.layer_norm(&t(2, 3), &t(1, 3), &t(1, 4), 1e-5)),
                "layer_norm bias: expected [1, 3], found [1, 4]",
            ),
            (
                why(b.rms_norm(&t(2, 3), &t(2, 3), 1e-5)),
                "rms_norm weight: expected [1, 3], found [2, 3]",
            ),
            (
                why(b.softmax_groups(&t(2, 6), 4)),
                "softmax over groups of 4 in 6 columns",
            ),
            (
                why(b.rope_neox(&t(2, 6), 2, 0, 1e4)),
                "rope: 6 columns in 2 heads",
            ),
            (
                why(b.rope_interleaved(&t(2, 6), 0, 0, 1e4)),
                "rope: 6 columns in 0 heads",
            ),
            (
                why(b.attention(&t(2, 8), &t(3, 5), &t(3, 5), 2, 1, true)),
                "attention: q [2, 8], k [3, 5], v [3, 5]",
            ),
            (
                why(b.msda(&t(5, 4), &[(2, 2)], &t(4, 16), &t(4, 8), (2, 2), 2, 2)),
                "msda: value [5, 4] for levels [(2, 2)] and 2 heads",
            ),
            (
                why(b.msda(&t(4, 4), &[(2, 2)], &t(4, 16), &t(4, 4), (2, 2), 2, 2)),
                "msda: offsets [4, 16] / weights [4, 4] for 4 queries x 4 samples",
            ),
            (why(b.rows(&t(3, 2), 2, 2)), "rows 2..4 of a [3, 2] tensor"),
            (
                why(b.rows(&t(3, 2), usize::MAX, 2)),
                "rows 18446744073709551615..18446744073709551615 of a [3, 2] tensor",
            ),
            (why(b.concat_rows(&[])), "concat of no tensors"),
            (
                why(b.concat_rows(&[&t(1, 2), &t(1, 3)])),
                "concat: 3 columns vs 2",
            ),
            (
                why(b.kv_append(Some((t(4, 2), 5)), &t(1, 2), KvType::F32)),
                "rows 0..5 of a [4, 2] tensor",
            ),
            (
                why(b.kv_append(Some((t(4, 2), 3)), &t(1, 3), KvType::F32)),
                "concat: 3 columns vs 2",
            ),
            (why(b.kv_view(&t(4, 2), 6)), "rows 0..6 of a [4, 2] tensor"),
        ];
        for (got, want) in cases {
            assert!(
                got.contains(&format!("cpu backend: {want}")),
                "{got:?} should say {want:?}"
            );
        }
    }

    /// What fits goes to the backend unchanged.
    #[test]
    fn the_front_passes_what_fits() {
        let b = Checked::new(&CpuBackend);
        let (x, w, bias) = (t(3, 4), t(5, 4), t(1, 5));
        let flat = |y: Tensor| y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(
            flat(b.linear(&x, &w, Some(&bias)).unwrap()),
            flat(CpuBackend.linear(&x, &w, Some(&bias)).unwrap())
        );
        assert_eq!(
            flat(b.add(&x, &t(1, 4)).unwrap()),
            flat(CpuBackend.add(&x, &t(1, 4)).unwrap())
        );
        let (q, k) = (t(2, 8), t(3, 4));
        assert_eq!(
            flat(b.attention(&q, &k, &k, 2, 1, true).unwrap()),
            flat(CpuBackend.attention(&q, &k, &k, 2, 1, true).unwrap())
        );
        let kv = b.kv_append(None, &t(2, 4), KvType::F32).unwrap();
        let kv = b.kv_append(Some((kv, 2)), &t(1, 4), KvType::F32).unwrap();
        assert_eq!(b.dims(&b.kv_view(&kv, 3).unwrap()), (3, 4));
        assert_eq!(b.name(), "cpu");
    }
}
