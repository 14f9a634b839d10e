//! The LLaVA-MMFuser forward pass (spec §3), written once against `backend::Backend`:
//! CLIP (`clip`) -> MMFuser (`fuser`) -> MLP -> LLaMA (`llama`). f32 compute; every weight comes
//! from a `WeightSource` by its GGUF name when the layer that needs it runs, and is dropped after.
//!
//! `encode_image_with` / `logits_with` run on any backend (`crate::cpu`, `crate::cuda`), through
//! the checked front `backend::Checked`; the model names no backend.
pub mod backend;
pub mod clip;
pub mod fuser;
pub mod hparams;
pub mod llama;
pub mod paired;
pub mod profile;
pub mod weights;

pub use backend::{Backend, Checked, KvType};
pub use llama::{build_inputs, IMAGE_TOKEN};
pub use profile::Profiled;
pub use weights::{MemWeights, RawTensor, RopeMode, StoredAt, WeightSource};

use crate::ground::error::{Error, Result};
use crate::model::hparams::{ModelHParams, ProjectorHParams};
use candle_core::Tensor;

/// Everything the image side produces (host tensors, f32).
pub struct ImageOutputs {
    /// The selected CLIP hidden states (CLS dropped), in `feature_layers` order, each [N, C].
    pub selected: Vec<Tensor>,
    /// MMFuser only: the intermediate after the cross attention (before the self attention), [N, C].
    pub fuser_cross_attn: Option<Tensor>,
    /// MMFuser only: the fuser's output, [N, C].
    pub fuser_out: Option<Tensor>,
    /// The projector's output, [N, H]: what replaces the <image> marker.
    pub image_embeds: Tensor,
}

/// linear with the weight (and bias) fetched now and dropped on return.
pub(crate) fn linear<B: Backend>(
    b: &B,
    ws: &dyn WeightSource,
    x: &B::T,
    w: &str,
    bias: Option<&str>,
) -> Result<B::T> {
    let bt = bias.map(|n| b.param(ws, n)).transpose()?;
    b.linear_from(ws, w, x, bt.as_ref())
}

/// LayerNorm with `{prefix}.weight` / `{prefix}.bias`.
pub(crate) fn layer_norm<B: Backend>(
    b: &B,
    ws: &dyn WeightSource,
    x: &B::T,
    prefix: &str,
    eps: f32,
) -> Result<B::T> {
    let w = b.param(ws, &format!("{prefix}.weight"))?;
    let bias = b.param(ws, &format!("{prefix}.bias"))?;
    if b.dims(&w) != (1, b.dims(x).1) || b.dims(&bias) != b.dims(&w) {
        return Err(Error::tensor(
            ws.origin_of(prefix),
            format!("{prefix}.weight"),
            format!("expected [{}]", b.dims(x).1),
        ));
    }
    b.layer_norm(x, &w, &bias, eps)
}

/// Linear, exact GELU, Linear.
fn mlp<B: Backend>(
    b: &B,
    ws: &dyn WeightSource,
    x: &B::T,
    first: &str,
    second: &str,
) -> Result<B::T> {
    let h = linear(
        b,
        ws,
        x,
        &format!("{first}.weight"),
        Some(format!("{first}.bias").as_str()),
    )?;
    let h = b.gelu_erf(&h)?;
    linear(
        b,
        ws,
        &h,
        &format!("{second}.weight"),
        Some(format!("{second}.bias").as_str()),
    )
}

