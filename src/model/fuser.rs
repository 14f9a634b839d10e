//! MMFuser's MSCrossAttnBlock (spec §3): multi-scale deformable cross attention from the last
//! selected CLIP layer into the others, then a one-level deformable self attention, with the
//! layer-scale gammas.
use super::backend::Backend;
use super::weights::WeightSource;
use super::{layer_norm, linear};
use crate::ground::error::{Error, Result};
use crate::model::hparams::FuserHParams;

const P: &str = "mm.fuser";

/// The fuser's output and its intermediate (after the cross attention), each [N, C].
pub struct FuserOutputs<T> {
    /// A = MSDA_L(query_norm(q), feat_norm(feat)) (after output_proj).
    pub cross_attn: T,
    /// q + gamma1 * (A + gamma2 * MSDA_1(norm1(A), norm1(A))).
    pub out: T,
}

/// One MSDeformAttn: value_proj(value_in) sampled at query-predicted offsets, output_proj.
/// `levels` are (H, W) of the levels stacked in value_in; queries sit on a `grid` (rows, cols).
#[allow(clippy::too_many_arguments)]
fn msdeform_attn<B: Backend>(
    b: &B,
    ws: &dyn WeightSource,
    prefix: &str,
    fh: &FuserHParams,
    query: &B::T,
    value_in: &B::T,
    levels: &[(usize, usize)],
    grid: (usize, usize),
) -> Result<B::T> {
    let name = |s: &str| format!("{prefix}.{s}");
    let lin = |x: &B::T, s: &str| {
        linear(
            b,
            ws,
            x,
            &name(&format!("{s}.weight")),
            Some(name(&format!("{s}.bias")).as_str()),
        )
    };
    let (nq, c) = b.dims(query);
    let per_q = fh.n_heads * levels.len() * fh.n_points;
    let value = lin(value_in, "value_proj")?;
    let offsets = lin(query, "sampling_offsets")?;
    let logits = lin(query, "attention_weights")?;
    if b.dims(&offsets) != (nq, 2 * per_q) || b.dims(&logits) != (nq, per_q) || c % fh.n_heads != 0
    {
        return Err(Error::tensor(
            ws.origin_of(&name("sampling_offsets.weight")),
            name("sampling_offsets.weight"),
            format!(
                "expected {} offsets and {per_q} attention weights per query (M={}, L={}, P={}, C={c})",
                2 * per_q,
                fh.n_heads,
                levels.len(),
                fh.n_points
            ),
        ));
    }
    let weights = b.softmax_groups(&logits, levels.len() * fh.n_points)?;
    drop(logits);
    let sampled = b.msda(
        &value,
        levels,
        &offsets,
        &weights,
        grid,
        fh.n_heads,
        fh.n_points,
    )?;
    lin(&sampled, "output_proj")
}

/// The fuser on the selected CLIP layers `srcs` (each [e*e, C]): the last one is the query,
/// the first `n_levels` are the fused levels (spec: srcs[0..4] and srcs[4]).
pub fn fuser<B: Backend>(
    b: &B,
    ws: &dyn WeightSource,
    fh: &FuserHParams,
    srcs: &[B::T],
    e: usize,
) -> Result<FuserOutputs<B::T>> {
    if srcs.len() != fh.n_levels + 1 {
        return Err(Error::other(format!(
            "fuser: {} selected layers, expected {} levels + 1 query layer",
            srcs.len(),
            fh.n_levels
        )));
    }
    for s in srcs {
        if b.dims(s).0 != e * e {
            return Err(Error::other(format!(
                "fuser: a level has {} tokens, expected {e}x{e}",
                b.dims(s).0
            )));
        }
    }
    let q = &srcs[fh.n_levels];
    let feat = b.concat_rows(&srcs[..fh.n_levels].iter().collect::<Vec<_>>())?;
    let eps = fh.eps;

    // Cross attention: query_norm(q) attends over feat_norm(feat), n_levels e x e levels.
    let qn = layer_norm(b, ws, q, &format!("{P}.query_norm"), eps)?;
    let fnorm = layer_norm(b, ws, &feat, &format!("{P}.feat_norm"), eps)?;
    drop(feat);
    let levels = vec![(e, e); fh.n_levels];
    let a = msdeform_attn(
        b,
        ws,
        &format!("{P}.cross_attn"),
        fh,
        &qn,
        &fnorm,
        &levels,
        (e, e),
    )?;
    drop((qn, fnorm));

    // Self attention, one level: A = A + gamma2 * MSDA_1(norm1(A), norm1(A)).
    let a1 = layer_norm(b, ws, &a, &format!("{P}.norm1"), eps)?;
    let s = msdeform_attn(
        b,
        ws,
        &format!("{P}.self_attn"),
        fh,
        &a1,
        &a1,
        &[(e, e)],
        (e, e),
    )?;
    let gamma2 = b.param(ws, &format!("{P}.gamma2"))?;
    let a2 = b.add(&a, &b.mul(&s, &gamma2)?)?;

    // Output: q + gamma1 * A.
    let gamma1 = b.param(ws, &format!("{P}.gamma1"))?;
    let out = b.add(q, &b.mul(&a2, &gamma1)?)?;
    Ok(FuserOutputs { cross_attn: a, out })
}
