//! config.json, the tower's config.json and its preprocessor_config.json.
use super::*;
use serde_json::{json, Value as Json};

#[test]
fn config_files() {
    type Edit = Box<dyn Fn(&mut Json)>;
    let set = |k: &'static str, v: Json| -> Edit { Box::new(move |j: &mut Json| j[k] = v.clone()) };
    let del = |k: &'static str| -> Edit {
        Box::new(move |j: &mut Json| {
            j.as_object_mut().unwrap().remove(k);
        })
    };
    let cfg = "ckpt/config.json";
    // The checkpoint's config.json: errors name it and `extra`.
    let llm = |name: &str, edit: Edit, extra: &[&str]| {
        CkCase::new(
            name,
            st_copy,
            move |ck| edit_json(&ck.ckpt.join("config.json"), |j| edit(j)),
            &[&[cfg][..], extra].concat(),
        )
    };
    let tcfg = "tower/config.json";
    // The tower's config.json (its vision_config where there is one).
    let tower = |name: &str, edit: Edit, extra: &[&str]| {
        CkCase::new(
            name,
            st_copy,
            move |ck| {
                edit_json(&ck.tower.as_ref().unwrap().join("config.json"), |j| {
                    let v = if j.get("vision_config").is_some() {
                        &mut j["vision_config"]
                    } else {
                        j
                    };
                    edit(v)
                })
            },
            &[&[tcfg][..], extra].concat(),
        )
    };
    // The tower's preprocessor_config.json: errors name it, not config.json (issue #16 item 12).
    let pcfg = "tower/preprocessor_config.json";
    let pre = |name: &str, edit: Edit, key: &str| {
        CkCase::new(
            format!("preprocessor {name}"),
            st_copy,
            move |ck| {
                edit_json(
                    &ck.tower.as_ref().unwrap().join("preprocessor_config.json"),
                    |j| edit(j),
                )
            },
            &[pcfg, key],
        )
    };
    // config.json replaced by `bytes`.
    let raw = |name: &str, bytes: &'static [u8]| {
        CkCase::new(
            name,
            st_copy,
            move |ck| std::fs::write(ck.ckpt.join("config.json"), bytes).unwrap(),
            &[cfg],
        )
    };
    let list = vec![
        llm("hidden_size missing", del("hidden_size"), &["hidden_size"]),
        llm("vocab_size missing", del("vocab_size"), &["vocab_size"]),
        llm(
            "num_hidden_layers a string",
            set("num_hidden_layers", json!("2")),
            &["num_hidden_layers"],
        ),
        llm(
            "hidden_size not a multiple of the heads",
            set("hidden_size", json!(250)),
            &["250"],
        ),
        llm(
            "num_attention_heads 0",
            set("num_attention_heads", json!(0)),
            &["num_attention_heads"],
        ),
        llm(
            "num_key_value_heads not dividing the heads",
            set("num_key_value_heads", json!(3)),
            &["num_key_value_heads"],
        ),
        llm(
            "head_dim contradicting hidden_size / heads",
            set("head_dim", json!(32)),
            &["head_dim"],
        ),
        llm(
            "num_hidden_layers 10^9",
            set("num_hidden_layers", json!(1_000_000_000u64)),
            &["num_hidden_layers"],
        ),
        llm(
            "num_hidden_layers u64::MAX",
            set("num_hidden_layers", json!(u64::MAX)),
            &["num_hidden_layers"],
        ),
        llm(
            "vocab_size 2^40",
            set("vocab_size", json!(1u64 << 40)),
            &["vocab_size"],
        ),
        // Issue #16 item 11: values that used to convert (or silently become defaults).
        llm(
            "rope_theta 0",
            set("rope_theta", json!(0.0)),
            &["rope_theta"],
        ),
        llm(
            "rope_theta -1",
            set("rope_theta", json!(-1.0)),
            &["rope_theta"],
        ),
        llm(
            "rope_theta \"abc\"",
            set("rope_theta", json!("abc")),
            &["rope_theta"],
        ),
        llm(
            "rms_norm_eps negative",
            set("rms_norm_eps", json!(-1e-5)),
            &["rms_norm_eps"],
        ),
        llm(
            "rms_norm_eps 1e300",
            set("rms_norm_eps", json!(1e300)),
            &["rms_norm_eps"],
        ),
        llm(
            "max_position_embeddings -5",
            set("max_position_embeddings", json!(-5)),
            &["max_position_embeddings"],
        ),
        llm(
            "max_position_embeddings 2^40",
            set("max_position_embeddings", json!(1u64 << 40)),
            &["max_position_embeddings"],
        ),
        llm(
            "head size 1 (256 heads of 256 columns)",
            set("num_attention_heads", json!(256)),
            &["num_attention_heads", "odd"],
        ),
        llm(
            "mm_vision_select_layer garbage",
            set("mm_vision_select_layer", json!("list-a/b")),
            &["mm_vision_select_layer"],
        ),
        llm(
            "mm_vision_select_layer out of range",
            set("mm_vision_select_layer", json!([-100, -6, -4, -3, -2])),
            &["-100"],
        ),
        llm(
            "mm_vision_select_layer i64::MIN",
            set("mm_vision_select_layer", json!([i64::MIN, -6, -4, -3, -2])),
            &[],
        ),
        llm(
            "four selected layers for MMFuser",
            set("mm_vision_select_layer", json!([-8, -6, -4, -2])),
            &["5 selected layers"],
        ),
        llm(
            "mm_hidden_size contradicting the tower",
            set("mm_hidden_size", json!(1024)),
            &["mm_hidden_size"],
        ),
        llm(
            "model_type not LLaVA",
            set("model_type", json!("bert")),
            &["bert"],
        ),
        llm(
            "mm_projector_type unknown",
            set("mm_projector_type", json!("linear")),
            &["linear"],
        ),
        llm(
            "mmfuser_n_heads 0",
            set("mmfuser_n_heads", json!(0)),
            &["fuser"],
        ),
        llm(
            "mmfuser_n_heads 7",
            set("mmfuser_n_heads", json!(7)),
            &["fuser"],
        ),
        llm(
            "mm_vision_select_layer missing",
            del("mm_vision_select_layer"),
            &["mm_vision_select_layer"],
        ),
        tower(
            "tower hidden_act unknown",
            set("hidden_act", json!("relu")),
            &["relu"],
        ),
        tower(
            "tower image_size not a multiple of patch_size",
            set("image_size", json!(57)),
            &["57"],
        ),
        tower(
            "tower patch_size 0",
            set("patch_size", json!(0)),
            &["patch_size"],
        ),
        tower(
            "tower num_hidden_layers 10^9",
            set("num_hidden_layers", json!(1_000_000_000u64)),
            &[],
        ),
        tower(
            "tower num_hidden_layers 3 (selected layers out of range)",
            set("num_hidden_layers", json!(3)),
            &["mm_vision_select_layer", "ckpt/config.json"],
        ),
        tower(
            "tower image_size 2^40 with patch_size 1 (patch count overflows)",
            Box::new(|j: &mut Json| {
                j["image_size"] = json!(1u64 << 40);
                j["patch_size"] = json!(1);
            }),
            &["image_size"],
        ),
        tower(
            "tower image_size 2^20 with patch_size 1 (patch count overflows)",
            Box::new(|j: &mut Json| {
                j["image_size"] = json!(1u64 << 20);
                j["patch_size"] = json!(1);
            }),
            &["too many patches"],
        ),
        tower(
            "tower num_hidden_layers i64::MAX (fuzz: config_parser)",
            set("num_hidden_layers", json!(i64::MAX)),
            &["num_hidden_layers"],
        ),
        tower(
            "tower layer_norm_eps -1",
            set("layer_norm_eps", json!(-1.0)),
            &["layer_norm_eps"],
        ),
        tower(
            "tower intermediate_size missing",
            del("intermediate_size"),
            &["intermediate_size"],
        ),
        pre(
            "image_std 0",
            set("image_std", json!([0.0, 0.26, 0.27])),
            "image_std",
        ),
        pre(
            "image_std 1e300",
            set("image_std", json!([1e300, 0.26, 0.27])),
            "image_std",
        ),
        pre(
            "image_mean a string",
            set("image_mean", json!("grey")),
            "image_mean",
        ),
        pre(
            "image_mean of 2",
            set("image_mean", json!([0.5, 0.5])),
            "image_mean",
        ),
        raw("config.json not JSON", b"{\"hidden_size\": 256,"),
        raw("config.json a JSON array", b"[]"),
        raw("config.json not UTF-8", b"{\"model_type\": \"llava\xff\"}"),
        CkCase::new(
            "config.json missing",
            st_copy,
            |ck| std::fs::remove_file(ck.ckpt.join("config.json")).unwrap(),
            &[cfg],
        ),
        CkCase::new(
            "tower config.json missing",
            st_copy,
            |ck| std::fs::remove_file(ck.tower.as_ref().unwrap().join("config.json")).unwrap(),
            &[tcfg],
        ),
    ];
    refuse_ckpts("config files", list);
}

#[test]
fn issue16_cases() {
    run_rows("issue 16, config files", issue16_rows());
}

fn issue16_rows() -> Vec<Row> {
    vec![
        // 12. Messages.
        Row {
            case: "ESC bytes from config.json are escaped on the terminal / hf-to-gguf",
            cmd: |e| {
                edit_json(&e.ck.join("config.json"), |j| {
                    j["model_type"] = json!("\u{1b}[2J\u{1b}[31mbert")
                });
                hf(e)
            },
            env: &[],
            code: 1,
            needles: &["config.json", "\\u{1b}[2J"],
            keep: &[],
        },
        Row {
            case: "image_std 0 in preprocessor_config.json names that file / verify",
            cmd: |e| {
                edit_json(&e.tower.join("preprocessor_config.json"), |j| {
                    j["image_std"] = json!([0.0, 0.0, 0.0])
                });
                verify16(e, vec![])
            },
            env: &[],
            code: 1,
            needles: &["preprocessor_config.json", "image_std"],
            keep: &[],
        },
    ]
}