/// The image side on any backend: pixel_values [3, S, S] (CLIP-normalized) -> ImageOutputs.
pub fn encode_image_with<B: Backend>(
    b: &B,
    ws: &dyn WeightSource,
    hp: &ModelHParams,
    pixel_values: &Tensor,
) -> Result<ImageOutputs> {
    let b = &Checked::new(b);
    let srcs = clip::clip_hidden_states(b, ws, &hp.clip, pixel_values)?;
    let selected = srcs
        .iter()
        .map(|s| b.download(s))
        .collect::<Result<Vec<_>>>()?;
    let (cross, fused, embeds) = match &hp.projector {
        ProjectorHParams::Mlp => {
            if srcs.len() != 1 {
                return Err(Error::other(format!(
                    "plain LLaVA projector needs one selected layer, got {}",
                    srcs.len()
                )));
            }
            let embeds = mlp(b, ws, &srcs[0], "mm.0", "mm.2")?;
            (None, None, embeds)
        }
        ProjectorHParams::MmFuser(fh) => {
            let out = fuser::fuser(b, ws, fh, &srcs, hp.clip.patches_per_side())?;
            drop(srcs);
            let embeds = mlp(b, ws, &out.out, "mm.1", "mm.3")?;
            (
                Some(b.download(&out.cross_attn)?),
                Some(b.download(&out.out)?),
                embeds,
            )
        }
    };
    Ok(ImageOutputs {
        selected,
        fuser_cross_attn: cross,
        fuser_out: fused,
        image_embeds: b.download(&embeds)?,
    })
}

/// Logits [n, vocab] for `ids` (with the image spliced at the -200 marker) on any backend
/// (through the front: `llama::decode` wraps it).
pub fn logits_with<B: Backend>(
    b: &B,
    ws: &dyn WeightSource,
    hp: &ModelHParams,
    ids: &[i64],
    image_embeds: Option<&Tensor>,
) -> Result<Tensor> {
    let embeds = build_inputs(ws, ids, image_embeds)?;
    b.download(&llama::decode(b, ws, &hp.llama, &embeds)?)
}

