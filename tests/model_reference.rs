//! The CPU forward pass against the float64 PyTorch/transformers references in fixtures/reference/
//! (made by fixtures/make_fixtures.py). Every stage must be within 1e-4 relative RMS error.
//!
//! The weights are read straight from the fixture safetensors through a small test adapter
//! (HF names -> GGUF names, Q/K rows permuted as llama.cpp's converter does); the crate's real
//! source adapter will replace it.
use candle_core::{Device, Tensor};
use mmfuser_convert::error::{Error, Result};
use mmfuser_convert::gguf::types::GgmlType;
use mmfuser_convert::hparams::{
    ClipHParams, FuserHParams, LlamaHParams, ModelHParams, ProjectorHParams,
};
use mmfuser_convert::model::{self, RawTensor, WeightSource};
use safetensors::{Dtype, SafeTensors};
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const TOL: f64 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// A GGUF-named tensor inside one of the mapped files; `permute` = heads for llama.cpp's Q/K permute.
struct Entry {
    file: usize,
    hf_name: String,
    permute: Option<usize>,
}

struct FixtureWeights {
    paths: Vec<PathBuf>,
    maps: Vec<memmap2::Mmap>,
    entries: HashMap<String, Entry>,
}

fn gguf_name(hf: &str, n_head: usize, n_head_kv: usize) -> Option<(String, Option<usize>)> {
    if let Some(r) = hf.strip_prefix("vision_model.") {
        let fixed = match r {
            "embeddings.patch_embedding.weight" => Some("v.patch_embd.weight".to_string()),
            "embeddings.class_embedding" => Some("v.class_embd".to_string()),
            "embeddings.position_embedding.weight" => Some("v.position_embd.weight".to_string()),
            _ => r
                .strip_prefix("pre_layrnorm.")
                .map(|s| format!("v.pre_ln.{s}")),
        };
        if fixed.is_some() {
            return fixed.map(|n| (n, None));
        }
        let r = r.strip_prefix("encoder.layers.")?;
        let (i, rest) = r.split_once('.')?;
        let (module, param) = rest.rsplit_once('.')?;
        let m = match module {
            "self_attn.q_proj" => "attn_q",
            "self_attn.k_proj" => "attn_k",
            "self_attn.v_proj" => "attn_v",
            "self_attn.out_proj" => "attn_out",
            "layer_norm1" => "ln1",
            "layer_norm2" => "ln2",
            "mlp.fc1" => "ffn_up",
            "mlp.fc2" => "ffn_down",
            _ => return None,
        };
        return Some((format!("v.blk.{i}.{m}.{param}"), None));
    }
    match hf {
        "model.embed_tokens.weight" => return Some(("token_embd.weight".into(), None)),
        "model.norm.weight" => return Some(("output_norm.weight".into(), None)),
        "lm_head.weight" => return Some(("output.weight".into(), None)),
        _ => {}
    }
    if let Some(r) = hf.strip_prefix("model.mm_projector.") {
        return Some(match r.strip_prefix("0.") {
            Some(f) => (format!("mm.fuser.{f}"), None),
            None => (format!("mm.{r}"), None),
        });
    }
    let r = hf.strip_prefix("model.layers.")?;
    let (i, rest) = r.split_once('.')?;
    let (n, p) = match rest {
        "input_layernorm.weight" => ("attn_norm", None),
        "post_attention_layernorm.weight" => ("ffn_norm", None),
        "self_attn.q_proj.weight" => ("attn_q", Some(n_head)),
        "self_attn.k_proj.weight" => ("attn_k", Some(n_head_kv)),
        "self_attn.v_proj.weight" => ("attn_v", None),
        "self_attn.o_proj.weight" => ("attn_output", None),
        "mlp.gate_proj.weight" => ("ffn_gate", None),
        "mlp.up_proj.weight" => ("ffn_up", None),
        "mlp.down_proj.weight" => ("ffn_down", None),
        _ => return None,
    };
    Some((format!("blk.{i}.{n}.weight"), p))
}

impl FixtureWeights {
    fn open(paths: &[PathBuf], n_head: usize, n_head_kv: usize) -> Self {
        let mut maps = Vec::new();
        let mut entries = HashMap::new();
        for (fi, p) in paths.iter().enumerate() {
            let f = std::fs::File::open(p).unwrap();
            let map = unsafe { memmap2::Mmap::map(&f) }.unwrap();
            let st = SafeTensors::deserialize(&map).unwrap();
            for name in st.names() {
                // Never used by LLaVA (the tower's output norm).
                if name.starts_with("vision_model.post_layernorm.") {
                    continue;
                }
                let (g, permute) = gguf_name(name, n_head, n_head_kv)
                    .unwrap_or_else(|| panic!("{}: no GGUF name for {name}", p.display()));
                entries.insert(
                    g,
                    Entry {
                        file: fi,
                        hf_name: name.to_string(),
                        permute,
                    },
                );
            }
            maps.push(map);
        }
        FixtureWeights {
            paths: paths.to_vec(),
            maps,
            entries,
        }
    }
}

