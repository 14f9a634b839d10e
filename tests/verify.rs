//! verify end to end. Exactness: good artefacts of every type pass with the one bound, faults that
//! hide inside 4-bit noise fail it. Quality: the KL figures agree with numpy's computation from the
//! dumped logits. The source-side forward matches the fixture's float64 reference (made by
//! fixtures/make_fixtures.py: CLIP and LLaMA by transformers, the MMFuser fuser by our own PyTorch
//! implementation of the spec, since transformers has none).
use crate::common::sabotage::{self, rewrite, scale_f16, scale_offset, with_metadata};
use mmfuser_convert::formats::gguf::{GgufFile, Metadata, TensorInfo, Value};
use mmfuser_convert::ground::dtype::GgmlType;
use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_mmfuser-convert");
const CK: &str = "fixtures/tiny-llava-mmfuser";
const TOWER: &str = "fixtures/tiny-clip";
const BOUND: f64 = mmfuser_convert::verify::EXACT_REL_RMS_BOUND;

fn run(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(BIN).args(args).output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

fn convert_as(dir: &Path, outtype: &str) -> (PathBuf, PathBuf) {
    let d = dir.to_str().unwrap();
    let (rc, _, err) = run(&[
        "hf-to-gguf",
        CK,
        "--vision-tower",
        TOWER,
        "--out-dir",
        d,
        "-q",
        "--outtype",
        outtype,
    ]);
    assert_eq!(rc, 0, "{err}");
    let t = outtype.to_uppercase();
    (
        dir.join(format!("tiny-llava-mmfuser-{t}.gguf")),
        dir.join(format!("mmproj-tiny-llava-mmfuser-{t}.gguf")),
    )
}

fn convert(dir: &Path) -> (PathBuf, PathBuf) {
    convert_as(dir, "f16")
}

fn verify(llm: &Path, mmproj: &Path, extra: &[&str]) -> (i32, serde_json::Value, String) {
    verify_env(llm, mmproj, extra, &[])
}

/// [`verify`] with extra environment variables.
fn verify_env(
    llm: &Path,
    mmproj: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (i32, serde_json::Value, String) {
    let mut args = vec![
        "verify",
        CK,
        "--vision-tower",
        TOWER,
        "--gguf",
        llm.to_str().unwrap(),
        "--mmproj",
        mmproj.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    let o = Command::new(BIN)
        .args(&args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let v = serde_json::from_str(&out).unwrap_or(serde_json::Value::Null);
    (
        o.status.code().unwrap_or(-1),
        v,
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

/// `quantize IN --type TY -o DIR/q-TY.gguf` (writes q-TY.manifest.json beside it).
fn quantize_to(input: &Path, dir: &Path, ty: &str) -> PathBuf {
    let out = dir.join(format!("q-{ty}.gguf"));
    let (rc, _, err) = run(&[
        "quantize",
        input.to_str().unwrap(),
        "--type",
        ty,
        "-o",
        out.to_str().unwrap(),
        "-q",
    ]);
    assert_eq!(rc, 0, "{err}");
    out
}

fn exact_rel_rms(r: &serde_json::Value, row: &str) -> Option<f64> {
    r[row]["metrics"]["rel_rms"].as_f64()
}

fn reasons(r: &serde_json::Value) -> String {
    r["reasons"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| x.as_str().unwrap_or("").to_string())
                .collect::<Vec<_>>()
                .join(" | ")
        })
        .unwrap_or_default()
}

fn check_status(r: &serde_json::Value, name: &str) -> String {
    r["checks"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == name))
        .and_then(|c| c["status"].as_str())
        .unwrap_or("?")
        .to_string()
}

/// Every type the tools write passes exactness with the one bound (the margin is printed), on
/// both roads: quantize of an hf-to-gguf file, and one pass from the checkpoint.
#[test]
fn exactness_passes_every_type_with_one_bound() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut cases: Vec<(String, PathBuf, PathBuf)> = vec![];
    for t in ["f32", "f16", "bf16"] {
        let sub = d.join(t);
        let (l, m) = convert_as(&sub, t);
        cases.push((format!("{t} / mmproj {t}"), l, m));
    }
    let (f16, mmproj) = (cases[1].1.clone(), cases[1].2.clone());
    for ty in ["Q8_0", "Q4_0", "Q4_K_S", "Q4_K_M", "Q6_K"] {
        cases.push((
            format!("{ty} (quantize of F16)"),
            quantize_to(&f16, d, ty),
            mmproj.clone(),
        ));
    }
    // From the BF16 file: the source is rounded to bf16 before it is quantized.
    let bf16 = cases[2].1.clone();
    let sub = d.join("from-bf16");
    std::fs::create_dir_all(&sub).unwrap();
    cases.push((
        "Q4_K_M (quantize of BF16)".into(),
        quantize_to(&bf16, &sub, "Q4_K_M"),
        mmproj.clone(),
    ));
    // mmproj with its CLIP matrices in Q8_0.
    let mq8 = d.join("mmproj-q8.gguf");
    let (rc, _, err) = run(&[
        "quantize",
        mmproj.to_str().unwrap(),
        "--vision-type",
        "Q8_0",
        "-o",
        mq8.to_str().unwrap(),
        "-q",
    ]);
    assert_eq!(rc, 0, "{err}");
    cases.push(("F16 / mmproj Q8_0".into(), f16.clone(), mq8));
    // One pass from the checkpoint.
    let one = d.join("onepass");
    let (rc, _, err) = run(&[
        "quantize",
        "--bits",
        "4",
        CK,
        "--vision-tower",
        TOWER,
        "--out-dir",
        one.to_str().unwrap(),
        "-q",
    ]);
    assert_eq!(rc, 0, "{err}");
    cases.push((
        "Q4_K_M (one pass)".into(),
        one.join("tiny-llava-mmfuser-Q4_K_M.gguf"),
        one.join("mmproj-tiny-llava-mmfuser-F16.gguf"),
    ));
    println!(
        "  {:<28} {:>12} {:>12} {:>10}  roads",
        "case", "logits rel", "image rel", "KL mean"
    );
    for (what, l, m) in &cases {
        let (rc, r, err) = verify(l, m, &[]);
        assert_eq!(rc, 0, "{what}: {err} {}", reasons(&r));
        assert_eq!(r["passed"], true);
        assert_eq!(r["tensors"]["mismatches"].as_array().unwrap().len(), 0);
        assert_eq!(r["tensors"]["not_compared"], 0, "{what}");
        // Each step's seconds, in the order they ran, adding up to the run's.
        let stages = r["stages"].as_array().unwrap();
        let names: Vec<&str> = stages.iter().map(|t| t["name"].as_str().unwrap()).collect();
        // On the CPU the artefact and expected forwards run side by side (one step).
        let forwards: &[&str] = if r["device"] == "cpu" {
            &["artefact and expected forwards"]
        } else {
            &["artefact forward", "expected forward"]
        };
        let want = [
            &["sha256", "header", "tensor bytes", "probes"][..],
            forwards,
            &["source forward", "report"],
        ]
        .concat();
        assert_eq!(names, want, "{what}");
        let sum: f64 = stages.iter().map(|t| t["seconds"].as_f64().unwrap()).sum();
        let total = r["seconds"].as_f64().unwrap();
        assert!(
            sum <= total && sum > 0.5 * total,
            "{what}: {sum} of {total}"
        );
        let (lo, im) = (
            exact_rel_rms(&r, "exact_logits").unwrap(),
            exact_rel_rms(&r, "exact_image_embeddings").unwrap(),
        );
        assert!(lo <= BOUND && im <= BOUND, "{what}: {lo} {im}");
        // On the CPU both sides sum in one order, so a correct file reproduces the expected
        // model exactly (EXACT_REL_RMS_BOUND says why); any drift from that is a regression.
        assert_eq!((lo, im), (0.0, 0.0), "{what}");
        println!(
            "  {:<28} {:>12.3e} {:>12.3e} {:>10.3e}  {}",
            what,
            lo,
            im,
            r["quality_logits"]["kl"]["kl_mean"].as_f64().unwrap(),
            r["tensors"]["roads"]
        );
    }
}

/// One fault case: what, (LLM, mmproj), which check must catch it.
type Fault = (String, PathBuf, PathBuf);

/// The issue's faults that hide inside 4-bit noise, built on a quantized LLM of type `ty`
/// (Q4_K_M or Q8_0) and the F16 mmproj. Written under new names (no manifest vouches for them).
fn faults(d: &Path, ty: &str, llm: &Path, mmproj: &Path) -> Vec<Fault> {
    let same = |n: &str| n.to_string();
    let at = |n: &str| d.join(format!("{ty}-{n}.gguf"));
    let mut v: Vec<Fault> = vec![];
    let g = GgufFile::open(llm).unwrap();
    // A tensor of the file's main quantized type.
    let victim = g
        .tensors
        .iter()
        .find(|t| {
            t.info.name.starts_with("blk.1.")
                && t.info.ty.is_quantized()
                && t.info.ty != GgmlType::Q6K
        })
        .unwrap()
        .info
        .clone();
    drop(g);
    let (vname, vty) = (victim.name.clone(), victim.ty);
    let p = at("all-scales");
    sabotage::sabotage(llm, &p, &same, &|name, _, data| {
        if name == vname {
            for b in (0..data.len()).step_by(vty.type_size()) {
                scale_f16(data, b + scale_offset(vty), 1.01);
            }
        }
    });
    v.push((
        format!("every block scale d of {} x 1.01", victim.name),
        p,
        mmproj.into(),
    ));
    let vname = victim.name.clone();
    let p = at("one-scale");
    sabotage::sabotage(llm, &p, &same, &|name, _, data| {
        if name == vname {
            let b = (data.len() / vty.type_size() / 2) * vty.type_size();
            scale_f16(data, b + scale_offset(vty), 1.01);
        }
    });
    v.push((
        format!("one block scale d of {} x 1.01", victim.name),
        p,
        mmproj.into(),
    ));
    let p = at("rope");
    with_metadata(llm, &p, &|m: &mut Metadata| {
        let t = m
            .get("llama.rope.freq_base")
            .and_then(Value::as_f32)
            .unwrap_or(10000.0);
        m.set("llama.rope.freq_base", Value::F32(t * 1.01));
    });
    v.push(("rope theta +1%".into(), p, mmproj.into()));
    let p = at("eps");
    with_metadata(llm, &p, &|m: &mut Metadata| {
        let e = m
            .get("llama.attention.layer_norm_rms_epsilon")
            .and_then(Value::as_f32)
            .unwrap();
        m.set(
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(e * 10.0),
        );
    });
    v.push(("rms eps x 10".into(), p, mmproj.into()));
    // Heads 0 and 1 of blk.0.attn_q swapped (rows are whole blocks in every type).
    let p = at("heads");
    sabotage::sabotage(llm, &p, &same, &|name, g, data| {
        if name == "blk.0.attn_q.weight" {
            let t = g.tensor(name).unwrap();
            let (cols, rows) = (t.info.ne[0], t.info.ne[1] as usize);
            let row_bytes = t.info.ty.bytes_for(cols).unwrap() as usize;
            let head = rows / 4 * row_bytes; // the fixture has 4 heads
            let (a, b) = data.split_at_mut(head);
            a.swap_with_slice(&mut b[..head]);
        }
    });
    v.push((
        "heads 0 and 1 of blk.0.attn_q swapped".into(),
        p,
        mmproj.into(),
    ));
    // The text of the probe prompt's token "image" (a piece of "Describe the image.") altered.
    let p = at("vocab");
    with_metadata(llm, &p, &|m: &mut Metadata| {
        if let Some(Value::Array(_, toks)) = m
            .entries
            .iter_mut()
            .find(|(k, _)| k == "tokenizer.ggml.tokens")
            .map(|(_, v)| v)
        {
            let i = toks
                .iter()
                .position(|t| t.as_str() == Some("▁image"))
                .expect("the fixture vocabulary has ▁image");
            toks[i] = Value::String("▁imagE".into());
        }
    });
    v.push((
        "token '▁image' renamed in the GGUF vocabulary".into(),
        p,
        mmproj.into(),
    ));
    // mmproj faults (with this LLM).
    let pm = d.join(format!("{ty}-mmproj-gamma.gguf"));
    sabotage::sabotage(mmproj, &pm, &same, &|name, _, data| {
        if name == "mm.fuser.gamma1" {
            for i in (0..data.len()).step_by(2) {
                scale_f16(data, i, 1.01);
            }
        }
    });
    v.push(("fuser gamma1 x 1.01".into(), llm.into(), pm));
    let pm = d.join(format!("{ty}-mmproj-ln1.gguf"));
    sabotage::sabotage(mmproj, &pm, &same, &|name, g, data| {
        if name == "v.blk.0.ln1.bias" {
            assert_eq!(g.tensor(name).unwrap().info.ty, GgmlType::F32);
            for c in data.chunks_mut(4) {
                let x = f32::from_le_bytes(c.try_into().unwrap()) + 1e-3;
                c.copy_from_slice(&x.to_le_bytes());
            }
        }
    });
    v.push(("CLIP block 0 ln1 bias + 1e-3".into(), llm.into(), pm));
    v
}

/// Each fault fails exactness at Q4_K_M and Q8_0; printed with its figures against the bound.
#[test]
fn faults_inside_quantization_noise_fail_exactness() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (f16, mmproj) = convert(d);
    println!(
        "  {:<52} {:>6} {:>13} {:>13} {:>10} {:>10}  failed checks",
        "fault", "type", "logits/bound", "image/bound", "KL mean", "blocks"
    );
    for ty in ["Q4_K_M", "Q8_0"] {
        let q = quantize_to(&f16, d, ty);
        let (rc, r, err) = verify(&q, &mmproj, &[]);
        assert_eq!(rc, 0, "{ty} unbroken: {err} {}", reasons(&r));
        let base_kl = r["quality_logits"]["kl"]["kl_mean"].as_f64().unwrap();
        for (what, l, m) in faults(d, ty, &q, &mmproj) {
            let (rc, r, err) = verify(&l, &m, &[]);
            assert_eq!(rc, 3, "{what} at {ty} must fail: {err} {}", reasons(&r));
            let failed: Vec<String> = ["header", "tensors", "exact forward"]
                .iter()
                .filter(|c| check_status(&r, c) == "fail")
                .map(|c| c.to_string())
                .collect();
            assert!(
                !failed.is_empty(),
                "{what} at {ty}: no exactness check failed: {}",
                reasons(&r)
            );
            let ratio = |row: &str| {
                exact_rel_rms(&r, row)
                    .map_or("not compared".to_string(), |x| format!("{:.3e}", x / BOUND))
            };
            let blocks: u64 = r["tensors"]["mismatches"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["blocks_differing"].as_u64().unwrap())
                .sum();
            println!(
                "  {:<52} {:>6} {:>13} {:>13} {:>10} {:>10}  {}",
                what,
                ty,
                ratio("exact_logits"),
                ratio("exact_image_embeddings"),
                r["quality_logits"]["kl"]["kl_mean"]
                    .as_f64()
                    .map_or("-".into(), |k| format!("{k:.3e}")),
                blocks,
                failed.join(", ")
            );
            // Tensor faults are named by tensor and block.
            if what.contains("block scale") {
                let mm = &r["tensors"]["mismatches"][0];
                assert!(
                    what.contains(mm["tensor"].as_str().unwrap()),
                    "{what}: {mm}"
                );
                if what.starts_with("one") {
                    assert_eq!(mm["blocks_differing"], 1, "{mm}");
                }
            }
        }
        // The older sabotage set on this quantized file.
        let sub = d.join(format!("sab-{ty}"));
        std::fs::create_dir_all(&sub).unwrap();
        for (what, l, m) in sabotage::sabotaged_artefacts(&sub, &q, &mmproj) {
            let (rc, r, err) = verify(&l, &m, &[]);
            assert_eq!(rc, 3, "{what} at {ty} must fail: {err}");
            assert_eq!(check_status(&r, "tensors"), "fail", "{what} at {ty}");
            println!(
                "  {:<52} {:>6} {:>13}",
                what,
                ty,
                exact_rel_rms(&r, "exact_logits")
                    .map_or("not compared".to_string(), |x| format!("{:.3e}", x / BOUND))
            );
        }
        println!("  (unbroken {ty}: quality KL mean {base_kl:.3e})");
    }
}

/// On the CPU the expected model takes the products it shares with the artefact forward
/// (`model::paired`). That must change no figure, no check and no exit code: the same run with
/// sharing switched off (MMFUSER_VERIFY_SHARE=0) gives the same report, bit for bit, for a good
/// artefact and for faults in a tensor, in the metadata and in the Q/K layout. And it must share:
/// all but the Q/K products on a good file, fewer once a fault makes the streams part.
#[test]
fn shared_products_change_no_figure() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (f16, mmproj) = convert(d);
    let q = quantize_to(&f16, d, "Q4_K_M");
    let all = faults(d, "Q4_K_M", &q, &mmproj);
    let mut cases: Vec<(String, PathBuf)> = vec![("unbroken Q4_K_M".into(), q.clone())];
    for (what, l, _) in all {
        if ["one block scale", "rope theta", "heads 0 and 1"]
            .iter()
            .any(|w| what.starts_with(w))
        {
            cases.push((what, l));
        }
    }
    assert_eq!(cases.len(), 4, "the fault set changed");
    let mut unbroken_shared = 0;
    for (what, l) in &cases {
        let cpu = ["--device", "cpu"];
        let (rc_on, on, _) = verify_env(l, &mmproj, &cpu, &[("MMFUSER_VERIFY_SHARE", "1")]);
        let (rc_off, off, _) = verify_env(l, &mmproj, &cpu, &[("MMFUSER_VERIFY_SHARE", "0")]);
        assert_eq!(rc_on, rc_off, "{what}");
        for key in [
            "exact_logits",
            "exact_image_embeddings",
            "quality_logits",
            "quality_image_embeddings",
            "passed",
            "reasons",
            "probes",
        ] {
            assert_eq!(on[key], off[key], "{what}: {key}");
        }
        let status = |r: &serde_json::Value| -> Vec<String> {
            r["checks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| format!("{} {}", c["name"], c["status"]))
                .collect()
        };
        assert_eq!(status(&on), status(&off), "{what}");
        assert!(off.get("exact_shared_products").is_none(), "{what}");
        let sh = &on["exact_shared_products"];
        let (shared, computed) = (
            sh["shared"].as_u64().unwrap(),
            sh["computed"].as_u64().unwrap(),
        );
        println!("  {what:<52} shared {shared:>3}, computed {computed:>3}, exit {rc_on}");
        if what.starts_with("unbroken") {
            assert_eq!(rc_on, 0);
            // Every product is shared, the Q/K ones (HF row order on the expected side) with
            // their columns put back in that order.
            assert_eq!(computed, 0, "{what}");
            unbroken_shared = shared;
        } else {
            assert_eq!(rc_on, 3, "{what}");
            assert!(shared < unbroken_shared, "{what}: {shared} shared");
        }
    }
}

/// The older sabotage set (F16 LLM) and the header faults the issue lists all fail.
#[test]
fn sabotaged_and_mislabelled_artefacts_fail() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (llm, mmproj) = convert(d);
    let mut cases: Vec<(String, PathBuf, PathBuf)> =
        sabotage::sabotaged_artefacts(d, &llm, &mmproj)
            .into_iter()
            .map(|(w, l, m)| (w.to_string(), l, m))
            .collect();
    let meta = |name: &str, file: &Path, edit: &dyn Fn(&mut Metadata)| {
        let p = d.join(format!("{name}.gguf"));
        with_metadata(file, &p, edit);
        p
    };
    cases.push((
        "llama.rope.dimension_count 1000".into(),
        meta("rope-dim", &llm, &|m| {
            m.set("llama.rope.dimension_count", Value::U32(1000))
        }),
        mmproj.clone(),
    ));
    cases.push((
        "bos id 4e9".into(),
        meta("bos", &llm, &|m| {
            m.set("tokenizer.ggml.bos_token_id", Value::U32(4_000_000_000))
        }),
        mmproj.clone(),
    ));
    cases.push((
        "F16 file claiming Q4_0".into(),
        meta("claims-q4", &llm, &|m| {
            m.set("general.file_type", Value::U32(2))
        }),
        mmproj.clone(),
    ));
    for n in [0u32, 1000] {
        cases.push((
            format!("clip.vision.block_count {n}"),
            llm.clone(),
            meta(&format!("mmproj-blocks-{n}"), &mmproj, &|m| {
                m.set("clip.vision.block_count", Value::U32(n))
            }),
        ));
    }
    cases.push((
        "feature layer 99".into(),
        llm.clone(),
        meta("mmproj-feature", &mmproj, &|m| {
            if let Some(Value::Array(_, v)) = m
                .entries
                .iter_mut()
                .find(|(k, _)| k == "clip.vision.feature_layer")
                .map(|(_, v)| v)
            {
                v[0] = Value::I32(99);
            }
        }),
    ));
    let extra = d.join("extra.gguf");
    rewrite(
        &llm,
        &extra,
        &|_| {},
        &|_, _, _| {},
        Some((
            TensorInfo {
                name: "blk.0.unknown.weight".into(),
                ne: vec![4],
                ty: GgmlType::F32,
            },
            vec![0u8; 16],
        )),
    );
    cases.push(("an extra unknown tensor".into(), extra, mmproj.clone()));
    for (what, l, m) in cases {
        let (rc, r, err) = verify(&l, &m, &[]);
        assert!(
            rc == 3 || rc == 1,
            "{what} must fail: {err} {}",
            reasons(&r)
        );
        if rc == 3 {
            assert_eq!(r["passed"], false, "{what}");
        }
        println!(
            "  {what:<36} rc {rc}: {}",
            if rc == 3 {
                reasons(&r)
            } else {
                err.trim().to_string()
            }
        );
    }
}

