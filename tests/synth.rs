//! Integration test of `mmfuser-convert synth` (issue "Real scale"): a tiny synthetic checkpoint
//! (real layout, toy sizes) is written and then converted by `hf-to-gguf`; the outputs are read back.
use mmfuser_convert::formats::checkpoint::tokenizer::proto::SpmModel;
use mmfuser_convert::formats::gguf::GgufFile;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_mmfuser-convert");

fn run(args: &[&std::ffi::OsStr]) -> std::process::Output {
    let o = Command::new(BIN)
        .args(args)
        .output()
        .expect("run the binary");
    assert!(
        o.status.success(),
        "mmfuser-convert {:?} failed ({:?})\nstdout:\n{}\nstderr:\n{}",
        args,
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn json(p: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

#[test]
fn synth_tiny_then_hf_to_gguf() {
    let tmp = tempfile::Builder::new()
        .prefix("mmfuser-synth-")
        .tempdir()
        .unwrap();
    let out = tmp.path().join("synth");
    run(&[
        "synth".as_ref(),
        "--size".as_ref(),
        "tiny".as_ref(),
        out.as_os_str(),
        "--seed".as_ref(),
        "3".as_ref(),
        "--llama-view".as_ref(),
        "-q".as_ref(),
    ]);

    let ck = out.join("checkpoint");
    let cfg = json(&ck.join("config.json"));
    assert_eq!(cfg["model_type"], "llava_llama");
    assert_eq!(cfg["mm_vision_select_layer"], "list-22/-17/-12/-7/-2");
    let index = json(&ck.join("model.safetensors.index.json"));
    let wm = index["weight_map"].as_object().unwrap();
    let last = "model-00002-of-00002.safetensors";
    assert_eq!(wm["model.mm_projector.0.gamma1"], last);
    assert_eq!(wm["model.mm_projector.0.gamma2"], last);
    assert!(wm.values().any(|v| v == "model-00001-of-00002.safetensors"));
    let spm = SpmModel::load(&ck.join("tokenizer.model")).unwrap();
    assert_eq!(spm.pieces.len(), 512);

    let llama = out.join("llama");
    assert_eq!(json(&llama.join("config.json"))["model_type"], "llama");
    let lwm = json(&llama.join("model.safetensors.index.json"));
    let lwm = lwm["weight_map"].as_object().unwrap();
    assert!(lwm.keys().all(|k| !k.contains("mm_projector")));
    assert_eq!(
        lwm.len(),
        wm.keys().filter(|k| !k.contains("mm_projector")).count()
    );
    // The llama view holds the same values as the checkpoint, tensor by tensor (its shards are cut
    // elsewhere, so the bytes sit at other offsets and in other buffers of the writer).
    let tensor = |dir: &Path, map: &serde_json::Map<String, Value>, name: &str| -> Vec<u8> {
        let bytes = std::fs::read(dir.join(map[name].as_str().unwrap())).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensor(name).unwrap().data().to_vec()
    };
    for name in lwm.keys() {
        assert_eq!(
            tensor(&llama, lwm, name),
            tensor(&ck, wm, name),
            "{name} differs between the llama view and the checkpoint"
        );
    }
    assert!(out.join("clip/model.safetensors").is_file());
    assert!(out.join("clip/preprocessor_config.json").is_file());

    // Same seed -> same bytes.
    let out2 = tmp.path().join("synth2");
    run(&[
        "synth".as_ref(),
        "--size".as_ref(),
        "tiny".as_ref(),
        out2.as_os_str(),
        "--seed".as_ref(),
        "3".as_ref(),
        "-q".as_ref(),
    ]);
    for f in [last, "model-00001-of-00002.safetensors"] {
        assert_eq!(
            std::fs::read(ck.join(f)).unwrap(),
            std::fs::read(out2.join("checkpoint").join(f)).unwrap(),
            "{f}"
        );
    }

    let gg = tmp.path().join("gguf");
    run(&[
        "hf-to-gguf".as_ref(),
        ck.as_os_str(),
        "--vision-tower".as_ref(),
        out.join("clip").as_os_str(),
        "--out-dir".as_ref(),
        gg.as_os_str(),
        "-q".as_ref(),
    ]);
    let mut names: Vec<String> = std::fs::read_dir(&gg)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let llm = names
        .iter()
        .find(|n| n.ends_with(".gguf") && !n.starts_with("mmproj-"))
        .expect("LLM gguf");
    let mmproj = names
        .iter()
        .find(|n| n.starts_with("mmproj-") && n.ends_with(".gguf"))
        .expect("mmproj gguf");
    let g = GgufFile::open(gg.join(llm)).unwrap();
    assert_eq!(g.tensors.len(), 2 * 9 + 3, "{names:?}");
    let p = GgufFile::open(gg.join(mmproj)).unwrap();
    assert!(
        p.tensors.iter().any(|t| t.info.name.contains("gamma")),
        "fuser gammas in the mmproj"
    );
}
