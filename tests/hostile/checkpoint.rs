//! Safetensors checkpoints: shards cut short, hostile headers, index files; checkpoint contents;
//! non-finite weights.
use super::*;
use mmfuser_convert::formats::gguf::GgufFile;
use serde_json::{json, Value as Json};
use std::rc::Rc;

/// The raw header and data section of a safetensors file.
fn st_raw(path: &Path) -> (Vec<u8>, Json, usize) {
    let b = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let h: Json = serde_json::from_slice(&b[8..8 + n]).unwrap();
    (b, h, n)
}

/// Write a safetensors file from header bytes (not re-serialised: may be anything) and data.
fn write_st_bytes(path: &Path, header: &[u8], data: &[u8]) {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header);
    b.extend_from_slice(data);
    std::fs::write(path, b).unwrap();
}

#[test]
fn safetensors_truncated_at_every_section_boundary() {
    let st = StFile::read(&common::ckpt().join(SHARD2));
    let (b, _, n) = st_raw(&common::ckpt().join(SHARD2));
    // (cut, tensor the error must name)
    let mut cuts: Vec<(usize, Option<String>)> = vec![
        (0, None),
        (4, None),
        (8, None),
        (8 + n / 2, None),
        (8 + n, Some(st.tensors[0].name.clone())),
    ];
    let mut off = 8 + n;
    for (i, t) in st.tensors.iter().enumerate() {
        off += t.data.len();
        if let Some(next) = st.tensors.get(i + 1) {
            cuts.push((off, Some(next.name.clone())));
        }
    }
    cuts.push((b.len() - 1, Some(st.tensors.last().unwrap().name.clone())));
    assert!(cuts.len() > 30);
    let b = Rc::new(b);
    let list = cuts
        .into_iter()
        .map(|(cut, tensor)| {
            let b = b.clone();
            let mut needles = vec![SHARD2];
            if let Some(t) = &tensor {
                needles.push(t);
            }
            CkCase::new(
                format!("{SHARD2} cut at byte {cut}"),
                st_copy,
                move |ck| std::fs::write(ck.ckpt.join(SHARD2), &b[..cut]).unwrap(),
                &needles,
            )
        })
        .collect();
    refuse_ckpts("truncated safetensors", list);
}