/// NaN anywhere fails, naming the tensor (or the position of the logits).
#[test]
fn non_finite_values_fail_naming_where() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (llm, mmproj) = convert(d);
    let q4 = quantize_to(&llm, d, "Q4_K_M");
    // One Q6_K block scale of output.weight set to NaN (two bytes).
    let nan_q6 = d.join("nan-q6.gguf");
    sabotage::sabotage(&q4, &nan_q6, &|n| n.to_string(), &|name, g, data| {
        if name == "output.weight" {
            let t = g.tensor(name).unwrap();
            assert_eq!(t.info.ty, GgmlType::Q6K);
            let at = scale_offset(GgmlType::Q6K);
            data[at..at + 2].copy_from_slice(&half::f16::NAN.to_le_bytes());
        }
    });
    let nan_norm = d.join("nan-norm.gguf");
    sabotage::sabotage(&llm, &nan_norm, &|n| n.to_string(), &|name, _, data| {
        if name == "output_norm.weight" {
            data[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
        }
    });
    for (what, l, tensor) in [
        ("Q6_K scale", &nan_q6, "output.weight"),
        ("output_norm", &nan_norm, "output_norm.weight"),
    ] {
        let (rc, r, err) = verify(l, &mmproj, &[]);
        assert_eq!(rc, 3, "{what}: {err}");
        let why = reasons(&r);
        assert!(
            why.contains(&format!("tensor '{tensor}', element")),
            "{what}: {why}"
        );
        assert!(
            why.contains("non-finite value at position"),
            "{what}: the logits' NaN is named: {why}"
        );
        assert_eq!(r["exact_logits"]["status"], "not compared", "{what}");
        println!("  {what}: {why}");
    }
}

