//! Checkpoints laid out the ways real tools write them (fixtures/layouts/, all written by
//! transformers in fixtures/make_fixtures.py): llava-hf as save_pretrained writes it and as a raw
//! state_dict spells it, the LLaVA repository's layout with a transformers 5 tower embedded and
//! no vision_config (the tower named only by hub id), a transformers 5 CLIPVisionModel directory
//! and a CLIPModel directory. One model underneath: every layout must give the same tensors, and
//! their logits must match transformers' LlavaForConditionalGeneration (float64).
use crate::common::*;
use mmfuser_convert::formats::gguf::GgufFile;
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
    let want = mmfuser_convert::formats::npy::read(reference.join("logits.npy")).unwrap();
    for side in ["source.npy", "artefact.npy"] {
        let got = mmfuser_convert::formats::npy::read(dump.join(side)).unwrap();
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
    // tokenizer.json only, 514 tokens, 528 embedding rows: the token list is padded to the rows
    // (llama.cpp takes n_vocab from it and refuses a token_embd of another size)
    let l = GgufFile::open(&llm).unwrap();
    match l.get("tokenizer.ggml.tokens") {
        Some(mmfuser_convert::formats::gguf::Value::Array(_, a)) => assert_eq!(a.len(), 528),
        other => panic!("tokenizer.ggml.tokens: {other:?}"),
    }
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
    let got = mmfuser_convert::formats::checkpoint::tokenizer::encode_llava_prompt(
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

/// gguf-py (0.19.0, what convert_hf_to_gguf.py uses) run on `script` with `args`; its stdout as JSON.
fn gguf_py(script: &str, args: &[&std::ffi::OsStr]) -> serde_json::Value {
    let py = std::env::var("MMFUSER_PYTHON")
        .expect("MMFUSER_PYTHON must point at a Python with gguf==0.19.0 (run .ci/run)");
    let o = std::process::Command::new(py)
        .args(["-c", script])
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn model_id_parts_and_size_labels_as_gguf_py() {
    use mmfuser_convert::convert::naming::{model_id_parts, size_label};
    let ids = [
        "liuhaotian/llava-v1.5-7b",
        "llava-hf/llava-1.5-13b-hf",
        "meta-llama/Llama-2-7b-chat-hf",
        "lmsys/vicuna-7b-v1.5",
        "LLaVA-MMFuser-13B",
        "mistralai/Mixtral-8x7B-Instruct-v0.1",
        "bigscience/bloom-7b1",
        "tiny-org/tiny-llava-mmfuser",
        "Qwen2-VL-2B-Instruct-GPTQ-Int4",
        "some model with spaces",
        "model-Q4_K_M-F16",
        "phi-3-mini-128k-instruct",
        "gpt2-large",
        "x-iter3-1_5B",
        "T5-a7b-xxl",
    ];
    let totals: [i64; 4] = [0, 1_312_768, 6_738_415_616, 13_015_864_320];
    let script = "import json,sys,gguf\nids=json.loads(sys.argv[1]); ts=json.loads(sys.argv[2])\n\
print(json.dumps({'parts': [[list(gguf.Metadata.get_model_id_components(i, t)[2:]) for t in ts] for i in ids],\
 'labels': [gguf.size_label(t, 0, 0, 0) for t in ts if t > 0] + [gguf.size_label(n, 0, 0, 0) for n in (999, 1000, 1001, 999999, 1000001, 5e8, 9.99e9, 1.5e12)]}))";
    let want = gguf_py(
        script,
        &[
            serde_json::to_string(&ids).unwrap().as_ref(),
            serde_json::to_string(&totals).unwrap().as_ref(),
        ],
    );
    for (i, id) in ids.iter().enumerate() {
        for (j, &t) in totals.iter().enumerate() {
            let p = model_id_parts(id, t);
            let got = serde_json::json!([p.basename, p.finetune, p.version, p.size_label]);
            assert_eq!(got, want["parts"][i][j], "{id} with {t} parameters");
        }
    }
    let mut counts: Vec<u64> = totals
        .iter()
        .filter(|&&t| t > 0)
        .map(|&t| t as u64)
        .collect();
    counts.extend([
        999,
        1000,
        1001,
        999_999,
        1_000_001,
        500_000_000,
        9_990_000_000,
        1_500_000_000_000,
    ]);
    for (k, &n) in counts.iter().enumerate() {
        assert_eq!(serde_json::json!(size_label(n)), want["labels"][k], "{n}");
    }
}

#[test]
fn llm_basename_and_size_label_as_convert_hf_to_gguf() {
    let tmp = tempdir();
    for (dir, name_or_path) in [
        ("llava-v1.5-7b", "./checkpoints/llava-v1.5-7b"),
        ("tiny-llava-1.5", "tiny-org/tiny-llava-1.5"),
        ("LLaVA-MMFuser-13B", "tiny-org/tiny-llava"),
    ] {
        let ck = tmp.path().join(dir);
        copy_dir(&layout("tiny-llava-1.5"), &ck);
        edit_json(&ck.join("config.json"), |c| {
            c["_name_or_path"] = name_or_path.into()
        });
        let out = tmp.path().join(format!("out-{dir}"));
        convert(&ck, None, &out, &[]).ok();
        let llm = out.join(format!("{dir}-F16.gguf"));
        // gguf-py's Metadata.load on the checkpoint directory, with the parameter count of our
        // LLM file as its writer would count it, then the converter's size_label fallback
        let script = "import json,sys,gguf\nfrom pathlib import Path\n\
r=gguf.GGUFReader(sys.argv[2]); total=sum(int(t.n_elements) for t in r.tensors)\n\
m=gguf.Metadata.load(None, Path(sys.argv[1]), None, total)\n\
size=m.size_label if m.size_label is not None else gguf.size_label(total, 0, 0, 0)\n\
got={k: str(bytes(r.fields[k].parts[r.fields[k].data[0]]), 'utf-8') for k in ('general.basename','general.size_label') if k in r.fields}\n\
print(json.dumps({'want': {'general.basename': m.basename, 'general.size_label': size}, 'got': got}))";
        let v = gguf_py(script, &[ck.as_os_str(), llm.as_os_str()]);
        let want = v["want"].as_object().unwrap();
        for (k, w) in want {
            assert_eq!(
                v["got"].get(k).unwrap_or(&serde_json::Value::Null),
                w,
                "{dir}: {k}"
            );
        }
    }
}