#[test]
fn safetensors_hostile_headers() {
    let shard = common::ckpt().join(SHARD2);
    let (b, h, n) = st_raw(&shard);
    let data = b[8 + n..].to_vec();
    let header_text = String::from_utf8(b[8..8 + n].to_vec()).unwrap();
    let victim = "model.layers.1.mlp.up_proj.weight";
    let other = "model.layers.1.mlp.gate_proj.weight";
    let off = |name: &str| -> (u64, u64) {
        let o = h[name]["data_offsets"].as_array().unwrap();
        (o[0].as_u64().unwrap(), o[1].as_u64().unwrap())
    };
    let (vs, ve) = off(victim);

    type Edit = Box<dyn Fn(&Path)>;
    type JsonEdit = Box<dyn Fn(&mut serde_json::Map<String, Json>)>;
    let with_header = |text: Vec<u8>| -> Edit {
        let data = data.clone();
        Box::new(move |p: &Path| write_st_bytes(p, &text, &data))
    };
    let with_json = |f: JsonEdit| -> Edit {
        let (data, h) = (data.clone(), h.clone());
        Box::new(move |p: &Path| {
            let mut h = h.clone();
            f(h.as_object_mut().unwrap());
            write_st_raw(p, &h, &data)
        })
    };
    let with_len = |len: u64| -> Edit {
        let b = b.clone();
        Box::new(move |p: &Path| {
            let mut b = b.clone();
            b[..8].copy_from_slice(&len.to_le_bytes());
            std::fs::write(p, b).unwrap()
        })
    };
    // `edit` rewrites the second shard; the errors name it and `extra`.
    let shard2 = |name: &str, edit: Edit, extra: &[&str]| {
        CkCase::new(
            name,
            st_copy,
            move |ck| edit(&ck.ckpt.join(SHARD2)),
            &[&[SHARD2][..], extra].concat(),
        )
    };
    let list = vec![
        shard2("header length u64::MAX", with_len(u64::MAX), &[]),
        shard2("header length past the end", with_len(b.len() as u64), &[]),
        shard2("header length 0", with_len(0), &[]),
        shard2("header length 1 GiB", with_len(1 << 30), &[]),
        shard2(
            "header is a JSON array",
            with_header(b"[1, 2, 3]".to_vec()),
            &[],
        ),
        shard2("header is not JSON", with_header(b"{\"a\": ".to_vec()), &[]),
        shard2(
            "non-UTF-8 tensor name",
            with_header({
                let mut hb = header_text.clone().into_bytes();
                let i = header_text.find(victim).unwrap();
                hb[i + 7] = 0xff;
                hb
            }),
            &[],
        ),
        shard2(
            "duplicate tensor name (second entry another dtype)",
            with_header({
                let dup = format!(
                    ", \"{victim}\": {{\"dtype\": \"F16\", \"shape\": [512, 256], \"data_offsets\": [{vs}, {ve}]}}}}"
                );
                let t = header_text.trim_end();
                format!("{}{dup}", &t[..t.len() - 1]).into_bytes()
            }),
            &[victim, "twice"],
        ),
        shard2(
            "overlapping offsets",
            with_json(Box::new(move |m| {
                let o = m[other]["data_offsets"].clone();
                m[victim]["data_offsets"] = o;
            })),
            &[victim],
        ),
        shard2(
            "offsets reversed (end before start)",
            with_json(Box::new(move |m| {
                m[victim]["data_offsets"] = json!([ve, vs])
            })),
            &[victim],
        ),
        shard2(
            "misaligned offsets (one byte short of the shape)",
            with_json(Box::new(move |m| {
                m[victim]["data_offsets"] = json!([vs, ve - 1])
            })),
            &[victim],
        ),
        shard2(
            "offsets shifted by one byte",
            with_json(Box::new(move |m| {
                m[victim]["data_offsets"] = json!([vs + 1, ve + 1])
            })),
            &[],
        ),
        shard2(
            "data_offsets [0, u64::MAX]",
            with_json(Box::new(move |m| {
                m[victim]["data_offsets"] = json!([0u64, u64::MAX])
            })),
            &[victim],
        ),
        shard2(
            "shape [u64::MAX]",
            with_json(Box::new(move |m| m[victim]["shape"] = json!([u64::MAX]))),
            &[],
        ),
        shard2(
            "shape whose product overflows",
            with_json(Box::new(move |m| {
                m[victim]["shape"] = json!([1u64 << 32, 1u64 << 32, 16])
            })),
            &[],
        ),
        shard2(
            "negative dimension",
            with_json(Box::new(move |m| m[victim]["shape"] = json!([-1, 256]))),
            &[],
        ),
        shard2(
            "unknown dtype",
            with_json(Box::new(move |m| m[victim]["dtype"] = json!("Q4_K"))),
            &[],
        ),
        shard2(
            "8-bit float dtype",
            with_json(Box::new(move |m| {
                m[victim]["dtype"] = json!("F8_E4M3");
                m[victim]["shape"] = json!([512, 512]);
            })),
            &[victim, "F8_E4M3"],
        ),
        shard2(
            "__metadata__ not a map of strings",
            with_json(Box::new(|m| {
                m.insert("__metadata__".into(), json!({"format": [1, 2]}));
            })),
            &[],
        ),
        shard2(
            "empty header, no data",
            Box::new(|p: &Path| write_st_bytes(p, b"{}      ", &[])),
            &["not found"],
        ),
        shard2(
            "trailing bytes after the data",
            {
                let (b, h, n) = (b.clone(), h.clone(), n);
                Box::new(move |p: &Path| {
                    let mut d = b[8 + n..].to_vec();
                    d.extend_from_slice(&[0u8; 64]);
                    write_st_raw(p, &h, &d)
                })
            },
            &[],
        ),
        shard2(
            "a file of zeros",
            Box::new(|p: &Path| std::fs::write(p, vec![0u8; 4096]).unwrap()),
            &[],
        ),
        // The same header damage in the vision tower's single file.
        CkCase::new(
            "tower cut inside its first tensor",
            st_copy,
            |ck| {
                let tp = ck.tower.as_ref().unwrap().join("model.safetensors");
                let (tb, _, tn) = st_raw(&tp);
                std::fs::write(&tp, &tb[..8 + tn + 100]).unwrap();
            },
            &[
                "tower/model.safetensors",
                "vision_model.embeddings.class_embedding",
            ],
        ),
    ];
    refuse_ckpts("hostile safetensors headers", list);
}