/// The KL figures agree with numpy's computation from the dumped logits.
#[test]
fn quality_figures_agree_with_numpy() {
    let dir = tempfile::tempdir().unwrap();
    let (llm, mmproj) = convert(dir.path());
    let q4 = quantize_to(&llm, dir.path(), "Q4_K_M");
    let dump = dir.path().join("dump");
    let (rc, r, err) = verify(&q4, &mmproj, &["--dump-logits", dump.to_str().unwrap()]);
    assert_eq!(rc, 0, "{err}");
    let py = std::env::var("MMFUSER_PYTHON")
        .expect("MMFUSER_PYTHON must point at a Python with numpy (run .ci/run)");
    let script = r#"
import json, sys, numpy as np
s = np.load(sys.argv[1]).astype(np.float64); a = np.load(sys.argv[2]).astype(np.float64)
def logsm(x):
    m = x.max(axis=1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))
ls, la = logsm(s), logsm(a)
kl = np.maximum((np.exp(ls) * (ls - la)).sum(axis=1), 0.0)
t = s.argmax(axis=1); r = np.arange(len(t))
print(json.dumps(dict(kl_mean=kl.mean(), kl_median=float(np.median(kl)), kl_p99=float(np.percentile(kl, 99)),
    kl_p999=float(np.percentile(kl, 99.9)), kl_max=kl.max(), top1_agreement=float((a.argmax(axis=1) == t).mean()),
    delta_p_mean=float((np.exp(la[r, t]) - np.exp(ls[r, t])).mean()))))
