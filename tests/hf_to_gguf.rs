//! Integration tests of `mmfuser-convert hf-to-gguf` (issue "hf-to-gguf"): the built binary is run on
//! the fixtures (and on broken copies of them made here, in temporary directories), and its outputs
//! are read back with our reader (`mmfuser_convert::formats::gguf::GgufFile`) and with candle-core's GGUF
//! reader (an independent implementation). No GPU, no Python (see tests/interop_gguf_py.rs for
//! the gguf-py checks).
//!
//! Broken checkpoints are built by copying a fixture directory and rewriting its files with the
//! small safetensors reader/writer below, never from committed blobs.
use mmfuser_convert::formats::gguf::{GgufFile, Value};
use mmfuser_convert::ground::dtype::GgmlType;
use serde_json::{json, Value as Json};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use crate::common::*;

const NAME: &str = "tiny-llava-mmfuser";
const HUB_ID: &str = "tiny-org/tiny-clip-vit-56";

// ---------------------------------------------------------------------------------------------
// Numbers

fn to_f32(dtype: &str, b: &[u8]) -> Vec<f32> {
    match dtype {
        "F32" => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        "F16" => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        "BF16" => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => panic!("dtype {other}"),
    }
}

/// f32 values stored as `ty` (round to nearest even, as numpy / gguf-py / llama.cpp do).
fn encode(ty: GgmlType, v: &[f32]) -> Vec<u8> {
    match ty {
        GgmlType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        GgmlType::F16 => v
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        GgmlType::BF16 => v
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect(),
        other => panic!("{other}"),
    }
}

fn gguf_to_f32(ty: GgmlType, b: &[u8]) -> Vec<f32> {
    to_f32(ty.name(), b)
}