#[test]
fn index_files() {
    let set_shard2 = |name: String| {
        move |ck: &Ck| {
            let name = name.replace("$ROOT", &ck.root.to_string_lossy());
            edit_index(&ck.ckpt, |m| {
                for v in m.values_mut() {
                    if v == SHARD2 {
                        *v = json!(name);
                    }
                }
            })
        }
    };
    let ix = "model.safetensors.index.json";
    let list = vec![
        CkCase::new(
            "index is not JSON",
            st_copy,
            |ck| {
                std::fs::write(
                    ck.ckpt.join("model.safetensors.index.json"),
                    "{\"weight_map\": ",
                )
                .unwrap()
            },
            &[ix],
        ),
        CkCase::new(
            "index without weight_map",
            st_copy,
            |ck| {
                std::fs::write(
                    ck.ckpt.join("model.safetensors.index.json"),
                    "{\"metadata\": {}}",
                )
                .unwrap()
            },
            &[ix, "weight_map"],
        ),
        CkCase::new(
            "weight_map value not a string",
            st_copy,
            |ck| {
                edit_index(&ck.ckpt, |m| {
                    m.insert("model.norm.weight".into(), json!(2));
                })
            },
            &[ix, "model.norm.weight"],
        ),
        CkCase::new(
            "absolute shard path (the file exists there)",
            st_copy,
            |ck| {
                std::fs::copy(ck.ckpt.join(SHARD2), ck.root.join(SHARD2)).unwrap();
                let abs = ck.root.join(SHARD2).to_string_lossy().into_owned();
                edit_index(&ck.ckpt, |m| {
                    for v in m.values_mut() {
                        if v == SHARD2 {
                            *v = json!(abs);
                        }
                    }
                })
            },
            &[ix, "must be a plain file name"],
        ),
        CkCase::new(
            "shard path sub/../../x",
            st_copy,
            set_shard2(format!("sub/../../{SHARD2}")),
            &[ix, "../"],
        ),
        CkCase::new(
            "shard path ../../../../etc/passwd",
            st_copy,
            set_shard2("../../../../etc/passwd".into()),
            &[ix, "/etc/passwd"],
        ),
        CkCase::new(
            "shard path /etc/passwd",
            st_copy,
            set_shard2("/etc/passwd".into()),
            &[ix, "/etc/passwd"],
        ),
        CkCase::new(
            "empty shard name",
            st_copy,
            set_shard2(String::new()),
            &[ix],
        ),
        CkCase::new(
            "index lists a tensor the shard does not hold",
            st_copy,
            |ck| {
                edit_index(&ck.ckpt, |m| {
                    m.insert("model.layers.9.mlp.up_proj.weight".into(), json!(SHARD2));
                })
            },
            &[ix, "model.layers.9.mlp.up_proj.weight"],
        ),
        CkCase::new(
            "index routes a tensor to the wrong shard",
            st_copy,
            |ck| {
                edit_index(&ck.ckpt, |m| {
                    m.insert("model.norm.weight".into(), json!(SHARD1));
                })
            },
            &[ix, "model.norm.weight"],
        ),
        CkCase::new(
            "shard name is a directory",
            st_copy,
            |ck| {
                std::fs::create_dir(ck.ckpt.join("shard-dir")).unwrap();
                edit_index(&ck.ckpt, |m| {
                    m.insert("model.norm.weight".into(), json!("shard-dir"));
                })
            },
            &["shard-dir"],
        ),
        CkCase::new(
            "shard is a named pipe (must not block)",
            st_copy,
            |ck| {
                let fifo = ck.ckpt.join("fifo.safetensors");
                let c = std::ffi::CString::new(fifo.to_string_lossy().as_bytes()).unwrap();
                assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
                edit_index(&ck.ckpt, |m| {
                    m.insert("model.norm.weight".into(), json!("fifo.safetensors"));
                })
            },
            &["fifo.safetensors"],
        ),
        // The .bin index: the same path rules.
        CkCase::new(
            "pytorch index with ../",
            bin_copy,
            |ck| {
                std::fs::rename(
                    ck.ckpt.join("pytorch_model.bin"),
                    ck.root.join("pytorch_model.bin"),
                )
                .unwrap();
                std::fs::write(
                    ck.ckpt.join("pytorch_model.bin.index.json"),
                    serde_json::to_string(
                        &json!({"weight_map": {"lm_head.weight": "../pytorch_model.bin"}}),
                    )
                    .unwrap(),
                )
                .unwrap();
            },
            &["pytorch_model.bin.index.json", "../pytorch_model.bin"],
        ),
    ];
    refuse_ckpts("index files", list);
}