#[cfg(test)]
pub(crate) mod testutil {
    /// Small deterministic generator for test data (xorshift), values in [-1, 1).
    pub struct Rng(u64);
    impl Rng {
        pub fn new(seed: u64) -> Self {
            Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
        }
        pub fn uniform(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
        pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
            (0..n).map(|_| self.uniform() * scale).collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::Rng;
    use super::*;
    use crate::cpu::CpuBackend;
    use crate::model::hparams::{ClipHParams, FuserHParams, LlamaHParams};
    use candle_core::Device;

    fn tiny_hparams(projector: ProjectorHParams, feature_layers: Vec<usize>) -> ModelHParams {
        ModelHParams {
            llama: LlamaHParams {
                n_layer: 2,
                n_embd: 32,
                n_ff: 48,
                n_head: 4,
                n_head_kv: 2,
                n_vocab: 50,
                n_ctx: 128,
                rms_eps: 1e-5,
                rope_theta: 10000.0,
            },
            clip: ClipHParams {
                image_size: 12,
                patch_size: 4,
                n_embd: 16,
                n_ff: 40,
                n_head: 2,
                n_layer: 4,
                eps: 1e-5,
                quick_gelu: true,
                image_mean: [0.5; 3],
                image_std: [0.5; 3],
                feature_layers,
            },
            projector,
        }
    }

    fn tiny_weights(hp: &ModelHParams) -> MemWeights {
        let mut rng = Rng::new(1);
        let mut ws = MemWeights::new();
        let mut put = |name: &str, shape: &[usize], scale: f32| {
            let n = shape.iter().product();
            ws.insert_f32(name, shape, &rng.vec(n, scale));
        };
        let (c, p, ff) = (hp.clip.n_embd, hp.clip.patch_size, hp.clip.n_ff);
        let n = hp.clip.n_patches();
        put("v.patch_embd.weight", &[c, 3, p, p], 0.2);
        put("v.class_embd", &[c], 0.5);
        put("v.position_embd.weight", &[n + 1, c], 0.5);
        put("v.pre_ln.weight", &[c], 1.0);
        put("v.pre_ln.bias", &[c], 0.1);
        for i in 0..hp.clip.n_layer {
            for t in ["attn_q", "attn_k", "attn_v", "attn_out"] {
                put(&format!("v.blk.{i}.{t}.weight"), &[c, c], 0.3);
                put(&format!("v.blk.{i}.{t}.bias"), &[c], 0.1);
            }
            for t in ["ln1", "ln2"] {
                put(&format!("v.blk.{i}.{t}.weight"), &[c], 1.0);
                put(&format!("v.blk.{i}.{t}.bias"), &[c], 0.1);
            }
            put(&format!("v.blk.{i}.ffn_up.weight"), &[ff, c], 0.3);
            put(&format!("v.blk.{i}.ffn_up.bias"), &[ff], 0.1);
            put(&format!("v.blk.{i}.ffn_down.weight"), &[c, ff], 0.3);
            put(&format!("v.blk.{i}.ffn_down.bias"), &[c], 0.1);
        }
        let h = hp.llama.n_embd;
        match &hp.projector {
            ProjectorHParams::Mlp => {
                put("mm.0.weight", &[h, c], 0.3);
                put("mm.0.bias", &[h], 0.1);
                put("mm.2.weight", &[h, h], 0.3);
                put("mm.2.bias", &[h], 0.1);
            }
            ProjectorHParams::MmFuser(f) => {
                for (att, lv) in [("cross_attn", f.n_levels), ("self_attn", 1)] {
                    let k = f.n_heads * lv * f.n_points;
                    put(
                        &format!("mm.fuser.{att}.sampling_offsets.weight"),
                        &[2 * k, c],
                        0.3,
                    );
                    put(
                        &format!("mm.fuser.{att}.sampling_offsets.bias"),
                        &[2 * k],
                        1.0,
                    );
                    put(
                        &format!("mm.fuser.{att}.attention_weights.weight"),
                        &[k, c],
                        0.3,
                    );
                    put(&format!("mm.fuser.{att}.attention_weights.bias"), &[k], 0.1);
                    for t in ["value_proj", "output_proj"] {
                        put(&format!("mm.fuser.{att}.{t}.weight"), &[c, c], 0.3);
                        put(&format!("mm.fuser.{att}.{t}.bias"), &[c], 0.1);
                    }
                }
                for t in ["query_norm", "feat_norm", "norm1"] {
                    put(&format!("mm.fuser.{t}.weight"), &[c], 1.0);
                    put(&format!("mm.fuser.{t}.bias"), &[c], 0.1);
                }
                put("mm.fuser.gamma1", &[c], 0.5);
                put("mm.fuser.gamma2", &[c], 0.5);
                put("mm.1.weight", &[h, c], 0.3);
                put("mm.1.bias", &[h], 0.1);
                put("mm.3.weight", &[h, h], 0.3);
                put("mm.3.bias", &[h], 0.1);
            }
        }
        let l = &hp.llama;
        let hd = l.head_dim();
        put("token_embd.weight", &[l.n_vocab, h], 0.5);
        put("output_norm.weight", &[h], 1.0);
        put("output.weight", &[l.n_vocab, h], 0.3);
        for i in 0..l.n_layer {
            put(&format!("blk.{i}.attn_norm.weight"), &[h], 1.0);
            put(&format!("blk.{i}.ffn_norm.weight"), &[h], 1.0);
            put(&format!("blk.{i}.attn_q.weight"), &[l.n_head * hd, h], 0.3);
            put(
                &format!("blk.{i}.attn_k.weight"),
                &[l.n_head_kv * hd, h],
                0.3,
            );
            put(
                &format!("blk.{i}.attn_v.weight"),
                &[l.n_head_kv * hd, h],
                0.3,
            );
            put(
                &format!("blk.{i}.attn_output.weight"),
                &[h, l.n_head * hd],
                0.3,
            );
            put(&format!("blk.{i}.ffn_gate.weight"), &[l.n_ff, h], 0.3);
            put(&format!("blk.{i}.ffn_up.weight"), &[l.n_ff, h], 0.3);
            put(&format!("blk.{i}.ffn_down.weight"), &[h, l.n_ff], 0.3);
        }
        ws
    }

    fn pixels(hp: &ModelHParams) -> Tensor {
        let s = hp.clip.image_size;
        let v = Rng::new(9).vec(3 * s * s, 1.5);
        Tensor::from_vec(v, (3, s, s), &Device::Cpu).unwrap()
    }

    fn finite(t: &Tensor) -> bool {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|v| v.is_finite())
    }

