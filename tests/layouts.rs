//! Checkpoints laid out the ways real tools write them (fixtures/layouts/, all written by
//! transformers in fixtures/make_fixtures.py): llava-hf as save_pretrained writes it and as a raw
//! state_dict spells it, the LLaVA repository's layout with a transformers 5 tower embedded and
//! no vision_config (the tower named only by hub id), a transformers 5 CLIPVisionModel directory
//! and a CLIPModel directory. One model underneath: every layout must give the same tensors, and
//! their logits must match transformers' LlavaForConditionalGeneration (float64).
mod common;
use common::*;
use mmfuser_convert::gguf::GgufFile;
use std::path::{Path, PathBuf};

fn layout(p: &str) -> PathBuf {
    fixture("layouts").join(p)
}

/// Converts `ckpt` (F32) into `out` and returns (LLM path, mmproj path).
fn convert_f32(ckpt: &str, tower: Option<&str>, out: &Path) -> (PathBuf, PathBuf) {
    let t = tower.map(layout);
    convert(&layout(ckpt), t.as_deref(), out, &["--outtype", "f32"]).ok();
    let name = Path::new(ckpt).file_name().unwrap().to_string_lossy();
    (
        out.join(format!("{name}-F32.gguf")),
        out.join(format!("mmproj-{name}-F32.gguf")),
    )
}

/// (name, type, shape, bytes) of every tensor, in file order.
fn tensors(path: &Path) -> Vec<(String, String, Vec<u64>, Vec<u8>)> {
    let g = GgufFile::open(path).unwrap();
    g.tensors
        .iter()
        .map(|t| {
            (
                t.info.name.clone(),
                format!("{:?}", t.info.ty),
                t.info.ne.clone(),
                g.data(t).to_vec(),
            )
        })
        .collect()
}

fn assert_same_tensors(a: &Path, b: &Path) {
    let (ta, tb) = (tensors(a), tensors(b));
    assert!(!ta.is_empty());
    let names = |t: &[(String, String, Vec<u64>, Vec<u8>)]| -> Vec<String> {
        t.iter().map(|x| x.0.clone()).collect()
    };
    assert_eq!(names(&ta), names(&tb), "{} vs {}", a.display(), b.display());
    for (x, y) in ta.iter().zip(&tb) {
        assert!(
            x == y,
            "tensor {} differs: {} vs {}",
            x.0,
            a.display(),
            b.display()
        );
    }
}

fn rel_rms(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got.iter().zip(want).map(|(g, w)| (g - w) * (g - w)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den).sqrt()
}

/// verify on the reference inputs; both logit sets (from the checkpoint and from the GGUF files)
/// must match transformers' logits. f32 compute against a float64 reference: measured 2.3e-7.
fn check_logits_against_transformers(ckpt: &str, llm: &Path, mmproj: &Path, dump: &Path) {
    let reference = layout("reference");
    run(
        args([
            "verify".as_ref(),
            layout(ckpt).as_os_str(),
            "--gguf".as_ref(),
            llm.as_os_str(),
            "--mmproj".as_ref(),
            mmproj.as_os_str(),
            "--pixel-values".as_ref(),
            reference.join("pixel_values.npy").as_os_str(),
            "--input-ids".as_ref(),
            reference.join("input_ids.json").as_os_str(),
            "--dump-logits".as_ref(),
            dump.as_os_str(),
            "--device".as_ref(),
            "cpu".as_ref(),
        ]),
        dump.parent().unwrap(),
    )
    .ok();
    let want = mmfuser_convert::npy::read(reference.join("logits.npy")).unwrap();
    for side in ["source.npy", "artefact.npy"] {
        let got = mmfuser_convert::npy::read(dump.join(side)).unwrap();
        assert_eq!(got.shape, want.shape, "{ckpt} {side}");
        let e = rel_rms(&got.to_f64().unwrap(), &want.to_f64().unwrap());
        assert!(
            e < 1e-5,
            "{ckpt} {side}: relative RMS error {e:.2e} against transformers"
        );
    }
}

#[test]
fn llava_hf_layout_matches_transformers() {
    let tmp = tempdir();
    let out = tmp.path().join("out");
    let (llm, mmproj) = convert_f32("tiny-llava-hf", None, &out);
    let g = GgufFile::open(&mmproj).unwrap();
    assert_eq!(g.get_str("clip.projector_type").unwrap(), "mlp");
    assert!(g.tensor("mm.0.weight").is_some() && g.tensor("mm.2.bias").is_some());
    // vision_feature_layer -2 of 2 layers: hidden state 1, so one block is written
    assert_eq!(g.get_u32("clip.vision.block_count").unwrap(), 1);
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("tiny-llava-hf-F32.manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(m["recipe"], "llava-hf");
    check_logits_against_transformers("tiny-llava-hf", &llm, &mmproj, &tmp.path().join("dump"));
}

#[test]
fn llava_hf_state_dict_spelling_gives_the_same_tensors() {
    let tmp = tempdir();
    let (a_llm, a_mm) = convert_f32("tiny-llava-hf", None, &tmp.path().join("a"));
    let (b_llm, b_mm) = convert_f32("tiny-llava-hf-sd", None, &tmp.path().join("b"));
    assert_same_tensors(&a_llm, &b_llm);
    assert_same_tensors(&a_mm, &b_mm);
}

#[test]
fn llava_repo_layout_with_transformers5_tower_and_no_vision_config() {
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(layout("tiny-llava-1.5/config.json")).unwrap(),
    )
    .unwrap();
    assert!(
        cfg.get("vision_config").is_none(),
        "the fixture must name its tower only by hub id"
    );
    let tmp = tempdir();
    let (a_llm, a_mm) = convert_f32("tiny-llava-hf", None, &tmp.path().join("a"));
    let (b_llm, b_mm) = convert_f32("tiny-llava-1.5", None, &tmp.path().join("b"));
    assert_same_tensors(&a_llm, &b_llm);
    assert_same_tensors(&a_mm, &b_mm);
    check_logits_against_transformers("tiny-llava-1.5", &b_llm, &b_mm, &tmp.path().join("dump"));
}