/// NaN / Inf in checkpoints: refused by hf-to-gguf and quantize, naming the file and tensor;
/// `--allow-nonfinite` lets them through.
#[test]
fn nonfinite_weights() {
    // -Inf in a BF16 LLM weight, NaN in an F16 tower weight, +Inf in a .bin (F16) checkpoint.
    let name = "model.layers.0.self_attn.k_proj.weight";
    let tname = "vision_model.encoder.layers.2.mlp.fc2.weight";
    let first = "lm_head.weight";
    let list = vec![
        CkCase::new(
            "-Inf in a BF16 weight",
            st_copy,
            move |ck| {
                let mut st = StFile::read(&ck.ckpt.join(SHARD1));
                st.get_mut(name).data[2..4].copy_from_slice(&0xff80u16.to_le_bytes());
                st.write(&ck.ckpt.join(SHARD1));
            },
            &[SHARD1, name, "NaN or infinite", "--allow-nonfinite"],
        )
        .no_verify()
        .then(|ck| {
            let out = ck.root.join("out-allowed");
            convert(&ck.ckpt, ck.tower.as_deref(), &out, &["--allow-nonfinite"]).ok();
        }),
        CkCase::new(
            "NaN in an F16 tower weight",
            st_copy,
            move |ck| {
                let tp = ck.tower.as_ref().unwrap().join("model.safetensors");
                let mut st = StFile::read(&tp);
                st.get_mut(tname).data[0..2].copy_from_slice(&0x7e00u16.to_le_bytes());
                st.write(&tp);
            },
            &["model.safetensors", tname],
        )
        .no_verify(),
        CkCase::new(
            "+Inf in a .bin weight",
            bin_copy,
            |ck| {
                super::pytorch::rezip(
                    ck,
                    |p| p.to_vec(),
                    |n, mut b| {
                        if n == "pytorch_model/data/0" {
                            b[100..102].copy_from_slice(&0x7c00u16.to_le_bytes());
                        }
                        Some(b)
                    },
                )
            },
            &["pytorch_model.bin", first, "NaN or infinite"],
        )
        .no_verify()
        .then(|ck| {
            let out = ck.root.join("out-allowed");
            run(
                args([
                    "hf-to-gguf".into(),
                    ck.ckpt.clone().into_os_string(),
                    "--out-dir".into(),
                    out.clone().into_os_string(),
                    "-q".into(),
                    "--allow-nonfinite".into(),
                ]),
                &ck.root,
            )
            .ok();
            let g = GgufFile::open(out.join("ckpt-F16.gguf")).unwrap();
            let d = g.data(g.tensor("output.weight").unwrap());
            assert!(half::f16::from_le_bytes([d[100], d[101]]).is_infinite());
        }),
    ];
    refuse_ckpts("non-finite weights", list);
}

/// A crash found by the fuzz targets (fuzz/) replayed through the CLI; the library-level
/// replays are beside their parsers (`hostile_tests` in src/formats/checkpoint/config.rs and
/// src/formats/checkpoint/tokenizer/vocab.rs).
#[test]
fn fuzz_regressions() {
    // tokenizer_json crash-4196d21d: the tokenizers library (0.23) indexes past its buffer when
    // a merge's two halves are in the vocabulary but together longer than every entry; the
    // panic must become an error naming tokenizer.json.
    let tmp = tempdir();
    let j = r#"{"model": {"type": "BPE", "byte_fallback": true, "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "aaaa": 3, "<0x41>": 4}, "merges": [["aaaa", "aaaa"]]}, "decoder": {"type": "Sequence", "decoders": []}}"#;
    let ck = tmp.path().join("ck");
    copy_dir(&common::ckpt(), &ck);
    let _ = std::fs::remove_file(ck.join("tokenizer.model"));
    std::fs::write(ck.join("tokenizer.json"), j).unwrap();
    let out = tmp.path().join("out");
    let r = convert(&ck, Some(&common::tower()), &out, &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("tokenizer.json") && !r.stderr.contains("RUST_BACKTRACE"),
        "{}",
        r.stderr
    );
}

#[test]
fn issue16_cases() {
    run_rows("issue 16, checkpoint", issue16_rows());
}

fn issue16_rows() -> Vec<Row> {
    vec![
        Row {
            case: "index naming 200000 distinct shards (6 MB) / hf-to-gguf",
            cmd: |e| {
                edit_index(&e.ck, |m| {
                    for i in 0..200_000 {
                        m.insert(
                            format!("extra.{i}"),
                            json!(format!("shard-{i}.safetensors")),
                        );
                    }
                });
                hf(e)
            },
            env: &[],
            code: 1,
            needles: &["model.safetensors.index.json", "more than 4096 shard files"],
            keep: &[],
        },
        Row {
            case: "tokenizer.model of 0 bytes / hf-to-gguf",
            cmd: |e| {
                std::fs::write(e.ck.join("tokenizer.model"), b"").unwrap();
                hf(e)
            },
            env: &[],
            code: 1,
            needles: &["tokenizer.model", "no pieces"],
            keep: &[],
        },
        Row {
            case: "tokenizer.model of 0 bytes / verify (same verdict as hf-to-gguf)",
            cmd: |e| {
                std::fs::write(e.ck.join("tokenizer.model"), b"").unwrap();
                verify16(e, vec![])
            },
            env: &[],
            code: 1,
            needles: &["tokenizer.model", "no pieces"],
            keep: &[],
        },
    ]
}
