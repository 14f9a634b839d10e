//! The CPU forward pass against the float64 references in fixtures/reference/ (made by
//! fixtures/make_fixtures.py; see fixtures/README.md). Every stage must be within 1e-4 relative
//! RMS error. What each reference is:
//! - CLIP hidden states and the LLaMA logits (end to end, on the reference image embeddings, and
//!   text only): transformers' `CLIPVisionModel` / `LlamaForCausalLM` run in float64 (third-party
//!   model code);
//! - the fuser stages (cross attention, fuser output) and the MLP projector (image embeddings):
//!   NOT third-party model code. They come from make_fixtures.py's own PyTorch implementation of
//!   the spec (../shared/spec/llava-mmfuser.md section 3, `torch.nn.functional.grid_sample` for
//!   the deformable sampling; `F.linear` / exact `F.gelu` for the MLP), cross-checked there against
//!   a point-by-point loop of the bilinear / zero-padding rule. For the fuser this test therefore
//!   shows agreement with a second, independent reading of the spec, not with the authors' code.
//!
//! The weights come through the crate's real source adapter (`Source`: recipe name maps, Q/K
//! permutation), from the sharded bf16 safetensors + separate CLIP directory and from the f16
//! pytorch_model.bin with the tower embedded. The hyper-parameters are built here independently
//! from the fixture's JSON files and must equal what `Source` parsed.
//!
//! `fixture_files_match_meta_json` checks every file make_fixtures.py wrote against the size and
//! sha256 in reference/meta.json, so a fixture edited by hand, or regenerated without meta.json,
//! fails here.
use candle_core::{Device, Tensor};
use mmfuser_convert::convert::source::Source;
use mmfuser_convert::cpu::CpuBackend;
use mmfuser_convert::model::hparams::{
    ClipHParams, FuserHParams, LlamaHParams, ModelHParams, ProjectorHParams,
};
use mmfuser_convert::model::{self, WeightSource};
use std::path::{Path, PathBuf};

const TOL: f64 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
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
    let a = mmfuser_convert::formats::npy::read(fx.join("reference").join(name)).unwrap();
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
fn sharded_safetensors_matches_reference() {
    let fx = fixtures();
    let src = Source::open(&fx.join("tiny-llava-mmfuser"), Some(&fx.join("tiny-clip"))).unwrap();
    run_stages(&fx, &src, &src.hparams);
}

#[test]
fn pytorch_bin_with_embedded_tower_matches_reference() {
    let fx = fixtures();
    let src = Source::open(&fx.join("tiny-llava-mmfuser-bin"), None).unwrap();
    run_stages(&fx, &src, &src.hparams);
}

fn run_stages(fx: &Path, ws: &dyn WeightSource, parsed: &ModelHParams) {
    let hp = hparams(fx);
    assert_eq!(
        &hp, parsed,
        "hyper-parameters parsed by Source differ from the fixture's JSON"
    );
    let fx = fx.to_path_buf();
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
    let img = model::encode_image_with(&CpuBackend, ws, &hp, &px).unwrap();
    let t_img = t0.elapsed();
    let t1 = std::time::Instant::now();
    let logits = model::logits_with(&CpuBackend, ws, &hp, &ids, Some(&img.image_embeds)).unwrap();
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
    let l2 = model::logits_with(&CpuBackend, ws, &hp, &ids, Some(&ref_embeds)).unwrap();
    check(
        "logits (reference embeds)",
        &values(&l2),
        &want,
        &mut failures,
    );
    let (_, want) = npy(&fx, "text_only_logits.npy");
    let l3 = model::logits_with(&CpuBackend, ws, &hp, &text_ids, None).unwrap();
    check("text-only logits", &values(&l3), &want, &mut failures);

    assert!(
        failures.is_empty(),
        "stages out of tolerance:\n{}",
        failures.join("\n")
    );
}

/// The directories make_fixtures.py writes. meta.json also lists, as a snapshot, the files other
/// generators own (quant/: fixtures/quant/*.py; tokenizer-interop/): they are regenerated on their
/// own and checked by their own tests, so a new snapshot must not be needed each time.
const MADE_BY_MAKE_FIXTURES: [&str; 4] = [
    "tiny-clip",
    "tiny-llava-mmfuser",
    "tiny-llava-mmfuser-bin",
    "reference",
];

/// Every file make_fixtures.py wrote is listed in reference/meta.json and has exactly the size
/// and sha256 recorded there.
#[test]
fn fixture_files_match_meta_json() {
    use sha2::{Digest, Sha256};
    let fx = fixtures();
    let meta = json(&fx.join("reference/meta.json"));
    let files = meta["files"]
        .as_object()
        .expect("reference/meta.json has a \"files\" object");
    let ours = |rel: &str| {
        MADE_BY_MAKE_FIXTURES
            .iter()
            .any(|d| rel.starts_with(&format!("{d}/")))
    };
    let mut bad = vec![];
    let mut checked = 0;
    for (rel, rec) in files.iter().filter(|(rel, _)| ours(rel)) {
        let (Some(want_sha), Some(want_len)) = (rec["sha256"].as_str(), rec["bytes"].as_u64())
        else {
            bad.push(format!(
                "{rel}: meta.json entry without sha256/bytes: {rec}"
            ));
            continue;
        };
        match std::fs::read(fx.join(rel)) {
            Err(e) => bad.push(format!("fixtures/{rel}: {e}")),
            Ok(b) => {
                let sha: String = Sha256::digest(&b)
                    .iter()
                    .map(|x| format!("{x:02x}"))
                    .collect();
                if b.len() as u64 != want_len || sha != want_sha {
                    bad.push(format!(
                        "fixtures/{rel}: {} bytes, sha256 {sha}; meta.json says {want_len} bytes, {want_sha}",
                        b.len()
                    ));
                }
                checked += 1;
            }
        }
    }
    // ... and listed in full.
    for d in MADE_BY_MAKE_FIXTURES {
        for e in std::fs::read_dir(fx.join(d)).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().to_string();
            let rel = format!("{d}/{name}");
            if rel != "reference/meta.json" && !files.contains_key(&rel) {
                bad.push(format!("fixtures/{rel}: not listed in reference/meta.json"));
            }
        }
    }
    println!(
        "reference/meta.json: {checked} files of make_fixtures.py checked ({} listed files of \
         other generators left to their own tests)",
        files.len() - checked
    );
    assert!(checked >= 20, "meta.json lists only {checked} files");
    assert!(
        bad.is_empty(),
        "fixtures differ from reference/meta.json (regenerate with \
         `~/oracle-venv/bin/python fixtures/make_fixtures.py`, never by hand):\n{}",
        bad.join("\n")
    );
}