"#;
    let o = Command::new(py)
        .args(["-c", script])
        .arg(dump.join("source.npy"))
        .arg(dump.join("artefact.npy"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let got = &r["quality_logits"]["kl"];
    for k in [
        "kl_mean",
        "kl_median",
        "kl_p99",
        "kl_p999",
        "kl_max",
        "top1_agreement",
        "delta_p_mean",
    ] {
        let (g, w) = (got[k].as_f64().unwrap(), want[k].as_f64().unwrap());
        println!("  {k:<15} ours {g:.6e}  numpy {w:.6e}");
        assert!(
            (g - w).abs() <= 1e-9 + 1e-6 * w.abs(),
            "{k}: ours {g}, numpy {w}"
        );
    }
    assert!(
        got["kl_mean"].as_f64().unwrap() > 1e-3,
        "a Q4_K_M file has measurable KL"
    );
}

#[test]
fn flipped_bit_is_caught_by_the_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let (llm, mmproj) = convert(dir.path());
    let mut bytes = std::fs::read(&llm).unwrap();
    let n = bytes.len();
    bytes[n - 1000] ^= 0x01;
    std::fs::write(&llm, &bytes).unwrap();
    let (rc, r, _) = verify(&llm, &mmproj, &[]);
    assert_eq!(rc, 3);
    assert_eq!(r["integrity"][0]["status"], "mismatch", "{r}");
}