/// llama.cpp's converter: `w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)`.
fn permute_qk(v: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let half = rows / n_head / 2;
    let mut out = vec![0f32; v.len()];
    // output index (h, i, a) <- input index (h, a, i)
    for h in 0..n_head {
        for i in 0..half {
            for a in 0..2 {
                let dst = (h * half + i) * 2 + a;
                let src = (h * 2 + a) * half + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&v[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

fn sha256_hex(path: &Path) -> String {
    let b = std::fs::read(path).unwrap();
    Sha256::digest(&b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// What the fixture must convert to (written out by hand from config.json / tiny-clip/config.json
// and the spec, independently of schemas/names/*.json).

/// (GGUF name, PyTorch shape) of the language model: 3 + 9 per layer.
fn expected_llm() -> Vec<(String, Vec<usize>)> {
    let (h, ff, v, hd, nh, nkv) = (256, 512, 512, 64, 4, 2);
    let mut t = vec![
        ("token_embd.weight".to_string(), vec![v, h]),
        ("output_norm.weight".to_string(), vec![h]),
        ("output.weight".to_string(), vec![v, h]),
    ];
    for i in 0..2 {
        for (n, s) in [
            ("attn_norm.weight", vec![h]),
            ("attn_q.weight", vec![nh * hd, h]),
            ("attn_k.weight", vec![nkv * hd, h]),
            ("attn_v.weight", vec![nkv * hd, h]),
            ("attn_output.weight", vec![h, nh * hd]),
            ("ffn_norm.weight", vec![h]),
            ("ffn_gate.weight", vec![ff, h]),
            ("ffn_up.weight", vec![ff, h]),
            ("ffn_down.weight", vec![h, ff]),
        ] {
            t.push((format!("blk.{i}.{n}"), s));
        }
    }
    t
}

/// The mmproj: CLIP blocks 0..6 (7 of 8: select layers -8/-6/-4/-3/-2 of 9 hidden states need
/// blocks up to 7 = index 6), the fuser (M=16, L=4, P=4, C=64) and the MLP (mm.1, mm.3).
fn expected_mmproj() -> Vec<(String, Vec<usize>)> {
    let (c, cff, h) = (64, 128, 256);
    let mut t: Vec<(String, Vec<usize>)> = vec![
        ("v.patch_embd.weight".into(), vec![c, 3, 14, 14]),
        ("v.class_embd".into(), vec![c]),
        ("v.position_embd.weight".into(), vec![17, c]),
        ("v.pre_ln.weight".into(), vec![c]),
        ("v.pre_ln.bias".into(), vec![c]),
    ];
    for i in 0..7 {
        for (n, s) in [
            ("attn_q.weight", vec![c, c]),
            ("attn_q.bias", vec![c]),
            ("attn_k.weight", vec![c, c]),
            ("attn_k.bias", vec![c]),
            ("attn_v.weight", vec![c, c]),
            ("attn_v.bias", vec![c]),
            ("attn_out.weight", vec![c, c]),
            ("attn_out.bias", vec![c]),
            ("ln1.weight", vec![c]),
            ("ln1.bias", vec![c]),
            ("ln2.weight", vec![c]),
            ("ln2.bias", vec![c]),
            ("ffn_up.weight", vec![cff, c]),
            ("ffn_up.bias", vec![cff]),
            ("ffn_down.weight", vec![c, cff]),
            ("ffn_down.bias", vec![c]),
        ] {
            t.push((format!("v.blk.{i}.{n}"), s));
        }
    }
    let (m, l, p) = (16, 4, 4);
    for (attn, lv) in [("cross_attn", l), ("self_attn", 1)] {
        t.push((
            format!("mm.fuser.{attn}.sampling_offsets.weight"),
            vec![m * lv * p * 2, c],
        ));
        t.push((
            format!("mm.fuser.{attn}.sampling_offsets.bias"),
            vec![m * lv * p * 2],
        ));
        t.push((
            format!("mm.fuser.{attn}.attention_weights.weight"),
            vec![m * lv * p, c],
        ));
        t.push((
            format!("mm.fuser.{attn}.attention_weights.bias"),
            vec![m * lv * p],
        ));
        for lin in ["value_proj", "output_proj"] {
            t.push((format!("mm.fuser.{attn}.{lin}.weight"), vec![c, c]));
            t.push((format!("mm.fuser.{attn}.{lin}.bias"), vec![c]));
        }
    }
    for n in ["query_norm", "feat_norm", "norm1"] {
        t.push((format!("mm.fuser.{n}.weight"), vec![c]));
        t.push((format!("mm.fuser.{n}.bias"), vec![c]));
    }
    t.push(("mm.fuser.gamma1".into(), vec![c]));
    t.push(("mm.fuser.gamma2".into(), vec![c]));
    t.push(("mm.1.weight".into(), vec![h, c]));
    t.push(("mm.1.bias".into(), vec![h]));
    t.push(("mm.3.weight".into(), vec![h, h]));
    t.push(("mm.3.bias".into(), vec![h]));
    t
}

/// The Hugging Face name a GGUF tensor comes from (checkpoint names for the LLM and projector,
/// tiny-clip names for `v.*`).
fn expected_source(gguf: &str) -> String {
    let parts: Vec<&str> = gguf.split('.').collect();
    match parts.as_slice() {
        ["token_embd", "weight"] => "model.embed_tokens.weight".into(),
        ["output_norm", "weight"] => "model.norm.weight".into(),
        ["output", "weight"] => "lm_head.weight".into(),
        ["blk", i, n, "weight"] => {
            let hf = match *n {
                "attn_norm" => "input_layernorm",
                "attn_q" => "self_attn.q_proj",
                "attn_k" => "self_attn.k_proj",
                "attn_v" => "self_attn.v_proj",
                "attn_output" => "self_attn.o_proj",
                "ffn_norm" => "post_attention_layernorm",
                "ffn_gate" => "mlp.gate_proj",
                "ffn_up" => "mlp.up_proj",
                "ffn_down" => "mlp.down_proj",
                other => panic!("unexpected LLM tensor {other}"),
            };
            format!("model.layers.{i}.{hf}.weight")
        }
        ["v", "patch_embd", "weight"] => "vision_model.embeddings.patch_embedding.weight".into(),
        ["v", "class_embd"] => "vision_model.embeddings.class_embedding".into(),
        ["v", "position_embd", "weight"] => {
            "vision_model.embeddings.position_embedding.weight".into()
        }
        ["v", "pre_ln", wb] => format!("vision_model.pre_layrnorm.{wb}"),
        ["v", "blk", i, n, wb] => {
            let hf = match *n {
                "attn_q" => "self_attn.q_proj",
                "attn_k" => "self_attn.k_proj",
                "attn_v" => "self_attn.v_proj",
                "attn_out" => "self_attn.out_proj",
                "ln1" => "layer_norm1",
                "ln2" => "layer_norm2",
                "ffn_up" => "mlp.fc1",
                "ffn_down" => "mlp.fc2",
                other => panic!("unexpected CLIP tensor {other}"),
            };
            format!("vision_model.encoder.layers.{i}.{hf}.{wb}")
        }
        ["mm", "fuser", rest @ ..] => format!("model.mm_projector.0.{}", rest.join(".")),
        ["mm", n @ ("1" | "3"), wb] => format!("model.mm_projector.{n}.{wb}"),
        _ => panic!("unexpected tensor {gguf}"),
    }
}

/// The output type llama.cpp's converters give a tensor for `--outtype` (independent of
/// schemas/dtype-policy.json): 1-D and position embeddings F32, the fuser and the patch
/// embedding F16 (F32 under f32), everything else the outtype.
fn expected_type(name: &str, ndim: usize, out: GgmlType) -> GgmlType {
    if ndim == 1 || name == "v.position_embd.weight" {
        GgmlType::F32
    } else if name.starts_with("mm.fuser.") || name.starts_with("v.patch_embd.") {
        if out == GgmlType::F32 {
            GgmlType::F32
        } else {
            GgmlType::F16
        }
    } else {
        out
    }
}

/// Every source tensor of the fixture (checkpoint shards + tiny-clip), by name.
fn fixture_sources() -> HashMap<String, StTensor> {
    let mut m = HashMap::new();
    for p in [
        ckpt().join(SHARD1),
        ckpt().join(SHARD2),
        tower().join("model.safetensors"),
    ] {
        for t in StFile::read(&p).tensors {
            assert!(m.insert(t.name.clone(), t).is_none());
        }
    }
    m
}

/// Check one GGUF file: the tensor list (names in order, types, ne = reversed shape) and every
/// value against the source after the dtype cast and (attn_q/attn_k) the Q/K permutation.
fn check_artefact(
    g: &GgufFile,
    expected: &[(String, Vec<usize>)],
    out: GgmlType,
    src: &HashMap<String, StTensor>,
) {
    // Names (the order in the file is the converter's choice; llama.cpp looks tensors up by name).
    let got: BTreeSet<&str> = g.tensors.iter().map(|t| t.info.name.as_str()).collect();
    let want: BTreeSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        got.len(),
        g.tensors.len(),
        "{}: duplicate tensor names",
        g.path.display()
    );
    assert_eq!(got, want, "{}: tensor names", g.path.display());
    for (name, shape) in expected {
        let t = g.tensor(name).unwrap();
        let ne: Vec<u64> = shape.iter().rev().map(|&d| d as u64).collect();
        assert_eq!(t.info.ne, ne, "{name}: ne");
        let ty = expected_type(name, shape.len(), out);
        assert_eq!(t.info.ty, ty, "{name}: type");
        let s = &src[&expected_source(name)];
        assert_eq!(&s.shape, shape, "{name}: source shape");
        let mut v = to_f32(&s.dtype, &s.data);
        if name.ends_with("attn_q.weight") && !name.starts_with("v.") {
            v = permute_qk(&v, shape[0], shape[1], 4);
        } else if name.ends_with("attn_k.weight") && !name.starts_with("v.") {
            v = permute_qk(&v, shape[0], shape[1], 2);
        }
        assert!(
            g.data(t) == encode(ty, &v).as_slice(),
            "{name}: data differs from the source cast to {ty}"
        );
    }
}

/// candle-core's GGUF reader must open the file and see the same tensors (names, shapes in
/// PyTorch order, types) and, dequantized by candle, the same values as our reader.
fn check_with_candle(g: &GgufFile) {
    use candle_core::quantized::gguf_file::Content;
    let mut f = std::fs::File::open(&g.path).unwrap();
    let c = Content::read(&mut f)
        .unwrap_or_else(|e| panic!("candle cannot read {}: {e}", g.path.display()));
    let names: BTreeSet<&str> = c.tensor_infos.keys().map(String::as_str).collect();
    let ours: BTreeSet<&str> = g.tensors.iter().map(|t| t.info.name.as_str()).collect();
    assert_eq!(
        names,
        ours,
        "{}: candle sees other tensor names",
        g.path.display()
    );
    assert_eq!(
        c.metadata.len(),
        g.metadata.len(),
        "{}: candle sees another metadata count",
        g.path.display()
    );
    assert_eq!(
        c.metadata["general.file_type"].to_u32().unwrap(),
        g.get_u32("general.file_type").unwrap()
    );
    assert_eq!(
        c.metadata["general.architecture"].to_string().unwrap(),
        g.get_str("general.architecture").unwrap()
    );
    for t in &g.tensors {
        let ci = &c.tensor_infos[&t.info.name];
        let dims: Vec<usize> = t.info.ne.iter().rev().map(|&d| d as usize).collect();
        assert_eq!(
            ci.shape.dims(),
            dims.as_slice(),
            "{}: candle shape",
            t.info.name
        );
        assert_eq!(
            format!("{:?}", ci.ggml_dtype),
            t.info.ty.name(),
            "{}: candle type",
            t.info.name
        );
        let q = ci
            .read(&mut f, c.tensor_data_offset, &candle_core::Device::Cpu)
            .unwrap();
        let v: Vec<f32> = q
            .dequantize(&candle_core::Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let ours = gguf_to_f32(t.info.ty, g.data(t));
        assert!(
            v.iter().zip(&ours).all(|(a, b)| a.to_bits() == b.to_bits()) && v.len() == ours.len(),
            "{}: candle reads other values",
            t.info.name
        );
    }
}

fn files(out: &Path, ft: &str) -> (PathBuf, PathBuf, PathBuf) {
    (
        out.join(format!("{NAME}-{ft}.gguf")),
        out.join(format!("mmproj-{NAME}-{ft}.gguf")),
        out.join(format!("{NAME}-{ft}.manifest.json")),
    )
}

// ---------------------------------------------------------------------------------------------
// A small JSON Schema (draft 2020-12) validator for the keywords our schemas use. It refuses any
// other keyword, so the schemas cannot grow checks that nothing enforces.

fn validate(schema: &Json, root: &Json, v: &Json, at: &str, errs: &mut Vec<String>) {
    let s = match schema {
        Json::Bool(true) => return,
        Json::Bool(false) => return errs.push(format!("{at}: not allowed")),
        Json::Object(s) => s,
        _ => panic!("schema at {at} is not an object"),
    };
    for (k, kv) in s {
        match k.as_str() {
            "$schema" | "$id" | "title" | "description" | "$comment" | "$defs" | "examples" => {}
            "$ref" => {
                let r = kv
                    .as_str()
                    .unwrap()
                    .strip_prefix("#/$defs/")
                    .expect("only #/$defs/ refs");
                validate(&root["$defs"][r], root, v, at, errs);
            }
            "type" => {
                let types: Vec<&str> = match kv {
                    Json::String(t) => vec![t.as_str()],
                    Json::Array(a) => a.iter().map(|t| t.as_str().unwrap()).collect(),
                    _ => panic!("bad type"),
                };
                let ok = types.iter().any(|t| match *t {
                    "object" => v.is_object(),
                    "array" => v.is_array(),
                    "string" => v.is_string(),
                    "integer" => v.is_i64() || v.is_u64(),
                    "number" => v.is_number(),
                    "boolean" => v.is_boolean(),
                    "null" => v.is_null(),
                    other => panic!("type {other}"),
                });
                if !ok {
                    errs.push(format!("{at}: {v} is not of type {types:?}"));
                }
            }
            "enum" => {
                if !kv.as_array().unwrap().contains(v) {
                    errs.push(format!("{at}: {v} is not one of {kv}"));
                }
            }
            "const" => {
                if kv != v {
                    errs.push(format!("{at}: {v} is not {kv}"));
                }
            }
            "required" => {
                if let Some(o) = v.as_object() {
                    for r in kv.as_array().unwrap() {
                        if !o.contains_key(r.as_str().unwrap()) {
                            errs.push(format!("{at}: missing required {r}"));
                        }
                    }
                }
            }
            "properties" => {
                if let Some(o) = v.as_object() {
                    for (pk, ps) in kv.as_object().unwrap() {
                        if let Some(pv) = o.get(pk) {
                            validate(ps, root, pv, &format!("{at}/{pk}"), errs);
                        }
                    }
                }
            }
            "additionalProperties" => {
                if let Some(o) = v.as_object() {
                    let props = s.get("properties").and_then(Json::as_object);
                    for (pk, pv) in o {
                        if !props.is_some_and(|p| p.contains_key(pk)) {
                            validate(kv, root, pv, &format!("{at}/{pk}"), errs);
                        }
                    }
                }
            }
            "items" => {
                if let Some(a) = v.as_array() {
                    for (i, e) in a.iter().enumerate() {
                        validate(kv, root, e, &format!("{at}/{i}"), errs);
                    }
                }
            }
            "minItems" => {
                if v.as_array()
                    .is_some_and(|a| (a.len() as u64) < kv.as_u64().unwrap())
                {
                    errs.push(format!("{at}: fewer than {kv} items"));
                }
            }
            "minimum" => {
                if v.as_f64().is_some_and(|x| x < kv.as_f64().unwrap()) {
                    errs.push(format!("{at}: {v} < {kv}"));
                }
            }
            "minLength" => {
                if v.as_str()
                    .is_some_and(|x| (x.chars().count() as u64) < kv.as_u64().unwrap())
                {
                    errs.push(format!("{at}: shorter than {kv}"));
                }
            }
            "maxLength" => {
                if v.as_str()
                    .is_some_and(|x| (x.chars().count() as u64) > kv.as_u64().unwrap())
                {
                    errs.push(format!("{at}: longer than {kv}"));
                }
            }
            "pattern" => {
                let p = kv.as_str().unwrap();
                assert_eq!(
                    p, "^[0-9a-f]{64}$",
                    "this validator knows only the sha256 pattern"
                );
                if v.as_str().is_some_and(|x| {
                    x.len() != 64
                        || !x
                            .bytes()
                            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
                }) {
                    errs.push(format!("{at}: {v} is not 64 lower-case hex digits"));
                }
            }
            other => {
                panic!("schema keyword '{other}' at {at} is not supported by this test's validator")
            }
        }
    }
}

fn schema(name: &str) -> Json {
    let p = root().join("schemas").join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn schema_errors(schema: &Json, v: &Json) -> Vec<String> {
    assert_eq!(
        schema["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    let mut errs = vec![];
    validate(schema, schema, v, "", &mut errs);
    errs
}

// =============================================================================================
// Tests

/// The bundled fixture (2 safetensors shards + index, bf16; tower fixtures/tiny-clip, f16)
/// converts; every tensor name, type, shape and value is as llama.cpp's converters make them;
/// candle-core's reader agrees.
#[test]
fn fixture_converts_sharded_safetensors() {
    let tmp = tempdir();
    let out = tmp.path().join("out");
    let r = convert(&ckpt(), Some(&tower()), &out, &[]).ok();
    assert_eq!(r.stdout, "", "-q prints errors only");
    let (llm, mmproj, manifest) = files(&out, "F16");
    assert_eq!(
        dir_names(&out),
        vec![
            format!("mmproj-{NAME}-F16.gguf"),
            format!("{NAME}-F16.gguf"),
            format!("{NAME}-F16.manifest.json")
        ]
    );
    assert!(manifest.is_file());
    let src = fixture_sources();

    let g = GgufFile::open(&llm).unwrap();
    assert_eq!(g.tensors.len(), 3 + 9 * 2);
    check_artefact(&g, &expected_llm(), GgmlType::F16, &src);
    assert_eq!(g.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(g.get_str("general.name").unwrap(), NAME);
    assert_eq!(g.get_u32("general.file_type").unwrap(), 1);
    assert_eq!(g.get_u32("llama.block_count").unwrap(), 2);
    assert_eq!(g.get_u32("llama.attention.head_count").unwrap(), 4);
    assert_eq!(g.get_u32("llama.attention.head_count_kv").unwrap(), 2);
    assert_eq!(g.get_u32("llama.feed_forward_length").unwrap(), 512);
    assert_eq!(g.get_f32("llama.rope.freq_base").unwrap(), 10000.0);
    assert_eq!(
        g.get_f32("llama.attention.layer_norm_rms_epsilon").unwrap(),
        1e-5
    );
    assert_eq!(
        g.get("tokenizer.ggml.tokens")
            .and_then(Value::as_array)
            .map(|a| a.len()),
        Some(512)
    );
    check_with_candle(&g);

    let m = GgufFile::open(&mmproj).unwrap();
    let exp = expected_mmproj();
    assert_eq!(m.tensors.len(), 5 + 7 * 16 + 24 + 4);
    assert_eq!(m.tensors.len(), exp.len());
    check_artefact(&m, &exp, GgmlType::F16, &src);
    assert!(
        m.tensors
            .iter()
            .all(|t| !t.info.name.starts_with("v.blk.7.") && !t.info.name.contains("post_ln")),
        "block 7 / post_layernorm written"
    );
    assert_eq!(m.get_str("general.architecture").unwrap(), "clip");
    assert_eq!(m.get_str("clip.projector_type").unwrap(), "mmfuser");
    assert_eq!(m.get_u32("general.file_type").unwrap(), 1);
    assert_eq!(m.get_u32("clip.vision.block_count").unwrap(), 7);
    let fl: Vec<i64> = m
        .get("clip.vision.feature_layer")
        .and_then(Value::as_array)
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(fl, vec![1, 3, 5, 6, 7]);
    assert_eq!(m.get_u32("mmfuser.head_count").unwrap(), 16);
    assert_eq!(m.get_u32("mmfuser.level_count").unwrap(), 4);
    assert_eq!(m.get_u32("mmfuser.point_count").unwrap(), 4);
    check_with_candle(&m);
}

/// fixtures/tiny-llava-mmfuser-bin (one f16 pytorch_model.bin with the tower embedded and a
/// vision_config in config.json) gives the same tensors, byte for byte, as the bf16 safetensors
/// checkpoint + tiny-clip (values with |x| < 2^-14 were zeroed in the fixture, so bf16 -> f16 is
/// exact), and the identical mmproj file. (The LLM files may differ in tokenizer metadata: the
/// -bin fixture also has a tokenizer.json.)
#[test]
fn pytorch_bin_matches_safetensors() {
    let tmp = tempdir();
    let a = tmp.path().join("st");
    let b = tmp.path().join("bin");
    convert(&ckpt(), Some(&tower()), &a, &[]).ok();
    convert(
        &fixture("tiny-llava-mmfuser-bin"),
        None,
        &b,
        &["--name", NAME],
    )
    .ok();
    let (la, ma, _) = files(&a, "F16");
    let (lb, mb, manifest_b) = files(&b, "F16");
    assert_eq!(
        std::fs::read(&ma).unwrap(),
        std::fs::read(&mb).unwrap(),
        "mmproj files differ"
    );
    let ga = GgufFile::open(&la).unwrap();
    let gb = GgufFile::open(&lb).unwrap();
    assert_eq!(ga.tensors.len(), gb.tensors.len());
    // The LLM is written in source-file order (sequential reads), so the order follows the layout
    // of the source files; compare tensor by tensor, by name.
    for ta in &ga.tensors {
        let tb = gb
            .tensor(&ta.info.name)
            .unwrap_or_else(|| panic!("{} missing", ta.info.name));
        assert_eq!(ta.info, tb.info);
        assert!(
            ga.data(ta) == gb.data(tb),
            "{}: tensor data differs",
            ta.info.name
        );
    }
    for k in [
        "general.name",
        "general.file_type",
        "llama.block_count",
        "llama.rope.freq_base",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.scores",
        "tokenizer.ggml.token_type",
    ] {
        assert_eq!(ga.get(k), gb.get(k), "{k}");
    }
    // The manifest of the .bin run names the .bin file and f16 sources.
    let mj: Json = serde_json::from_str(&std::fs::read_to_string(&manifest_b).unwrap()).unwrap();
    assert!(mj["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["path"].as_str().unwrap().ends_with("pytorch_model.bin")));
    assert!(mj["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t["dtype"] == "f16" && t["source_file"] == "pytorch_model.bin"));
    assert_eq!(mj["dropped"].as_array().unwrap().len(), 18);
}

/// --outtype f32 / bf16 / f16: 1-D tensors F32, fuser matrices F16 (F32 with f32), the other
/// matrices the outtype; general.file_type 0 / 32 / 1 in both files; values exact.
#[test]
fn outtypes() {
    let src = fixture_sources();
    for (arg, ty, ft_name, ft_id) in [
        ("f32", GgmlType::F32, "F32", 0u32),
        ("bf16", GgmlType::BF16, "BF16", 32),
        ("f16", GgmlType::F16, "F16", 1),
    ] {
        let tmp = tempdir();
        let out = tmp.path().join("out");
        convert(&ckpt(), Some(&tower()), &out, &["--outtype", arg]).ok();
        let (llm, mmproj, manifest) = files(&out, ft_name);
        assert!(manifest.is_file(), "{arg}");
        let g = GgufFile::open(&llm).unwrap();
        let m = GgufFile::open(&mmproj).unwrap();
        assert_eq!(
            g.get_u32("general.file_type").unwrap(),
            ft_id,
            "{arg}: LLM file type"
        );
        assert_eq!(
            m.get_u32("general.file_type").unwrap(),
            ft_id,
            "{arg}: mmproj file type"
        );
        check_artefact(&g, &expected_llm(), ty, &src);
        check_artefact(&m, &expected_mmproj(), ty, &src);
        let ty_of = |f: &GgufFile, n: &str| f.tensor(n).unwrap_or_else(|| panic!("{n}")).info.ty;
        for t in g.tensors.iter().chain(&m.tensors) {
            if t.info.ne.len() == 1 {
                assert_eq!(t.info.ty, GgmlType::F32, "{arg}: {} is 1-D", t.info.name);
            }
            if t.info.name.starts_with("mm.fuser.") && t.info.ne.len() == 2 {
                assert_eq!(
                    t.info.ty,
                    if ty == GgmlType::F32 {
                        GgmlType::F32
                    } else {
                        GgmlType::F16
                    },
                    "{arg}: {}",
                    t.info.name
                );
            }
        }
        assert_eq!(ty_of(&g, "blk.0.attn_q.weight"), ty);
        assert_eq!(ty_of(&g, "token_embd.weight"), ty);
        assert_eq!(ty_of(&m, "v.blk.0.ffn_up.weight"), ty);
        assert_eq!(ty_of(&m, "mm.1.weight"), ty);
        assert_eq!(ty_of(&m, "v.position_embd.weight"), GgmlType::F32);
    }
}

/// The manifest: valid against schemas/manifest.schema.json; sha256 and size of every input and
/// output match the files (recomputed here); every tensor of both files is mapped, with its
/// source name, file, dtype, shape and type; the dropped CLIP tensors are listed.
#[test]
fn manifest_hashes_and_mapping() {
    let tmp = tempdir();
    let out = tmp.path().join("out");
    convert(&ckpt(), Some(&tower()), &out, &[]).ok();
    let (llm, mmproj, manifest) = files(&out, "F16");
    let mj: Json = serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    let errs = schema_errors(&schema("manifest.schema.json"), &mj);
    assert!(
        errs.is_empty(),
        "manifest does not match schemas/manifest.schema.json: {errs:#?}"
    );
    assert_eq!(mj["recipe"], "llava-mmfuser");
    assert_eq!(mj["command"][1], "hf-to-gguf");

    // Inputs: every file read, with the right hash.
    let inputs: BTreeMap<PathBuf, &Json> = mj["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (PathBuf::from(i["path"].as_str().unwrap()), i))
        .collect();
    let mut want: BTreeSet<PathBuf> = [
        "config.json",
        "model.safetensors.index.json",
        SHARD1,
        SHARD2,
        "tokenizer.model",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ]
    .iter()
    .map(|f| ckpt().join(f))
    .collect();
    want.extend(
        [
            "model.safetensors",
            "config.json",
            "preprocessor_config.json",
        ]
        .iter()
        .map(|f| tower().join(f)),
    );
    assert_eq!(
        inputs.keys().cloned().collect::<BTreeSet<_>>(),
        want,
        "manifest inputs"
    );
    for (p, i) in &inputs {
        assert_eq!(
            i["sha256"].as_str().unwrap(),
            sha256_hex(p),
            "{}: sha256",
            p.display()
        );
        assert_eq!(
            i["bytes"].as_u64().unwrap(),
            std::fs::metadata(p).unwrap().len(),
            "{}: bytes",
            p.display()
        );
    }

    // Outputs.
    let outputs = mj["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 2);
    for (o, (path, kind, n)) in outputs
        .iter()
        .zip([(&llm, "llm", 21), (&mmproj, "mmproj", 145)])
    {
        assert_eq!(o["kind"], kind);
        assert_eq!(PathBuf::from(o["path"].as_str().unwrap()), *path);
        assert_eq!(
            o["sha256"].as_str().unwrap(),
            sha256_hex(path),
            "{kind}: sha256"
        );
        assert_eq!(
            o["bytes"].as_u64().unwrap(),
            std::fs::metadata(path).unwrap().len()
        );
        assert_eq!(o["tensors"], n);
        assert_eq!(o["file_type"], "F16");
    }

    // Tensors: exactly the tensors of the two files.
    let recs = mj["tensors"].as_array().unwrap();
    let mut seen = BTreeSet::new();
    for (file, kind) in [(&llm, "llm"), (&mmproj, "mmproj")] {
        let g = GgufFile::open(file).unwrap();
        for t in &g.tensors {
            let r = recs
                .iter()
                .find(|r| r["gguf"] == t.info.name.as_str())
                .unwrap_or_else(|| panic!("{} not in the manifest", t.info.name));
            assert!(
                seen.insert(t.info.name.clone()),
                "{} mapped twice",
                t.info.name
            );
            assert_eq!(r["artefact"], kind);
            assert_eq!(
                r["source"].as_str().unwrap(),
                expected_source(&t.info.name),
                "{}: source",
                t.info.name
            );
            assert_eq!(r["ggml_type"].as_str().unwrap(), t.info.ty.name());
            let shape: Vec<u64> = r["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap())
                .collect();
            assert_eq!(
                shape,
                t.info.ne.iter().rev().copied().collect::<Vec<_>>(),
                "{}: shape",
                t.info.name
            );
            let (sf, dt) = if kind == "mmproj" && t.info.name.starts_with("v.") {
                ("model.safetensors", "f16")
            } else {
                ("", "bf16")
            };
            assert_eq!(r["dtype"], dt, "{}", t.info.name);
            if !sf.is_empty() {
                assert_eq!(r["source_file"], sf);
            } else {
                assert!(
                    [SHARD1, SHARD2].contains(&r["source_file"].as_str().unwrap()),
                    "{}",
                    t.info.name
                );
            }
        }
    }
    assert_eq!(
        recs.len(),
        seen.len(),
        "manifest lists tensors that are in no file"
    );
    let dropped: BTreeSet<String> = mj["dropped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect();
    let tower_names: BTreeSet<String> = StFile::read(&tower().join("model.safetensors"))
        .tensors
        .into_iter()
        .map(|t| t.name)
        .collect();
    let want_dropped: BTreeSet<String> = tower_names
        .into_iter()
        .filter(|n| {
            n.starts_with("vision_model.encoder.layers.7.")
                || n.starts_with("vision_model.post_layernorm.")
        })
        .collect();
    assert_eq!(want_dropped.len(), 18);
    assert_eq!(dropped, want_dropped);
}

/// `--json` prints one JSON document on stdout that matches schemas/hf-to-gguf-summary.schema.json
/// and the files written. The validator itself is checked to reject broken summaries.
#[test]
fn json_summary_matches_schema() {
    let tmp = tempdir();
    let out = tmp.path().join("out");
    let r = convert(&ckpt(), Some(&tower()), &out, &["--json"]).ok();
    let s: Json = serde_json::from_str(&r.stdout).unwrap_or_else(|e| {
        panic!(
            "--json stdout is not one JSON document ({e}):\n{}",
            r.stdout
        )
    });
    let sch = schema("hf-to-gguf-summary.schema.json");
    let errs = schema_errors(&sch, &s);
    assert!(
        errs.is_empty(),
        "summary does not match the schema: {errs:#?}\n{}",
        r.stdout
    );
    assert_eq!(s["recipe"], "llava-mmfuser");
    assert_eq!(s["tensors_written"], 166);
    assert_eq!(s["tensors_dropped"], 18);
    let (llm, mmproj, manifest) = files(&out, "F16");
    assert_eq!(PathBuf::from(s["manifest"].as_str().unwrap()), manifest);
    let outs = s["outputs"].as_array().unwrap();
    assert_eq!(PathBuf::from(outs[0]["path"].as_str().unwrap()), llm);
    assert_eq!(PathBuf::from(outs[1]["path"].as_str().unwrap()), mmproj);
    let total: u64 = outs.iter().map(|o| o["bytes"].as_u64().unwrap()).sum();
    assert_eq!(s["bytes_written"].as_u64().unwrap(), total);
    for o in outs {
        assert_eq!(
            o["sha256"].as_str().unwrap(),
            sha256_hex(Path::new(o["path"].as_str().unwrap()))
        );
    }

    // The validator is not vacuous.
    let mut bad = s.clone();
    bad.as_object_mut().unwrap().remove("seconds");
    assert!(!schema_errors(&sch, &bad).is_empty());
    let mut bad = s.clone();
    bad["outputs"][0]["sha256"] = json!("XYZ");
    assert!(!schema_errors(&sch, &bad).is_empty());
    let mut bad = s.clone();
    bad["outputs"][1]["kind"] = json!("vision");
    assert!(!schema_errors(&sch, &bad).is_empty());
    let mut bad = s.clone();
    bad["extra"] = json!(1);
    assert!(!schema_errors(&sch, &bad).is_empty());
    let mut bad = s;
    bad["tensors_written"] = json!(-1);
    assert!(!schema_errors(&sch, &bad).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Bad input: exit 1, an error naming the file (and the tensor where there is one), nothing left.

#[test]
fn rejects_truncated_shard() {
    let tmp = tempdir();
    let (c, out) = broken_copy(tmp.path());
    let p = c.join(SHARD2);
    let st = StFile::read(&p);
    let b = std::fs::read(&p).unwrap();
    let data_start = b.len() - st.data().len();
    // Cut in the middle of a tensor in the middle of the data.
    let mid = st.data().len() / 2;
    let mut off = 0;
    let mut cut_tensor = String::new();
    for t in &st.tensors {
        if off + t.data.len() > mid {
            cut_tensor = t.name.clone();
            break;
        }
        off += t.data.len();
    }
    let cut = data_start
        + off
        + st.tensors
            .iter()
            .find(|t| t.name == cut_tensor)
            .unwrap()
            .data
            .len()
            / 2;
    std::fs::write(&p, &b[..cut]).unwrap();
    let r = convert(&c, Some(&tower()), &out, &[]);
    assert_rejected(&r, 1, &out, &[], &[SHARD2, &cut_tensor]);
}

#[test]
fn rejects_header_with_offsets_past_the_end() {
    let tmp = tempdir();
    let (c, out) = broken_copy(tmp.path());
    let p = c.join(SHARD2);
    let st = StFile::read(&p);
    let victim = "model.layers.1.mlp.up_proj.weight";
    let data = st.data();
    let mut h = st.header();
    let n = st
        .tensors
        .iter()
        .find(|t| t.name == victim)
        .unwrap()
        .data
        .len();
    h[victim]["data_offsets"] = json!([data.len() + 64, data.len() + 64 + n]);
    write_st_raw(&p, &h, &data);
    let r = convert(&c, Some(&tower()), &out, &[]);
    assert_rejected(&r, 1, &out, &[], &[SHARD2, victim]);
}

#[test]
fn rejects_index_naming_a_missing_shard() {
    let tmp = tempdir();
    let (c, out) = broken_copy(tmp.path());
    edit_index(&c, |m| {
        m.insert(
            "model.norm.weight".into(),
            json!("model-00003-of-00003.safetensors"),
        );
    });
    let r = convert(&c, Some(&tower()), &out, &[]);
    assert_rejected(
        &r,
        1,
        &out,
        &[],
        &[
            "model-00003-of-00003.safetensors",
            "model.safetensors.index.json",
        ],
    );
}

#[test]
fn rejects_shard_path_leaving_the_checkpoint() {
    let tmp = tempdir();
    let (c, out) = broken_copy(tmp.path());
    // The file exists one level up: it must be refused for its path, not because it is missing.
    std::fs::copy(c.join(SHARD2), tmp.path().join(SHARD2)).unwrap();
    let evil = format!("../{SHARD2}");
    edit_index(&c, |m| {
        for v in m.values_mut() {
            if v == SHARD2 {
                *v = json!(evil);
            }
        }
    });
    let r = convert(&c, Some(&tower()), &out, &[]);
    assert_rejected(&r, 1, &out, &[], &[&evil, "model.safetensors.index.json"]);
}

#[test]
fn rejects_missing_gamma2() {
    let tmp = tempdir();
    let (c, out) = broken_copy(tmp.path());
    let name = "model.mm_projector.0.gamma2";
    let mut st = StFile::read(&c.join(SHARD2));
    let before = st.tensors.len();
    st.tensors.retain(|t| t.name != name);
    assert_eq!(st.tensors.len(), before - 1);
    st.write(&c.join(SHARD2));
    edit_index(&c, |m| {
        m.remove(name).unwrap();
    });
    let r = convert(&c, Some(&tower()), &out, &[]);
    assert_rejected(&r, 1, &out, &[], &[name, "missing"]);
}

#[test]
fn rejects_shape_disagreeing_with_config() {
    let tmp = tempdir();
    let (c, out) = broken_copy(tmp.path());
    edit_json(&c.join("config.json"), |j| {
        j["intermediate_size"] = json!(384)
    });
    let r = convert(&c, Some(&tower()), &out, &[]);
    assert_rejected(
        &r,
        1,
        &out,
        &[],
        &[
            SHARD1,
            "model.layers.0.mlp.gate_proj.weight",
            "config.json",
            "384",
        ],
    );
}

#[test]
fn rejects_unsupported_dtype() {
    for dtype in ["I32", "F64"] {
        let tmp = tempdir();
        let (c, out) = broken_copy(tmp.path());
        let name = "model.norm.weight";
        let mut st = StFile::read(&c.join(SHARD2));
        let t = st.get_mut(name);
        let n: usize = t.shape.iter().product();
        t.dtype = dtype.into();
        t.data = vec![0u8; n * st_dtype_size(dtype)];
        st.write(&c.join(SHARD2));
        let r = convert(&c, Some(&tower()), &out, &[]);
        assert_rejected(&r, 1, &out, &[], &[SHARD2, name, dtype]);
    }
}

#[test]
fn rejects_nan_weight_unless_allowed() {
    let tmp = tempdir();
    let (c, out) = broken_copy(tmp.path());
    let name = "model.layers.1.mlp.up_proj.weight";
    let mut st = StFile::read(&c.join(SHARD2));
    let t = st.get_mut(name);
    assert_eq!(t.dtype, "BF16");
    t.data[10..12].copy_from_slice(&0x7fc0u16.to_le_bytes()); // element 5 = NaN
    st.write(&c.join(SHARD2));
    let r = convert(&c, Some(&tower()), &out, &[]);
    assert_rejected(
        &r,
        1,
        &out,
        &[],
        &[SHARD2, name, "NaN", "--allow-nonfinite"],
    );

    // The checkpoint directory's name ("ckpt") names the files.
    convert(&c, Some(&tower()), &out, &["--allow-nonfinite"]).ok();
    let g = GgufFile::open(out.join("ckpt-F16.gguf")).unwrap();
    assert_eq!(g.get_str("general.name").unwrap(), "ckpt");
    let v = gguf_to_f32(
        GgmlType::F16,
        g.data(g.tensor("blk.1.ffn_up.weight").unwrap()),
    );
    assert!(v[5].is_nan());
    assert_eq!(v.iter().filter(|x| !x.is_finite()).count(), 1);
}

#[test]
fn rejects_missing_vision_tower_naming_the_hub_id() {
    let tmp = tempdir();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let r = convert(&ckpt(), None, &out, &[]);
    assert_rejected(
        &r,
        1,
        &out,
        &[],
        &[HUB_ID, "--vision-tower", "tiny-llava-mmfuser"],
    );
}

#[test]
fn rejects_unknown_extra_tensor() {
    let tmp = tempdir();
    let (c, out) = broken_copy(tmp.path());
    let extra = "model.mm_projector.0.extra_scale";
    let mut st = StFile::read(&c.join(SHARD2));
    st.tensors.push(StTensor {
        name: extra.into(),
        dtype: "BF16".into(),
        shape: vec![64],
        data: vec![0u8; 128],
    });
    st.write(&c.join(SHARD2));
    edit_index(&c, |m| {
        m.insert(extra.into(), json!(SHARD2));
    });
    let r = convert(&c, Some(&tower()), &out, &[]);
    assert_rejected(&r, 1, &out, &[], &[extra, "not used"]);
}

#[test]
fn usage_errors_exit_2() {
    let tmp = tempdir();
    let out = tmp.path().join("out");
    let r = convert(&ckpt(), Some(&tower()), &out, &["--outtype", "q9"]);
    assert_rejected(&r, 2, &out, &[], &["q9"]);
    assert!(!out.exists(), "--outtype q9 created the output directory");
    let r = convert(&ckpt(), Some(&tower()), &out, &["--no-such-flag"]);
    assert_rejected(&r, 2, &out, &[], &["--no-such-flag"]);
    let r = run(
        vec![
            "hf-to-gguf".into(),
            ckpt().into(),
            "--out-dir".into(),
            out.clone().into(),
            "--outtype".into(),
        ],
        tmp.path(),
    );
    assert_rejected(&r, 2, &out, &[], &["--outtype"]);
    // --name must be a plain file-name part: nothing may be written outside -o.
    for bad in ["../escaped", "a/b", ".hidden", ""] {
        let r = convert(&ckpt(), Some(&tower()), &out, &["--name", bad]);
        assert_rejected(&r, 2, &out, &[], &["--name"]);
        assert!(!out.exists(), "--name {bad:?} created the output directory");
        assert_eq!(
            dir_names(tmp.path()),
            Vec::<String>::new(),
            "--name {bad:?} wrote next to the output directory"
        );
    }
}

/// A failure in the second artefact (a NaN in CLIP block 3) must not leave the first one (the
/// LLM, already renamed into place) behind; files that were in the directory before stay.
#[test]
fn failure_in_second_artefact_leaves_nothing() {
    let tmp = tempdir();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), b"not ours").unwrap();
    let t = tmp.path().join("tower");
    copy_dir(&tower(), &t);
    let name = "vision_model.encoder.layers.3.mlp.fc1.weight";
    let mut st = StFile::read(&t.join("model.safetensors"));
    let x = st.get_mut(name);
    assert_eq!(x.dtype, "F16");
    x.data[0..2].copy_from_slice(&0x7e00u16.to_le_bytes());
    st.write(&t.join("model.safetensors"));
    let r = convert(&ckpt(), Some(&t), &out, &[]);
    assert_rejected(
        &r,
        1,
        &out,
        &["keep.txt"],
        &["model.safetensors", name, "NaN"],
    );
    assert_eq!(std::fs::read(out.join("keep.txt")).unwrap(), b"not ours");

    // Same run without -q (progress bars on a pipe) fails the same way.
    let r = run(
        vec![
            "hf-to-gguf".into(),
            ckpt().into(),
            "--vision-tower".into(),
            t.clone().into(),
            "--out-dir".into(),
            out.clone().into(),
        ],
        tmp.path(),
    );
    assert_rejected(&r, 1, &out, &["keep.txt"], &[name]);
}

/// A run that fails must not touch the files of an earlier, successful conversion in the same
/// directory: no half-replaced set where the old manifest lists an LLM that is gone.
#[test]
fn failed_rerun_keeps_previous_conversion() {
    let tmp = tempdir();
    let out = tmp.path().join("out");
    convert(&ckpt(), Some(&tower()), &out, &[]).ok();
    let before: Vec<(String, Vec<u8>)> = dir_names(&out)
        .into_iter()
        .map(|n| {
            let b = std::fs::read(out.join(&n)).unwrap();
            (n, b)
        })
        .collect();
    assert_eq!(before.len(), 3);
    let t = tmp.path().join("tower");
    copy_dir(&tower(), &t);
    let mut st = StFile::read(&t.join("model.safetensors"));
    st.get_mut("vision_model.encoder.layers.5.self_attn.v_proj.weight")
        .data[6..8]
        .copy_from_slice(&0x7c00u16.to_le_bytes()); // +Inf
    st.write(&t.join("model.safetensors"));
    let r = convert(&ckpt(), Some(&t), &out, &[]);
    let keep: Vec<&str> = before.iter().map(|(n, _)| n.as_str()).collect();
    assert_rejected(
        &r,
        1,
        &out,
        &keep,
        &["vision_model.encoder.layers.5.self_attn.v_proj.weight"],
    );
    for (n, b) in &before {
        assert!(
            std::fs::read(out.join(n)).unwrap() == *b,
            "{n} changed by the failed run"
        );
    }
}

/// Without CHECKPOINT_DIR the bundled fixture is converted, from the repository root and from
/// anywhere else (found next to the sources the binary was built from); -q prints nothing.
#[test]
fn default_checkpoint_is_the_bundled_fixture() {
    let tmp = tempdir();
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    for (i, cwd) in [root(), elsewhere].iter().enumerate() {
        let out = tmp.path().join(format!("out{i}"));
        let r = run(
            vec!["hf-to-gguf".into(), "--out-dir".into(), out.clone().into()],
            cwd,
        )
        .ok();
        assert!(
            r.stderr.contains("fixtures/tiny-llava-mmfuser"),
            "{}",
            r.stderr
        );
        let (llm, mmproj, manifest) = files(&out, "F16");
        assert!(
            llm.is_file() && mmproj.is_file() && manifest.is_file(),
            "{:?}",
            dir_names(&out)
        );
        assert_eq!(GgufFile::open(&llm).unwrap().tensors.len(), 21);
        assert_eq!(GgufFile::open(&mmproj).unwrap().tensors.len(), 145);
        let q = run(
            vec![
                "hf-to-gguf".into(),
                "--out-dir".into(),
                out.clone().into(),
                "-q".into(),
            ],
            cwd,
        )
        .ok();
        assert_eq!(
            (q.stdout.as_str(), q.stderr.as_str()),
            ("", ""),
            "-q: errors only"
        );
    }
}
