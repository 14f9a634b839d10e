//! LLaMA decoder (llama.cpp tensor names; Q/K rows permuted for the interleaved rope, or as HF
//! stores them with the rotate_half rope when the weight source says so):
//! RMSNorm, rotary embeddings, causal attention with GQA, SwiGLU MLP, output head.
use super::backend::{Backend, Checked, KvType};
use super::linear;
use super::weights::{rows_f32, RopeMode, WeightSource};
use crate::ground::error::{Error, Result};
use crate::model::hparams::LlamaHParams;
use candle_core::Tensor;

/// The image placeholder in token ids (LLaVA's IMAGE_TOKEN_INDEX; never a vocabulary id).
pub const IMAGE_TOKEN: i64 = -200;

/// Input embeddings [n, H] for `ids`, with the image embeddings [N, H] spliced in place of the
/// single -200 marker (so n = ids.len() - 1 + N). Token rows are dequantized one by one from
/// token_embd.weight, never the whole table.
pub fn build_inputs(
    ws: &dyn WeightSource,
    ids: &[i64],
    image_embeds: Option<&Tensor>,
) -> Result<Tensor> {
    let origin = ws.origin();
    let markers = ids.iter().filter(|&&t| t == IMAGE_TOKEN).count();
    match (markers, image_embeds) {
        (0, None) | (1, Some(_)) => {}
        (0, Some(_)) => {
            return Err(Error::input(
                &origin,
                "image embeddings given but the prompt has no <image> marker (-200)",
            ))
        }
        (1, None) => {
            return Err(Error::input(
                &origin,
                "the prompt has an <image> marker (-200) but no image was given",
            ))
        }
        (k, _) => {
            return Err(Error::input(
                &origin,
                format!("the prompt has {k} <image> markers; one image is supported"),
            ))
        }
    }
    if let Some(&bad) = ids.iter().find(|&&t| t < 0 && t != IMAGE_TOKEN) {
        return Err(Error::input(&origin, format!("negative token id {bad}")));
    }
    let mut parts: Vec<Tensor> = Vec::new();
    for (i, chunk) in ids.split(|&t| t == IMAGE_TOKEN).enumerate() {
        if i > 0 {
            let img = image_embeds.expect("checked above");
            let img = img.to_dtype(candle_core::DType::F32)?;
            parts.push(match img.rank() {
                2 => img,
                3 if img.dim(0)? == 1 => img.squeeze(0)?,
                _ => {
                    return Err(Error::other(format!(
                        "image embeddings: expected [N, H], found {:?}",
                        img.dims()
                    )))
                }
            });
        }
        if !chunk.is_empty() {
            let rows: Vec<usize> = chunk.iter().map(|&t| t as usize).collect();
            parts.push(rows_f32(ws, "token_embd.weight", &rows)?);
        }
    }
    if parts.is_empty() {
        return Err(Error::input(&origin, "empty prompt"));
    }
    let h = parts[0].dim(1)?;
    if let Some(p) = parts.iter().find(|p| p.dim(1).ok() != Some(h)) {
        return Err(Error::other(format!(
            "image embeddings have {} columns but token embeddings have {h}",
            p.dim(1)?
        )));
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// One layer's key and value buffers in a KV cache (None before the first feed).
type KvSlot<T> = Option<(T, T)>;

/// Keys and values of the positions already decoded, per layer (rows = positions, after rope),
/// so that generation feeds one new position at a time instead of the whole sequence again.
pub struct KvCache<T> {
    /// Per layer: key and value buffers whose first `len` rows are the positions held
    /// ([rows, n_head_kv*hd]; a backend may keep spare rows, see `Backend::kv_append`); None
    /// before the first feed.
    layers: Vec<KvSlot<T>>,
    len: usize,
    ty: KvType,
}

impl<T: Clone> KvCache<T> {
    /// An empty cache storing keys and values as `ty`.
    pub fn new(n_layer: usize, ty: KvType) -> Self {
        KvCache {
            layers: vec![None; n_layer],
            len: 0,
            ty,
        }
    }
    /// Positions held (the position of the next row fed).
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One decoder layer: x + attn(rms(x)), then + mlp(rms(.)). Row t of x is at position pos0 + t;
/// with a cache, its keys/values are appended and the attention reads all of them.
///
/// `last_row`: only the last row's output is wanted (the last layer of a prefill whose logits are
/// the last position's). Every row's keys and values are still made (the cache keeps them), but
/// the query, the attention output and the feed-forward run on that row alone: each row's result
/// depends on its own row of every product, so that row's output is the same (up to the
/// attention's summation order: one query row takes the backend's few-rows road), minus the work
/// for the rows nothing reads.
#[allow(clippy::too_many_arguments)]
fn layer<B: Backend>(
    b: &B,
    ws: &dyn WeightSource,
    hp: &LlamaHParams,
    x: &B::T,
    i: usize,
    pos0: usize,
    cache: Option<(&mut KvSlot<B::T>, KvType)>,
    last_row: bool,
) -> Result<B::T> {
    // With a cache, its first pos0 rows are the earlier positions.
    let p = format!("blk.{i}");
    let n = b.dims(x).0;
    let last_row = last_row && n > 1;
    let norm = |x: &B::T, n: &str| -> Result<B::T> {
        let w = b.param(ws, &format!("{p}.{n}.weight"))?;
        b.rms_norm(x, &w, hp.rms_eps)
    };
    let lin = |x: &B::T, n: &str| linear(b, ws, x, &format!("{p}.{n}.weight"), None);
    let h = norm(x, "attn_norm")?;
    let rope = |x: &B::T, heads: usize, pos0: usize| match ws.rope_mode() {
        RopeMode::Interleaved => b.rope_interleaved(x, heads, pos0, hp.rope_theta),
        RopeMode::Neox => b.rope_neox(x, heads, pos0, hp.rope_theta),
    };
    let q = if last_row {
        let h_last = b.rows(&h, n - 1, 1)?;
        rope(&lin(&h_last, "attn_q")?, hp.n_head, pos0 + n - 1)?
    } else {
        rope(&lin(&h, "attn_q")?, hp.n_head, pos0)?
    };
    let k = rope(&lin(&h, "attn_k")?, hp.n_head_kv, pos0)?;
    let v = lin(&h, "attn_v")?;
    let a = match cache {
        None => b.attention(&q, &k, &v, hp.n_head, hp.n_head_kv, true)?,
        Some((slot, ty)) => {
            let (pk, pv) = match slot.take() {
                None => (None, None),
                Some((pk, pv)) => (Some((pk, pos0)), Some((pv, pos0))),
            };
            let used = pos0 + b.dims(&k).0;
            let (kb, vb) = (b.kv_append(pk, &k, ty)?, b.kv_append(pv, &v, ty)?);
            let a = b.attention(
                &q,
                &b.kv_view(&kb, used)?,
                &b.kv_view(&vb, used)?,
                hp.n_head,
                hp.n_head_kv,
                true,
            );
            *slot = Some((kb, vb));
            a?
        }
    };
    drop((q, h));
    let x_last;
    let x = if last_row {
        x_last = b.rows(x, n - 1, 1)?;
        &x_last
    } else {
        x
    };
    let x = b.add(x, &lin(&a, "attn_output")?)?;
    let h = norm(&x, "ffn_norm")?;
    let g = b.silu_mul(&lin(&h, "ffn_gate")?, &lin(&h, "ffn_up")?)?;
    b.add(&x, &lin(&g, "ffn_down")?)
}

/// Final norm and output head on hidden states [n, H] -> logits [n, vocab].
fn head<B: Backend>(b: &B, ws: &dyn WeightSource, hp: &LlamaHParams, x: &B::T) -> Result<B::T> {
    let w = b.param(ws, "output_norm.weight")?;
    let x = b.rms_norm(x, &w, hp.rms_eps)?;
    // Tied embeddings: no output.weight.
    let head = if ws.has("output.weight") {
        "output.weight"
    } else {
        "token_embd.weight"
    };
    linear(b, ws, &x, head, None)
}

fn upload_checked<B: Backend>(b: &B, hp: &LlamaHParams, embeds: &Tensor) -> Result<B::T> {
    let x = b.upload(embeds)?;
    if b.dims(&x).1 != hp.n_embd {
        return Err(Error::other(format!(
            "decoder input has {} columns, n_embd is {}",
            b.dims(&x).1,
            hp.n_embd
        )));
    }
    Ok(x)
}

/// The decoder on input embeddings [n, H]: logits [n, vocab]. Weights are fetched per layer.
/// Runs through the checked front.
pub fn decode<B: Backend>(
    b: &B,
    ws: &dyn WeightSource,
    hp: &LlamaHParams,
    embeds: &Tensor,
) -> Result<B::T> {
    let b = &Checked::new(b);
    let mut x = upload_checked(b, hp, embeds)?;
    for i in 0..hp.n_layer {
        x = layer(b, ws, hp, &x, i, 0, None, false)?;
    }
    head(b, ws, hp, &x)
}

/// The decoder on the next positions' embeddings [n, H], after the `cache.len()` positions the
/// cache holds (whose keys/values it appends). Logits of every new row, or of the last only
/// (`last_only`: a prompt's prefill needs one row of the [n, vocab] head).
pub fn decode_cached<B: Backend>(
    b: &B,
    ws: &dyn WeightSource,
    hp: &LlamaHParams,
    embeds: &Tensor,
    cache: &mut KvCache<B::T>,
    last_only: bool,
) -> Result<B::T> {
    let b = &Checked::new(b);
    let mut x = upload_checked(b, hp, embeds)?;
    let n = b.dims(&x).0;
    if n == 0 {
        return Err(Error::other("decoder input has no rows"));
    }
    if cache.layers.len() != hp.n_layer {
        return Err(Error::other(format!(
            "KV cache has {} layers, the model {}",
            cache.layers.len(),
            hp.n_layer
        )));
    }
    if cache.len + n > hp.n_ctx {
        return Err(Error::other(format!(
            "{} positions exceed the model's context length {}",
            cache.len + n,
            hp.n_ctx
        )));
    }
    let pos0 = cache.len;
    for i in 0..hp.n_layer {
        x = layer(
            b,
            ws,
            hp,
            &x,
            i,
            pos0,
            Some((&mut cache.layers[i], cache.ty)),
            last_only && i + 1 == hp.n_layer,
        )?;
    }
    cache.len += n;
    head(b, ws, hp, &x)
}