/// A manifest of the artefact's own name that cannot be read, or that lists other files, fails.
#[test]
fn unreadable_or_foreign_manifest_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (llm, mmproj) = convert(dir.path());
    let q4 = quantize_to(&llm, dir.path(), "Q4_K_M");
    let man = dir.path().join("q-Q4_K_M.manifest.json");
    let good = std::fs::read_to_string(&man).unwrap();
    for (what, text) in [
        ("unreadable", "{ not json".to_string()),
        ("foreign", good.replace("q-Q4_K_M.gguf", "other.gguf")),
    ] {
        std::fs::write(&man, &text).unwrap();
        let (rc, r, err) = verify(&q4, &mmproj, &[]);
        assert_eq!(rc, 3, "{what}: {err}");
        assert_eq!(r["integrity"][0]["status"], "bad-manifest", "{what}: {r}");
    }
    std::fs::write(&man, good).unwrap();
}

#[test]
fn source_forward_matches_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let (llm, mmproj) = convert(dir.path());
    let dump = dir.path().join("dump");
    let (rc, _, err) = verify(
        &llm,
        &mmproj,
        &[
            "--pixel-values",
            "fixtures/reference/pixel_values.npy",
            "--input-ids",
            "fixtures/reference/input_ids.json",
            "--dump-logits",
            dump.to_str().unwrap(),
        ],
    );
    assert_eq!(rc, 0, "{err}");
    let got = mmfuser_convert::formats::npy::read(dump.join("source.npy"))
        .unwrap()
        .to_f64()
        .unwrap();
    let want = mmfuser_convert::formats::npy::read("fixtures/reference/logits.npy")
        .unwrap()
        .to_f64()
        .unwrap();
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0.0, 0.0);
    for (a, b) in got.iter().zip(&want) {
        num += (a - b) * (a - b);
        den += b * b;
    }
    let rel = (num / den).sqrt();
    assert!(
        rel < 1e-4,
        "source logits vs float64 reference: relative RMS {rel}"
    );
}