    #[test]
    fn tiny_mmfuser_shapes() {
        let fh = FuserHParams {
            n_heads: 4,
            n_levels: 3,
            n_points: 2,
            eps: 1e-6,
        };
        let hp = tiny_hparams(ProjectorHParams::MmFuser(fh), vec![0, 1, 3, 2]);
        let ws = tiny_weights(&hp);
        let out = encode_image_with(&CpuBackend, &ws, &hp, &pixels(&hp)).unwrap();
        assert_eq!(out.selected.len(), 4);
        for s in &out.selected {
            assert_eq!(s.dims(), &[9, 16]);
            assert!(finite(s));
        }
        assert_eq!(out.fuser_cross_attn.as_ref().unwrap().dims(), &[9, 16]);
        assert_eq!(out.fuser_out.as_ref().unwrap().dims(), &[9, 16]);
        assert_eq!(out.image_embeds.dims(), &[9, 32]);
        assert!(finite(&out.image_embeds));
        let ids = [1i64, 5, 7, IMAGE_TOKEN, 9, 11];
        let lg = logits_with(&CpuBackend, &ws, &hp, &ids, Some(&out.image_embeds)).unwrap();
        assert_eq!(lg.dims(), &[5 + 9, 50]);
        assert!(finite(&lg));
        // Text only, and the errors around the marker.
        assert_eq!(
            logits_with(&CpuBackend, &ws, &hp, &[1, 2, 3], None)
                .unwrap()
                .dims(),
            &[3, 50]
        );
        assert!(logits_with(&CpuBackend, &ws, &hp, &ids, None).is_err());
        assert!(logits_with(&CpuBackend, &ws, &hp, &[1, 2], Some(&out.image_embeds)).is_err());
        assert!(logits_with(&CpuBackend, &ws, &hp, &[1, 50], None).is_err());
    }