impl WeightSource for FixtureWeights {
    fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| Error::tensor("fixtures", name, "not in the fixture files"))?;
        let path = &self.paths[e.file];
        let st = SafeTensors::deserialize(&self.maps[e.file])
            .map_err(|err| Error::input(path, err.to_string()))?;
        let t = st
            .tensor(&e.hf_name)
            .map_err(|err| Error::tensor(path, &e.hf_name, err.to_string()))?;
        let (ty, es) = match t.dtype() {
            Dtype::F32 => (GgmlType::F32, 4),
            Dtype::F16 => (GgmlType::F16, 2),
            Dtype::BF16 => (GgmlType::BF16, 2),
            d => return Err(Error::tensor(path, &e.hf_name, format!("dtype {d:?}"))),
        };
        let shape = t.shape().to_vec();
        let data = match e.permute {
            None => Cow::Borrowed(t.data()),
            Some(heads) => {
                // llama.cpp convert_hf_to_gguf `permute`: within each head,
                // output row h*hd + 2i + a takes source row h*hd + a*(hd/2) + i.
                let rows = shape[0];
                let row_bytes = shape[1..].iter().product::<usize>() * es;
                let hd = rows / heads;
                let src = t.data();
                let mut out = vec![0u8; src.len()];
                for h in 0..heads {
                    for i in 0..hd / 2 {
                        for a in 0..2 {
                            let d = h * hd + 2 * i + a;
                            let s = h * hd + a * (hd / 2) + i;
                            out[d * row_bytes..(d + 1) * row_bytes]
                                .copy_from_slice(&src[s * row_bytes..(s + 1) * row_bytes]);
                        }
                    }
                }
                Cow::Owned(out)
            }
        };
        Ok(RawTensor { ty, shape, data })
    }
    fn has(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
    fn origin(&self) -> PathBuf {
        fixtures()
    }
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[allow(clippy::excessive_precision)] // CLIP mean/std as published (unused by the forward pass)
fn hparams(fx: &Path) -> ModelHParams {
    let meta = json(&fx.join("reference/meta.json"));
    let llm = json(&fx.join("tiny-llava-mmfuser/config.json"));
    let clip = json(&fx.join("tiny-clip/config.json"));
    let u =
        |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k}")) as usize;
    let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k}")) as f32;
    let fm = &meta["fuser"];
    ModelHParams {
        llama: LlamaHParams {
            n_layer: u(&llm, "num_hidden_layers"),
            n_embd: u(&llm, "hidden_size"),
            n_ff: u(&llm, "intermediate_size"),
            n_head: u(&llm, "num_attention_heads"),
            n_head_kv: u(&llm, "num_key_value_heads"),
            n_vocab: u(&llm, "vocab_size"),
            n_ctx: u(&llm, "max_position_embeddings"),
            rms_eps: f(&llm, "rms_norm_eps"),
            rope_theta: f(&llm, "rope_theta"),
        },
        clip: ClipHParams {
            image_size: u(&clip, "image_size"),
            patch_size: u(&clip, "patch_size"),
            n_embd: u(&clip, "hidden_size"),
            n_ff: u(&clip, "intermediate_size"),
            n_head: u(&clip, "num_attention_heads"),
            n_layer: u(&clip, "num_hidden_layers"),
            eps: f(&clip, "layer_norm_eps"),
            quick_gelu: clip["hidden_act"] == "quick_gelu",
            image_mean: [0.48145466, 0.4578275, 0.40821073],
            image_std: [0.26862954, 0.26130258, 0.27577711],
            feature_layers: meta["select_hidden_state_indices"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect(),
        },
        projector: ProjectorHParams::MmFuser(FuserHParams {
            n_heads: u(fm, "M"),
            n_levels: u(fm, "L"),
            n_points: u(fm, "P"),
            eps: f(fm, "layer_norm_eps"),
        }),
    }
}