/// A text-only probe: the image rows say "not compared", never zeros or a cosine of 1.
#[test]
fn rows_not_compared_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let (llm, mmproj) = convert(dir.path());
    let ids = dir.path().join("ids.json");
    std::fs::write(&ids, "[1, 45, 100, 200]").unwrap();
    let (rc, r, err) = verify(&llm, &mmproj, &["--input-ids", ids.to_str().unwrap()]);
    assert_eq!(rc, 0, "{err}");
    for row in ["exact_image_embeddings", "quality_image_embeddings"] {
        assert_eq!(r[row]["status"], "not compared", "{row}: {r}");
        assert!(r[row].get("metrics").is_none(), "{row}");
    }
    let (rc, r, err) = verify(&llm, &mmproj, &["--exact-only"]);
    assert_eq!(rc, 0, "{err}");
    assert_eq!(r["quality_logits"]["status"], "not compared");
    assert_eq!(check_status(&r, "quality"), "not run");
    let (rc, out, _) = run(&[
        "verify",
        CK,
        "--vision-tower",
        TOWER,
        "--gguf",
        llm.to_str().unwrap(),
        "--mmproj",
        mmproj.to_str().unwrap(),
        "--input-ids",
        ids.to_str().unwrap(),
    ]);
    assert_eq!(rc, 0);
    assert!(out.contains("image embeddings     not compared"), "{out}");
}

/// `--tolerance` gates quality: a Q4_K_M file fails a bound below its KL and passes one above.
#[test]
fn tolerance_gates_quality_only_when_given() {
    let dir = tempfile::tempdir().unwrap();
    let (llm, mmproj) = convert(dir.path());
    let q4 = quantize_to(&llm, dir.path(), "Q4_K_M");
    let (rc, r, _) = verify(&q4, &mmproj, &[]);
    assert_eq!(rc, 0);
    let kl = r["quality_logits"]["kl"]["kl_mean"].as_f64().unwrap();
    let (rc, r, _) = verify(&q4, &mmproj, &["--tolerance", &format!("{}", kl * 0.5)]);
    assert_eq!(rc, 3, "{}", reasons(&r));
    assert!(reasons(&r).contains("exceeds --tolerance"));
    let (rc, _, _) = verify(&q4, &mmproj, &["--tolerance", &format!("{}", kl * 2.0)]);
    assert_eq!(rc, 0);
}

#[test]
fn usage_errors_exit_2() {
    // An input error: exit 1 (as in every verb), reported as what it is, naming the file.
    let (rc, _, err) = run(&[
        "verify",
        CK,
        "--gguf",
        "/nonexistent.gguf",
        "--mmproj",
        "/nonexistent2.gguf",
    ]);
    assert_eq!(rc, 1);
    assert!(err.contains("/nonexistent"), "{err}");
    assert!(
        !err.contains("usage:"),
        "an input error shown as a usage error: {err}"
    );
    let (rc, _, err) = run(&["verify", CK]);
    assert_eq!(rc, 2);
    assert!(err.contains("usage") || err.contains("Usage"), "{err}");
    // --tolerance must be a finite number >= 0.
    let dir = tempfile::tempdir().unwrap();
    let (llm, mmproj) = convert(dir.path());
    for bad in ["nan", "inf", "-1", "1e400", "-inf"] {
        let (rc, _, err) = verify(&llm, &mmproj, &[&format!("--tolerance={bad}")]);
        assert_eq!(rc, 2, "--tolerance {bad}: {err}");
        assert!(err.contains("--tolerance"), "{bad}: {err}");
    }
    let (rc, _, err) = verify(&llm, &mmproj, &["--image-tolerance=nan"]);
    assert_eq!(rc, 2, "{err}");
    let (rc, _, err) = verify(&llm, &mmproj, &["--exact-only", "--tolerance", "0.1"]);
    assert_eq!(rc, 2, "{err}");
}