#[test]
fn transformers5_tower_dir_and_clip_model_dir() {
    let tmp = tempdir();
    let (e_llm, e_mm) = convert_f32("tiny-llava-1.5", None, &tmp.path().join("embedded"));
    for tower in ["tiny-clip-t5", "tiny-clip-model"] {
        let out = tmp.path().join(tower);
        let (llm, mm) = convert_f32("tiny-llava-1.5", Some(tower), &out);
        assert_same_tensors(&e_llm, &llm);
        assert_same_tensors(&e_mm, &mm);
        let m: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("tiny-llava-1.5-F32.manifest.json")).unwrap(),
        )
        .unwrap();
        let dropped: Vec<&str> = m["dropped"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        // the embedded copy is not used when --vision-tower is given
        assert!(dropped.contains(&"model.vision_tower.vision_tower.embeddings.class_embedding"));
        if tower == "tiny-clip-model" {
            assert!(
                dropped.iter().any(|d| d.starts_with("text_model.")),
                "{dropped:?}"
            );
            assert!(
                dropped.contains(&"vision_model.post_layernorm.weight"),
                "{dropped:?}"
            );
        } else {
            assert!(dropped.contains(&"post_layernorm.weight"), "{dropped:?}");
        }
    }
}

fn llava15_copy_with_hub_id(tmp: &Path, hub: &str) -> PathBuf {
    let ck = tmp.join("ck");
    copy_dir(&layout("tiny-llava-1.5"), &ck);
    edit_json(&ck.join("config.json"), |c| {
        c["mm_vision_tower"] = hub.into()
    });
    ck
}

#[test]
fn unknown_hub_id_without_vision_config_asks_for_vision_tower() {
    let tmp = tempdir();
    let ck = llava15_copy_with_hub_id(tmp.path(), "someone/unknown-clip");
    let out = tmp.path().join("out");
    let r = convert(&ck, None, &out, &[]);
    assert_rejected(
        &r,
        1,
        &out,
        &[],
        &["someone/unknown-clip", "--vision-tower", "vision_config"],
    );
}

#[test]
fn built_in_tower_is_checked_against_the_shapes() {
    // the real entry (CLIP ViT-L/14-336, 1024 wide) against the tiny tower's tensors
    let tmp = tempdir();
    let ck = llava15_copy_with_hub_id(tmp.path(), "openai/clip-vit-large-patch14-336");
    edit_json(&ck.join("config.json"), |c| {
        c.as_object_mut().unwrap().remove("mm_hidden_size");
    });
    let out = tmp.path().join("out");
    let r = convert(&ck, None, &out, &[]);
    assert_rejected(
        &r,
        1,
        &out,
        &[],
        &[
            "model.vision_tower.vision_tower.",
            "shape",
            "built-in one for 'openai/clip-vit-large-patch14-336'",
        ],
    );
}

#[test]
fn two_spellings_of_one_tensor_are_refused() {
    let tmp = tempdir();
    let tower = tmp.path().join("tower");
    copy_dir(&layout("tiny-clip-t5"), &tower);
    let mut st = StFile::read(&tower.join("model.safetensors"));
    let mut twin = st
        .tensors
        .iter()
        .find(|t| t.name == "embeddings.class_embedding")
        .unwrap()
        .clone();
    twin.name = "vision_model.embeddings.class_embedding".into();
    st.tensors.push(twin);
    st.write(&tower.join("model.safetensors"));
    let out = tmp.path().join("out");
    let r = convert(&layout("tiny-llava-1.5"), Some(&tower), &out, &[]);
    assert_rejected(
        &r,
        1,
        &out,
        &[],
        &[
            "embeddings.class_embedding",
            "vision_model.embeddings.class_embedding",
            "two spellings",
        ],
    );
}

#[test]
fn prompt_encoded_from_tokenizer_json_like_transformers() {
    let ck = layout("tiny-llava-hf");
    assert!(!ck.join("tokenizer.model").exists() && ck.join("tokenizer.json").exists());
    let want: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(layout("reference/prompt_ids.json")).unwrap(),
    )
    .unwrap();
    let ids: Vec<i64> = want["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    let got = mmfuser_convert::checkpoint::tokenizer::encode_llava_prompt(
        &ck,
        want["prompt"].as_str().unwrap(),
    )
    .unwrap();
    assert_eq!(got, ids);
    // and verify's default probe (that prompt, a synthetic image) runs on such a checkpoint
    let tmp = tempdir();
    let out = tmp.path().join("out");
    let (llm, mmproj) = convert_f32("tiny-llava-hf", None, &out);
    let r = run(
        args([
            "verify".as_ref(),
            ck.as_os_str(),
            "--gguf".as_ref(),
            llm.as_os_str(),
            "--mmproj".as_ref(),
            mmproj.as_os_str(),
            "--device".as_ref(),
            "cpu".as_ref(),
        ]),
        tmp.path(),
    )
    .ok();
    assert!(r.stdout.contains("PASS"), "{}", r.stdout);
}