    #[test]
    fn tiny_plain_llava_and_causality() {
        let hp = tiny_hparams(ProjectorHParams::Mlp, vec![3]);
        let ws = tiny_weights(&hp);
        let out = encode_image_with(&CpuBackend, &ws, &hp, &pixels(&hp)).unwrap();
        assert!(out.fuser_out.is_none());
        assert_eq!(out.image_embeds.dims(), &[9, 32]);
        // Causal: the logits of a prefix do not depend on what follows.
        let a = logits_with(
            &CpuBackend,
            &ws,
            &hp,
            &[1, IMAGE_TOKEN, 4, 5],
            Some(&out.image_embeds),
        )
        .unwrap();
        let b = logits_with(
            &CpuBackend,
            &ws,
            &hp,
            &[1, IMAGE_TOKEN, 4, 6, 7],
            Some(&out.image_embeds),
        )
        .unwrap();
        let a = a
            .narrow(0, 0, 11)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = b
            .narrow(0, 0, 11)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5);
        }
    }

    /// The CLIP tower against a direct (naive, f64) implementation of HF CLIPVisionModel.
    #[test]
    fn tiny_clip_matches_naive() {
        let hp = tiny_hparams(ProjectorHParams::Mlp, vec![2]);
        let ws = tiny_weights(&hp);
        let px = pixels(&hp);
        let got = clip::clip_hidden_states(&CpuBackend, &ws, &hp.clip, &px).unwrap();
        let got = got[0].flatten_all().unwrap().to_vec1::<f32>().unwrap();

        let get = |n: &str| -> Vec<f64> {
            ws.tensor_f32(n)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|&v| v as f64)
                .collect()
        };
        let c = hp.clip.n_embd;
        let (s, p) = (hp.clip.image_size, hp.clip.patch_size);
        let e = s / p;
        let pv: Vec<f64> = px
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|&v| v as f64)
            .collect();
        // Conv2d stride p.
        let pw = get("v.patch_embd.weight");
        let mut x = vec![get("v.class_embd")];
        for gy in 0..e {
            for gx in 0..e {
                let mut row = vec![0f64; c];
                for (o, r) in row.iter_mut().enumerate() {
                    for ch in 0..3 {
                        for ky in 0..p {
                            for kx in 0..p {
                                *r += pw[((o * 3 + ch) * p + ky) * p + kx]
                                    * pv[(ch * s + gy * p + ky) * s + gx * p + kx];
                            }
                        }
                    }
                }
                x.push(row);
            }
        }
        let pos = get("v.position_embd.weight");
        for (t, row) in x.iter_mut().enumerate() {
            for j in 0..c {
                row[j] += pos[t * c + j];
            }
        }
        let ln = |x: &[Vec<f64>], pre: &str| -> Vec<Vec<f64>> {
            let (w, b) = (get(&format!("{pre}.weight")), get(&format!("{pre}.bias")));
            x.iter()
                .map(|r| {
                    let m = r.iter().sum::<f64>() / c as f64;
                    let v = r.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / c as f64;
                    r.iter()
                        .enumerate()
                        .map(|(j, a)| (a - m) / (v + 1e-5).sqrt() * w[j] + b[j])
                        .collect()
                })
                .collect()
        };
        let lin = |x: &[Vec<f64>], pre: &str| -> Vec<Vec<f64>> {
            let (w, b) = (get(&format!("{pre}.weight")), get(&format!("{pre}.bias")));
            let nout = b.len();
            let nin = w.len() / nout;
            x.iter()
                .map(|r| {
                    (0..nout)
                        .map(|o| b[o] + (0..nin).map(|i| w[o * nin + i] * r[i]).sum::<f64>())
                        .collect()
                })
                .collect()
        };
        let mut x = ln(&x, "v.pre_ln");
        let nh = hp.clip.n_head;
        let hd = c / nh;
        for blk in 0..2 {
            let pre = format!("v.blk.{blk}");
            let h = ln(&x, &format!("{pre}.ln1"));
            let q = lin(&h, &format!("{pre}.attn_q"));
            let k = lin(&h, &format!("{pre}.attn_k"));
            let v = lin(&h, &format!("{pre}.attn_v"));
            let nt = x.len();
            let mut a = vec![vec![0f64; c]; nt];
            for hh in 0..nh {
                for i in 0..nt {
                    let sc: Vec<f64> = (0..nt)
                        .map(|j| {
                            (0..hd)
                                .map(|d| q[i][hh * hd + d] * k[j][hh * hd + d])
                                .sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let mx = sc.iter().cloned().fold(f64::MIN, f64::max);
                    let z: f64 = sc.iter().map(|v| (v - mx).exp()).sum();
                    for d in 0..hd {
                        a[i][hh * hd + d] = (0..nt)
                            .map(|j| (sc[j] - mx).exp() / z * v[j][hh * hd + d])
                            .sum();
                    }
                }
            }
            let o = lin(&a, &format!("{pre}.attn_out"));
            for i in 0..nt {
                for j in 0..c {
                    x[i][j] += o[i][j];
                }
            }
            let h = ln(&x, &format!("{pre}.ln2"));
            let h: Vec<Vec<f64>> = lin(&h, &format!("{pre}.ffn_up"))
                .into_iter()
                .map(|r| {
                    r.into_iter()
                        .map(|v| v / (1.0 + (-1.702 * v).exp()))
                        .collect()
                })
                .collect();
            let o = lin(&h, &format!("{pre}.ffn_down"));
            for i in 0..nt {
                for j in 0..c {
                    x[i][j] += o[i][j];
                }
            }
        }
        let want: Vec<f64> = x[1..].iter().flatten().copied().collect();
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(&want) {
            assert!((*g as f64 - w).abs() < 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
        }
    }
}