#[test]
fn json_report_validates_against_schema() {
    let dir = tempfile::tempdir().unwrap();
    let (llm, mmproj) = convert(dir.path());
    let q4 = quantize_to(&llm, dir.path(), "Q4_K_M");
    let py = std::env::var("MMFUSER_PYTHON")
        .expect("MMFUSER_PYTHON must point at a Python with jsonschema (run .ci/run)");
    let broken = dir.path().join("broken.gguf");
    with_metadata(&q4, &broken, &|m| {
        m.set("llama.rope.freq_base", Value::F32(12345.0))
    });
    let ids = dir.path().join("ids.json");
    std::fs::write(&ids, "[1, 45, 100]").unwrap();
    for (l, extra) in [
        (&llm, vec!["--prompt", "What is in the picture?"]),
        (&q4, vec!["--tolerance", "1"]),
        (
            &q4,
            vec!["--exact-only", "--input-ids", ids.to_str().unwrap()],
        ),
        (&broken, vec![]),
        (&q4, vec!["--prompt", "a", "--prompt", "b"]),
    ] {
        let mut args = vec![
            "verify",
            CK,
            "--vision-tower",
            TOWER,
            "--gguf",
            l.to_str().unwrap(),
            "--mmproj",
            mmproj.to_str().unwrap(),
            "--json",
        ];
        args.extend(extra);
        let (rc, out, err) = run(&args);
        assert!(rc == 0 || rc == 3, "{err}");
        let report = dir.path().join("report.json");
        std::fs::write(&report, out).unwrap();
        let o = Command::new(&py)
            .args(["-c", "import json,sys,jsonschema; jsonschema.validate(json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))); print('valid')"])
            .arg(&report)
            .arg("schemas/verify-report.schema.json")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
}

/// Flip one bit in the middle of every tensor's data (and one in the metadata) of the mmproj, the
/// F16 LLM and a Q4_K_M LLM, one at a time: the manifest's sha256 catches each one.
#[test]
fn flipped_bit_in_any_tensor_is_caught_by_the_manifest() {
    use mmfuser_convert::verify::check_integrity;
    let dir = tempfile::tempdir().unwrap();
    let (llm, mmproj) = convert(dir.path());
    let q4 = quantize_to(&llm, dir.path(), "Q4_K_M");
    let mut n = 0;
    for path in [&mmproj, &llm, &q4] {
        assert_eq!(
            check_integrity(path).unwrap().status,
            "ok",
            "{}",
            path.display()
        );
        let g = GgufFile::open(path).unwrap();
        let mut spots: Vec<(String, usize)> = g
            .tensors
            .iter()
            .map(|t| (t.info.name.clone(), (t.offset + t.n_bytes / 2) as usize))
            .collect();
        spots.push(("metadata".into(), 40));
        drop(g);
        let orig = std::fs::read(path).unwrap();
        for (i, (what, at)) in spots.iter().enumerate() {
            let mut b = orig.clone();
            b[*at] ^= 1 << (i % 8);
            std::fs::write(path, &b).unwrap();
            let r = check_integrity(path).unwrap();
            assert_eq!(r.status, "mismatch", "{}: bit in {what}", path.display());
            n += 1;
        }
        std::fs::write(path, &orig).unwrap();
        assert_eq!(check_integrity(path).unwrap().status, "ok");
    }
    assert!(n > 180, "{n}");

    // End to end: verify fails (exit 3) naming the mismatch, for the mmproj and for a quantized LLM.
    for (l, m, which) in [(&q4, &mmproj, 1usize), (&q4, &mmproj, 0)] {
        let victim = if which == 0 { l } else { m };
        let orig = std::fs::read(victim).unwrap();
        let g = GgufFile::open(victim).unwrap();
        let t = &g.tensors[g.tensors.len() / 2];
        let at = (t.offset + t.n_bytes / 3) as usize;
        drop(g);
        let mut b = orig.clone();
        b[at] ^= 0x10;
        std::fs::write(victim, &b).unwrap();
        let (rc, r, err) = verify(l, m, &[]);
        assert_eq!(rc, 3, "{err} {r}");
        assert_eq!(r["integrity"][which]["status"], "mismatch", "{r}");
        assert_eq!(r["integrity"][1 - which]["status"], "ok", "{r}");
        assert!(
            r["reasons"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x.as_str().unwrap().contains("sha256")),
            "{r}"
        );
        // The tensor check names the same flip without the manifest.
        assert_eq!(check_status(&r, "tensors"), "fail", "{r}");
        std::fs::write(victim, &orig).unwrap();
    }
}

/// With the manifests removed, a perturbed tensor (one tensor of a Q4_K_M LLM, one CLIP matrix of
/// the mmproj) is still caught: the tensor check names it, the exact forward measures it.
#[test]
fn perturbed_tensor_without_manifest_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (llm, mmproj) = convert(dir.path());
    let q4 = quantize_to(&llm, dir.path(), "Q4_K_M");
    for e in std::fs::read_dir(dir.path()).unwrap() {
        let p = e.unwrap().path();
        if p.to_string_lossy().ends_with(".manifest.json") {
            std::fs::remove_file(p).unwrap();
        }
    }
    let (rc, r, err) = verify(&q4, &mmproj, &[]);
    assert_eq!(rc, 0, "unperturbed Q4_K_M must pass: {err} {r}");
    assert_eq!(r["integrity"][0]["status"], "no-manifest");
    let pert = dir.path().join("q4-perturbed.gguf");
    sabotage::sabotage(&q4, &pert, &|n| n.to_string(), &|name, _, data| {
        if name == "blk.0.ffn_up.weight" {
            for blk in data.chunks_mut(144) {
                blk[1] ^= 0x80;
            }
        }
    });
    let pm = dir.path().join("mmproj-perturbed.gguf");
    sabotage::sabotage(&mmproj, &pm, &|n| n.to_string(), &|name, _, data| {
        if name == "v.blk.2.attn_v.weight" {
            for i in (1..data.len()).step_by(2) {
                data[i] ^= 0x80;
            }
        }
    });
    for (l, m, tensor) in [
        (&pert, &mmproj, "blk.0.ffn_up.weight"),
        (&q4, &pm, "v.blk.2.attn_v.weight"),
    ] {
        let (rc, r, err) = verify(l, m, &[]);
        assert_eq!(rc, 3, "{err} {r}");
        assert_eq!(r["tensors"]["mismatches"][0]["tensor"], tensor, "{r}");
        assert_eq!(r["tensors"]["mismatches"][0]["first_block"], 0, "{r}");
        assert!(exact_rel_rms(&r, "exact_logits").unwrap() > BOUND, "{r}");
    }
}

/// A file quantized with an importance matrix cannot be re-derived: verify says so and judges it
/// by the quality bound alone (and fails without one).
#[test]
fn imatrix_artefact_is_judged_by_quality_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (llm, mmproj) = convert(dir.path());
    let q4 = quantize_to(&llm, dir.path(), "Q4_K_M");
    let im = dir.path().join("imatrix.gguf");
    with_metadata(&q4, &im, &|m| {
        m.set("quantize.imatrix.file", Value::String("imatrix.dat".into()));
        m.set("quantize.imatrix.entries_count", Value::I32(14));
    });
    let (rc, r, err) = verify(&im, &mmproj, &[]);
    assert_eq!(rc, 3, "{err}");
    assert!(
        r["imatrix"]
            .as_str()
            .unwrap()
            .contains("quantize.imatrix.file"),
        "{r}"
    );
    assert_eq!(check_status(&r, "tensors"), "not run");
    assert_eq!(check_status(&r, "header"), "pass", "{}", reasons(&r));
    assert!(reasons(&r).contains("give --tolerance"), "{}", reasons(&r));
    let (rc, r, err) = verify(&im, &mmproj, &["--tolerance", "0.2"]);
    assert_eq!(rc, 0, "{err} {}", reasons(&r));
    assert_eq!(check_status(&r, "quality"), "pass");
    let (rc, _, _) = verify(&im, &mmproj, &["--tolerance", "0.01"]);
    assert_eq!(rc, 3);
}