fn npy(fx: &Path, name: &str) -> (Vec<usize>, Vec<f64>) {
    let a = mmfuser_convert::npy::read(fx.join("reference").join(name)).unwrap();
    (a.shape.clone(), a.to_f64().unwrap())
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

/// sqrt(sum (a-b)^2 / sum b^2).
fn rel_rms(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    (num / den).sqrt()
}

fn check(stage: &str, got: &[f64], want: &[f64], failures: &mut Vec<String>) {
    let r = rel_rms(got, want);
    let max_abs = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    println!("{stage:<28} rel RMS error {r:.3e}  (max abs {max_abs:.3e})");
    if r.is_nan() || r > TOL {
        failures.push(format!("{stage}: relative RMS error {r:.3e} > {TOL:e}"));
    }
}

#[test]
fn tiny_llava_mmfuser_matches_reference() {
    let fx = fixtures();
    if !fx.join("reference/meta.json").exists() {
        eprintln!("fixtures/reference/meta.json missing: skipped");
        return;
    }
    let hp = hparams(&fx);
    let mut files = vec![fx.join("tiny-clip/model.safetensors")];
    for e in std::fs::read_dir(fx.join("tiny-llava-mmfuser")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            files.push(p);
        }
    }
    let ws = FixtureWeights::open(&files, hp.llama.n_head, hp.llama.n_head_kv);
    for g in [
        "mm.fuser.gamma1",
        "mm.fuser.gamma2",
        "v.blk.7.ffn_down.bias",
        "blk.1.attn_k.weight",
    ] {
        assert!(ws.has(g), "{g}");
    }

    let (shape, px) = npy(&fx, "pixel_values.npy");
    let px = Tensor::from_vec(
        px.into_iter().map(|v| v as f32).collect::<Vec<_>>(),
        shape,
        &Device::Cpu,
    )
    .unwrap();
    let ids: Vec<i64> = serde_json::from_value(json(&fx.join("reference/input_ids.json"))).unwrap();
    let text_ids: Vec<i64> =
        serde_json::from_value(json(&fx.join("reference/text_only_ids.json"))).unwrap();

    let t0 = std::time::Instant::now();
    let img = model::encode_image(&ws, &hp, &px).unwrap();
    let t_img = t0.elapsed();
    let t1 = std::time::Instant::now();
    let logits = model::logits(&ws, &hp, &ids, Some(&img.image_embeds)).unwrap();
    let t_llm = t1.elapsed();
    println!(
        "tiny forward (CPU backend): image side {:.1} ms, LLM ({} positions) {:.1} ms, total {:.1} ms",
        t_img.as_secs_f64() * 1e3,
        logits.dim(0).unwrap(),
        t_llm.as_secs_f64() * 1e3,
        (t_img + t_llm).as_secs_f64() * 1e3
    );

    let mut failures = Vec::new();
    let (s, want) = npy(&fx, "clip_hidden_states.npy");
    assert_eq!(s, vec![img.selected.len(), 16, 64]);
    let got: Vec<f64> = img.selected.iter().flat_map(values).collect();
    check("clip hidden states (all 5)", &got, &want, &mut failures);
    let per = want.len() / s[0];
    for (i, layer) in hp.clip.feature_layers.iter().enumerate() {
        let r = i * per..(i + 1) * per;
        check(
            &format!("  hidden_states[{layer}]"),
            &got[r.clone()],
            &want[r],
            &mut failures,
        );
    }
    let (_, want) = npy(&fx, "fuser_cross_attn.npy");
    check(
        "fuser cross attention",
        &values(img.fuser_cross_attn.as_ref().unwrap()),
        &want,
        &mut failures,
    );
    let (_, want) = npy(&fx, "fuser_out.npy");
    check(
        "fuser output",
        &values(img.fuser_out.as_ref().unwrap()),
        &want,
        &mut failures,
    );
    let (s, want) = npy(&fx, "image_embeds.npy");
    assert_eq!(img.image_embeds.dims(), &s[..]);
    check(
        "image embeddings",
        &values(&img.image_embeds),
        &want,
        &mut failures,
    );
    let (s, want) = npy(&fx, "logits.npy");
    assert_eq!(logits.dims(), &s[..]);
    check(
        "logits (end to end)",
        &values(&logits),
        &want,
        &mut failures,
    );

    // The LLM alone, on the reference image embeddings (separates LLM error from image error).
    let (es, ref_embeds) = npy(&fx, "image_embeds.npy");
    let ref_embeds = Tensor::from_vec(
        ref_embeds.into_iter().map(|v| v as f32).collect::<Vec<_>>(),
        es,
        &Device::Cpu,
    )
    .unwrap();
    let l2 = model::logits(&ws, &hp, &ids, Some(&ref_embeds)).unwrap();
    check(
        "logits (reference embeds)",
        &values(&l2),
        &want,
        &mut failures,
    );
    let (_, want) = npy(&fx, "text_only_logits.npy");
    let l3 = model::logits(&ws, &hp, &text_ids, None).unwrap();
    check("text-only logits", &values(&l3), &want, &mut failures);

    assert!(
        failures.is_empty(),
        "stages out of tolerance:\n{}",
        failures.join("\n")
    );
}
