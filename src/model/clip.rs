//! CLIP ViT vision tower (HF `CLIPVisionModel` with `output_hidden_states=True`), as far as the
//! selected hidden states need it. Pre-LN blocks, attention scale hd^-0.5 with biases,
//! quick_gelu (or exact GELU), LayerNorm eps from the hparams; `post_layernorm` is never used.
use super::backend::Backend;
use super::weights::WeightSource;
use super::{layer_norm, linear};
use crate::ground::error::{Error, Result};
use crate::model::hparams::ClipHParams;
use candle_core::{Device, Tensor};

/// Non-overlapping p x p patches of a [3, S, S] image as rows [N, 3*p*p], row-major over the patch
/// grid, columns in (channel, ky, kx) order: the order of a flattened conv weight [C, 3, p, p].
pub fn patchify(pixel_values: &Tensor, image_size: usize, patch: usize) -> Result<Tensor> {
    let dims = pixel_values.dims().to_vec();
    let ok = match dims[..] {
        [3, h, w] | [1, 3, h, w] => h == image_size && w == image_size,
        _ => false,
    };
    if !ok || patch == 0 || !image_size.is_multiple_of(patch) {
        return Err(Error::other(format!(
            "pixel_values: expected [3, {image_size}, {image_size}] (patch {patch}), found {dims:?}"
        )));
    }
    let s = image_size;
    let e = s / patch;
    let px = pixel_values
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let cols = 3 * patch * patch;
    let mut out = Vec::with_capacity(e * e * cols);
    for gy in 0..e {
        for gx in 0..e {
            for ch in 0..3 {
                for ky in 0..patch {
                    let row = ch * s * s + (gy * patch + ky) * s + gx * patch;
                    out.extend_from_slice(&px[row..row + patch]);
                }
            }
        }
    }
    Ok(Tensor::from_vec(out, (e * e, cols), &Device::Cpu)?)
}

/// Hidden states `hp.feature_layers` (in that order) of the vision tower, CLS dropped: each [N, C].
/// Index 0 is the embeddings after pre_layrnorm, k the output of encoder block k; only blocks
/// 0..max(feature_layers) run.
pub fn clip_hidden_states<B: Backend>(
    b: &B,
    ws: &dyn WeightSource,
    hp: &ClipHParams,
    pixel_values: &Tensor,
) -> Result<Vec<B::T>> {
    if hp.feature_layers.is_empty() {
        return Err(Error::other("clip: no feature layers selected"));
    }
    if hp.blocks_needed() > hp.n_layer {
        return Err(Error::other(format!(
            "clip: feature layer {} needs more blocks than the tower has ({})",
            hp.blocks_needed(),
            hp.n_layer
        )));
    }
    let n = hp.n_patches();
    let patches = b.upload(&patchify(pixel_values, hp.image_size, hp.patch_size)?)?;
    let bias = if ws.has("v.patch_embd.bias") {
        Some("v.patch_embd.bias")
    } else {
        None
    };
    let x = linear(b, ws, &patches, "v.patch_embd.weight", bias)?;
    drop(patches);
    let cls = b.param(ws, "v.class_embd")?;
    let pos = b.param(ws, "v.position_embd.weight")?;
    if b.dims(&pos) != (n + 1, hp.n_embd) || b.dims(&cls) != (1, hp.n_embd) {
        return Err(Error::tensor(
            ws.origin_of("v.position_embd.weight"),
            "v.position_embd.weight",
            format!(
                "expected [{}, {}] (and a class embedding [{}])",
                n + 1,
                hp.n_embd,
                hp.n_embd
            ),
        ));
    }
    let x = b.add(&b.concat_rows(&[&cls, &x])?, &pos)?;
    let mut x = layer_norm(b, ws, &x, "v.pre_ln", hp.eps)?;

    let mut kept: Vec<(usize, B::T)> = Vec::new();
    let keep = |k: usize, x: &B::T, kept: &mut Vec<(usize, B::T)>| -> Result<()> {
        if hp.feature_layers.contains(&k) {
            kept.push((k, b.rows(x, 1, n)?));
        }
        Ok(())
    };
    keep(0, &x, &mut kept)?;
    for i in 0..hp.blocks_needed() {
        x = clip_block(b, ws, hp, &x, i)?;
        keep(i + 1, &x, &mut kept)?;
    }
    hp.feature_layers
        .iter()
        .map(|k| {
            Ok(kept
                .iter()
                .find(|(j, _)| j == k)
                .expect("every selected layer was kept")
                .1
                .clone())
        })
        .collect()
}

/// One pre-LN encoder block: x + attn(ln1(x)), then + mlp(ln2(.)).
fn clip_block<B: Backend>(
    b: &B,
    ws: &dyn WeightSource,
    hp: &ClipHParams,
    x: &B::T,
    i: usize,
) -> Result<B::T> {
    let p = format!("v.blk.{i}");
    let h = layer_norm(b, ws, x, &format!("{p}.ln1"), hp.eps)?;
    let lin = |x: &B::T, name: &str| {
        linear(
            b,
            ws,
            x,
            &format!("{p}.{name}.weight"),
            Some(format!("{p}.{name}.bias").as_str()),
        )
    };
    let q = lin(&h, "attn_q")?;
    let k = lin(&h, "attn_k")?;
    let v = lin(&h, "attn_v")?;
    let a = b.attention(&q, &k, &v, hp.n_head, hp.n_head, false)?;
    let x = b.add(x, &lin(&a, "attn_out")?)?;
    let h = layer_norm(b, ws, &x, &format!("{p}.ln2"), hp.eps)?;
    let h = lin(&h, "ffn_up")?;
    let h = if hp.quick_gelu {
        b.quick_gelu(&h)?
    } else {
        b.gelu_erf(&h)?
    };
    b.add(&x, &lin(&h, "ffn_down")?)
}