/// Several probes: each has its own figures; the overall rows pool their positions (the pooled
/// mean KL is the position-weighted mean of the probes').
#[test]
fn several_probes_report_each_and_overall() {
    let dir = tempfile::tempdir().unwrap();
    let (llm, mmproj) = convert(dir.path());
    let q4 = quantize_to(&llm, dir.path(), "Q4_K_M");
    let (img_a, img_b) = (
        "fixtures/image_refs/small.png",
        "fixtures/image_refs/mode_1.png",
    );
    let (rc, r, err) = verify(
        &q4,
        &mmproj,
        &[
            "--image",
            img_a,
            "--prompt",
            "What is this?",
            "--image",
            img_b,
            "--prompt",
            "Describe the colours.",
        ],
    );
    assert_eq!(rc, 0, "{err} {}", reasons(&r));
    // No progress bars on a non-terminal.
    assert!(
        !err.contains("forward 1/3") && !err.contains("tensors"),
        "{err}"
    );
    let probes = r["probes"].as_array().unwrap();
    assert_eq!(probes.len(), 2);
    assert!(probes[0]["image"].as_str().unwrap().ends_with("small.png"));
    assert!(probes[1]["prompt"]
        .as_str()
        .unwrap()
        .contains("Describe the colours."));
    let (mut w, mut n) = (0.0, 0usize);
    for p in probes {
        let k = p["quality_logits"]["kl"]["kl_mean"].as_f64().unwrap();
        let m = p["n_positions"].as_u64().unwrap() as usize;
        w += k * m as f64;
        n += m;
        let e = exact_rel_rms(p, "exact_logits").unwrap();
        assert!(e <= BOUND, "probe exact logits {e}");
    }
    assert_eq!(r["n_positions"].as_u64().unwrap() as usize, n);
    let pooled = r["quality_logits"]["kl"]["kl_mean"].as_f64().unwrap();
    assert!(
        (pooled - w / n as f64).abs() <= 1e-12 + 1e-9 * pooled,
        "{pooled} vs {}",
        w / n as f64
    );
    // Three images and two prompts do not pair.
    let (rc, _, err) = verify(
        &q4,
        &mmproj,
        &[
            "--image", img_a, "--image", img_b, "--image", img_a, "--prompt", "a", "--prompt", "b",
        ],
    );
    assert_eq!(rc, 2, "{err}");
}

/// A copy of the fixture checkpoint whose `model.layers.0.mlp.up_proj.weight` row 0 holds bf16
/// values around 1e-6, below f16's normal range: an F16 file rounds them (f16 subnormals), so a
/// Q4_K_M made from the F16 file differs from one made in one pass, and verify must reproduce
/// each on its own road.
fn checkpoint_with_tiny_block(dir: &Path) -> PathBuf {
    let ck = dir.join("ck-tiny");
    std::fs::create_dir_all(&ck).unwrap();
    for e in std::fs::read_dir(CK).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, ck.join(p.file_name().unwrap())).unwrap();
    }
    let shard = ck.join("model-00001-of-00002.safetensors");
    let mut b = std::fs::read(&shard).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let h: serde_json::Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    let t = &h["model.layers.0.mlp.up_proj.weight"];
    assert_eq!(t["dtype"], "BF16");
    let start = 8 + n + t["data_offsets"][0].as_u64().unwrap() as usize;
    for i in 0..256 {
        let x = 1e-6 * (1.0 + (i as f32 * 0.37).sin());
        b[start + 2 * i..start + 2 * i + 2].copy_from_slice(&half::bf16::from_f32(x).to_le_bytes());
    }
    std::fs::write(&shard, b).unwrap();
    ck
}

#[test]
fn quantized_files_are_reproduced_on_their_own_road() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ck = checkpoint_with_tiny_block(d);
    let cks = ck.to_str().unwrap();
    let f16dir = d.join("f16");
    let (rc, _, err) = run(&[
        "hf-to-gguf",
        cks,
        "--vision-tower",
        TOWER,
        "--out-dir",
        f16dir.to_str().unwrap(),
        "-q",
    ]);
    assert_eq!(rc, 0, "{err}");
    let via = quantize_to(&f16dir.join("ck-tiny-F16.gguf"), d, "Q4_K_M");
    let one = d.join("one");
    let (rc, _, err) = run(&[
        "quantize",
        "--bits",
        "4",
        cks,
        "--vision-tower",
        TOWER,
        "--out-dir",
        one.to_str().unwrap(),
        "-q",
    ]);
    assert_eq!(rc, 0, "{err}");
    let one_q = one.join("ck-tiny-Q4_K_M.gguf");
    let (a, b) = (
        GgufFile::open(&via).unwrap(),
        GgufFile::open(&one_q).unwrap(),
    );
    let name = "blk.0.ffn_up.weight";
    let (ta, tb) = (a.tensor(name).unwrap(), b.tensor(name).unwrap());
    assert_eq!(ta.info.ty, GgmlType::Q4K);
    assert_ne!(
        a.data(ta),
        b.data(tb),
        "the two roads must give different bytes for this test to mean anything"
    );
    let mmproj = f16dir.join("mmproj-ck-tiny-F16.gguf");
    for (file, road) in [(&via, "via F16"), (&one_q, "one pass")] {
        let (rc, r, err) = run_verify_on(cks, file, &mmproj);
        assert_eq!(rc, 0, "{road}: {err} {}", reasons(&r));
        let fname = file.file_name().unwrap().to_str().unwrap();
        assert_eq!(r["tensors"]["roads"][fname], road, "{r}");
    }
}

fn run_verify_on(ck: &str, llm: &Path, mmproj: &Path) -> (i32, serde_json::Value, String) {
    let (rc, out, err) = run(&[
        "verify",
        ck,
        "--vision-tower",
        TOWER,
        "--gguf",
        llm.to_str().unwrap(),
        "--mmproj",
        mmproj.to_str().unwrap(),
        "--json",
        "--exact-only",
    ]);
    (
        rc,
        serde_json::from_str(&out).unwrap_or(serde_json::Value::Null),
        err,
    )
}
