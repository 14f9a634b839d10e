//! GGUF files given to every command that reads one: cut short, with hostile headers, and
//! well-formed but wrong for the command.
use super::*;
use mmfuser_convert::formats::gguf::GgufFile;

/// Where the sections of a GGUF file are (walked here independently of src/formats/gguf).
struct GgufMap {
    /// (key, start of the key string, end of the value)
    kvs: Vec<(String, usize, usize)>,
    /// (name, start of the info, offset of its type field, end of the info)
    infos: Vec<(String, usize, usize, usize)>,
    data: usize,
}

fn walk_gguf(b: &[u8]) -> GgufMap {
    let u32_at = |p: usize| u32::from_le_bytes(b[p..p + 4].try_into().unwrap());
    let u64_at = |p: usize| u64::from_le_bytes(b[p..p + 8].try_into().unwrap()) as usize;
    let n_t = u64_at(8);
    let n_kv = u64_at(16);
    let mut p = 24;
    fn skip(b: &[u8], p: &mut usize, ty: u32) {
        let u32_at = |p: usize| u32::from_le_bytes(b[p..p + 4].try_into().unwrap());
        let u64_at = |p: usize| u64::from_le_bytes(b[p..p + 8].try_into().unwrap()) as usize;
        match ty {
            0 | 1 | 7 => *p += 1,
            2 | 3 => *p += 2,
            4..=6 => *p += 4,
            10..=12 => *p += 8,
            8 => *p += 8 + u64_at(*p),
            9 => {
                let et = u32_at(*p);
                let n = u64_at(*p + 4);
                *p += 12;
                for _ in 0..n {
                    skip(b, p, et);
                }
            }
            t => panic!("value type {t}"),
        }
    }
    let mut kvs = vec![];
    for _ in 0..n_kv {
        let start = p;
        let n = u64_at(p);
        let key = String::from_utf8(b[p + 8..p + 8 + n].to_vec()).unwrap();
        p += 8 + n;
        let ty = u32_at(p);
        p += 4;
        skip(b, &mut p, ty);
        kvs.push((key, start, p));
    }
    let mut infos = vec![];
    for _ in 0..n_t {
        let start = p;
        let n = u64_at(p);
        let name = String::from_utf8(b[p + 8..p + 8 + n].to_vec()).unwrap();
        p += 8 + n;
        let nd = u32_at(p) as usize;
        p += 4 + 8 * nd;
        let ty_at = p;
        p += 12;
        infos.push((name, start, ty_at, p));
    }
    GgufMap {
        kvs,
        infos,
        data: p.div_ceil(32) * 32,
    }
}

/// Reassemble a GGUF from a base file: its header with KV bytes `kvs` and tensor-info bytes
/// `infos` (raw, as given), then the base file's data section.
fn assemble(base: &[u8], m: &GgufMap, kvs: &[Vec<u8>], infos: &[Vec<u8>]) -> Vec<u8> {
    let mut b = base[..8].to_vec();
    b.extend((infos.len() as u64).to_le_bytes());
    b.extend((kvs.len() as u64).to_le_bytes());
    for k in kvs {
        b.extend(k);
    }
    for i in infos {
        b.extend(i);
    }
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
    b.extend_from_slice(&base[m.data..]);
    b
}

fn gguf_kv(key: &str, ty: u32, value: &[u8]) -> Vec<u8> {
    let mut v = (key.len() as u64).to_le_bytes().to_vec();
    v.extend(key.as_bytes());
    v.extend(ty.to_le_bytes());
    v.extend(value);
    v
}

fn gguf_info(name: &[u8], ne: &[u64], ty: u32, offset: u64) -> Vec<u8> {
    let mut v = (name.len() as u64).to_le_bytes().to_vec();
    v.extend(name);
    v.extend((ne.len() as u32).to_le_bytes());
    for d in ne {
        v.extend(d.to_le_bytes());
    }
    v.extend(ty.to_le_bytes());
    v.extend(offset.to_le_bytes());
    v
}

/// Give a broken GGUF to every command that reads one: quantize (as an LLM, or as an mmproj with
/// --vision-type), and verify (as --gguf or --mmproj, with the good file as the other).
fn refuse_gguf(
    cases: &mut Cases,
    case: &str,
    a: &Artefacts,
    bytes: &[u8],
    is_mmproj: bool,
    needles: &[&str],
) {
    let tmp = tempdir();
    let dir = tmp.path().join("in");
    std::fs::create_dir(&dir).unwrap();
    let name = if is_mmproj {
        "mmproj-broken-F16.gguf"
    } else {
        "broken-F16.gguf"
    };
    let input = dir.join(name);
    std::fs::write(&input, bytes).unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let mut needles: Vec<&str> = needles.to_vec();
    needles.push(name);
    let mut a1 = args(["quantize", "-q"]);
    a1.push(input.clone().into());
    a1.extend(args(["-o".into(), out.join("q.gguf").into_os_string()]));
    a1.extend(args(if is_mmproj {
        ["--vision-type", "Q8_0"]
    } else {
        ["--type", "Q8_0"]
    }));
    let r = run(a1, tmp.path());
    cases.check(&format!("{case} / quantize"), &r, 1, &out, &[], &needles);
    cases.check(
        &format!("{case} / quantize (input dir)"),
        &r,
        1,
        &dir,
        &[name],
        &[],
    );
    let (g, m) = if is_mmproj {
        (a.llm.clone(), input.clone())
    } else {
        (input.clone(), a.mmproj.clone())
    };
    let mut v = args([
        "verify".into(),
        common::ckpt().into_os_string(),
        "--vision-tower".into(),
        common::tower().into_os_string(),
    ]);
    v.extend(args([
        "--gguf".into(),
        g.into_os_string(),
        "--mmproj".into(),
        m.into_os_string(),
        "--device".into(),
        "cpu".into(),
    ]));
    let r = run(v, tmp.path());
    cases.check(&format!("{case} / verify"), &r, 1, &dir, &[name], &needles);
}

/// One broken GGUF (an LLM, or an mmproj), refused by [`refuse_gguf`] naming every needle.
struct GgufCase {
    name: String,
    bytes: Vec<u8>,
    mmproj: bool,
    needles: Vec<String>,
}

impl GgufCase {
    fn new(name: impl Into<String>, bytes: Vec<u8>, mmproj: bool, needles: &[&str]) -> GgufCase {
        GgufCase {
            name: name.into(),
            bytes,
            mmproj,
            needles: needles.iter().map(|s| s.to_string()).collect(),
        }
    }
}

fn refuse_ggufs(what: &str, a: &Artefacts, list: &[GgufCase]) {
    let mut cases = Cases::default();
    for c in list {
        refuse_gguf(
            &mut cases,
            &c.name,
            a,
            &c.bytes,
            c.mmproj,
            &strs(&c.needles),
        );
    }
    cases.finish(what);
}

#[test]
fn gguf_truncated_at_every_section_boundary() {
    let a = artefacts();
    let mut list = vec![];
    for (path, is_mmproj) in [(&a.llm, false), (&a.mmproj, true)] {
        let b = std::fs::read(path).unwrap();
        let m = walk_gguf(&b);
        let g = GgufFile::open(path).unwrap();
        let mut cuts: Vec<(usize, Option<String>)> = vec![
            (0, None),
            (3, None),
            (4, None),
            (8, None),
            (16, None),
            (24, None),
        ];
        for (_, _, end) in &m.kvs {
            cuts.push((*end - 1, None));
            cuts.push((*end, None));
        }
        for (_, _, _, end) in &m.infos {
            cuts.push((*end, None));
        }
        // In the data: the first tensor whose bytes are cut is named.
        let mut ts: Vec<_> = g.tensors.iter().collect();
        ts.sort_by_key(|t| t.offset);
        if !is_mmproj {
            for t in &ts {
                cuts.push((t.offset as usize, Some(t.info.name.clone())));
                cuts.push((
                    (t.offset + t.n_bytes / 2) as usize,
                    Some(t.info.name.clone()),
                ));
            }
        } else {
            for t in ts.iter().step_by(16) {
                cuts.push((t.offset as usize + 1, Some(t.info.name.clone())));
            }
        }
        cuts.push((b.len() - 1, Some(ts.last().unwrap().info.name.clone())));
        cuts.sort();
        cuts.dedup();
        for (cut, tensor) in cuts {
            // Only the truncations that leave a tensor's own bytes short name that tensor.
            let needles: Vec<&str> = tensor.iter().map(String::as_str).collect();
            list.push(GgufCase::new(
                format!("{} cut at byte {cut}", file_name(path)),
                b[..cut].to_vec(),
                is_mmproj,
                &needles,
            ));
        }
    }
    refuse_ggufs("truncated GGUF", &a, &list);
}

#[test]
fn gguf_hostile_headers() {
    let a = artefacts();
    let b = std::fs::read(&a.llm).unwrap();
    let m = walk_gguf(&b);
    let kv_bytes: Vec<Vec<u8>> = m.kvs.iter().map(|(_, s, e)| b[*s..*e].to_vec()).collect();
    let info_bytes: Vec<Vec<u8>> = m
        .infos
        .iter()
        .map(|(_, s, _, e)| b[*s..*e].to_vec())
        .collect();
    let kv_index = |k: &str| m.kvs.iter().position(|x| x.0 == k).unwrap();
    let info_index = |n: &str| m.infos.iter().position(|x| x.0 == n).unwrap();
    let patch = |at: usize, v: &[u8]| {
        let mut x = b.clone();
        x[at..at + v.len()].copy_from_slice(v);
        x
    };
    let with_kvs = |f: &dyn Fn(&mut Vec<Vec<u8>>)| {
        let mut k = kv_bytes.clone();
        f(&mut k);
        assemble(&b, &m, &k, &info_bytes)
    };
    let with_infos = |f: &dyn Fn(&mut Vec<Vec<u8>>)| {
        let mut i = info_bytes.clone();
        f(&mut i);
        assemble(&b, &m, &kv_bytes, &i)
    };
    let tokens = kv_index("tokenizer.ggml.tokens");
    let (tok_start, tok_end) = (m.kvs[tokens].1, m.kvs[tokens].2);
    let tok_count_at = tok_start + 8 + "tokenizer.ggml.tokens".len() + 4 + 4;
    let attn_q = "blk.0.attn_q.weight";
    let q = info_index(attn_q);
    let (q_start, q_ty) = (m.infos[q].1, m.infos[q].2);
    let q_ne = (q_ty - (q_start + 8 + attn_q.len() + 4)) / 8;
    let pow = |x: u64| x.to_le_bytes();
    // The LLM with `bytes` for a header; the errors name the file and `needles`.
    let hdr =
        |name: &str, bytes: Vec<u8>, needles: &[&str]| GgufCase::new(name, bytes, false, needles);
    let mb = std::fs::read(&a.mmproj).unwrap();
    let mm = walk_gguf(&mb);
    let list = vec![
        hdr("bad magic", patch(0, b"GGUG"), &["not a GGUF file"]),
        hdr("legacy GGML magic", patch(0, b"lmgg"), &["not a GGUF file"]),
        hdr("version 1", patch(4, &1u32.to_le_bytes()), &["version 1"]),
        hdr("version 2", patch(4, &2u32.to_le_bytes()), &["version 2"]),
        hdr("version 4", patch(4, &4u32.to_le_bytes()), &["version 4"]),
        hdr(
            "version u32::MAX",
            patch(4, &u32::MAX.to_le_bytes()),
            &["version"],
        ),
        hdr("tensor count u64::MAX", patch(8, &pow(u64::MAX)), &[]),
        hdr("metadata count u64::MAX", patch(16, &pow(u64::MAX)), &[]),
        hdr("metadata count 2^40", patch(16, &pow(1 << 40)), &[]),
        hdr(
            "tensor count one too many",
            patch(8, &pow(m.infos.len() as u64 + 1)),
            &[],
        ),
        hdr(
            "metadata count one too few",
            patch(16, &pow(m.kvs.len() as u64 - 1)),
            &[],
        ),
        hdr("key length u64::MAX", patch(24, &pow(u64::MAX)), &[]),
        hdr(
            "tokens array count u64::MAX",
            patch(tok_count_at, &pow(u64::MAX)),
            &["tokenizer.ggml.tokens"],
        ),
        hdr(
            "tokens array count 2^40",
            patch(tok_count_at, &pow(1 << 40)),
            &["tokenizer.ggml.tokens"],
        ),
        hdr(
            "token string length u64::MAX",
            patch(tok_count_at + 8, &pow(u64::MAX)),
            &["tokenizer.ggml.tokens"],
        ),
        hdr(
            "unknown array element type",
            patch(tok_count_at - 4, &99u32.to_le_bytes()),
            &["tokenizer.ggml.tokens"],
        ),
        hdr(
            "unknown value type",
            patch(
                tok_start + 8 + "tokenizer.ggml.tokens".len(),
                &13u32.to_le_bytes(),
            ),
            &["tokenizer.ggml.tokens"],
        ),
        hdr(
            "nested arrays claiming 2^32 elements each",
            with_kvs(&|k| {
                let mut v = 9u32.to_le_bytes().to_vec();
                v.extend(pow(1 << 32));
                for _ in 0..64 {
                    v.extend(9u32.to_le_bytes());
                    v.extend(pow(1 << 32));
                }
                k.push(gguf_kv("evil.nested", 9, &v));
            }),
            &["evil.nested"],
        ),
        hdr(
            "70 million one-byte metadata values (2 GiB as values)",
            with_kvs(&|k| {
                let n = 70_000_000u64;
                let mut v = 0u32.to_le_bytes().to_vec();
                v.extend(pow(n));
                v.resize(v.len() + n as usize, 7);
                k.push(gguf_kv("evil.big", 9, &v));
            }),
            &["evil.big", "metadata values"],
        ),
        hdr(
            "bool byte 2",
            with_kvs(&|k| k.push(gguf_kv("evil.bool", 7, &[2]))),
            &["evil.bool"],
        ),
        hdr(
            "non-UTF-8 key",
            with_kvs(&|k| {
                let mut v = 3u64.to_le_bytes().to_vec();
                v.extend([b'a', 0xff, b'b']);
                v.extend(4u32.to_le_bytes());
                v.extend(1u32.to_le_bytes());
                k.push(v)
            }),
            &["UTF-8"],
        ),
        hdr(
            "duplicate key",
            with_kvs(&|k| {
                let i = kv_index("general.architecture");
                k.push(k[i].clone())
            }),
            &["general.architecture"],
        ),
        hdr(
            "alignment 0",
            with_kvs(&|k| k.push(gguf_kv("general.alignment", 4, &0u32.to_le_bytes()))),
            &["general.alignment"],
        ),
        hdr(
            "alignment 3",
            with_kvs(&|k| k.push(gguf_kv("general.alignment", 4, &3u32.to_le_bytes()))),
            &["general.alignment"],
        ),
        hdr(
            "alignment 2^31",
            with_kvs(&|k| k.push(gguf_kv("general.alignment", 4, &(1u32 << 31).to_le_bytes()))),
            &[],
        ),
        hdr(
            "alignment 64 (offsets written for 32)",
            with_kvs(&|k| {
                k.push(gguf_kv("general.alignment", 4, &64u32.to_le_bytes()));
                // The data must start off a 64-byte boundary, whatever the header's length: a
                // 32-byte key/value shifts it when the 32-padded header is a multiple of 64.
                let len = 24 + k.iter().chain(&info_bytes).map(Vec::len).sum::<usize>();
                if len.next_multiple_of(32) % 64 == 0 {
                    let pad = [&7u64.to_le_bytes()[..], b"padding"].concat();
                    k.push(gguf_kv("x.pad", 8, &pad));
                }
            }),
            &[],
        ),
        hdr(
            "alignment a string",
            with_kvs(&|k| {
                let mut v = 2u64.to_le_bytes().to_vec();
                v.extend(b"32");
                k.push(gguf_kv("general.alignment", 8, &v))
            }),
            &["general.alignment"],
        ),
        hdr(
            "tensor with 0 dimensions",
            with_infos(&|i| i[q] = gguf_info(attn_q.as_bytes(), &[], 1, 0)),
            &[attn_q],
        ),
        hdr(
            "tensor with 5 dimensions",
            with_infos(&|i| i[q] = gguf_info(attn_q.as_bytes(), &[1, 1, 1, 1, 1], 1, 0)),
            &[attn_q],
        ),
        hdr("dimension 0", patch(q_ty - 8 * q_ne, &pow(0)), &[attn_q]),
        hdr(
            "dimension u64::MAX",
            patch(q_ty - 8 * q_ne, &pow(u64::MAX)),
            &[attn_q],
        ),
        hdr(
            "dimensions whose product overflows",
            with_infos(&|i| {
                i[q] = gguf_info(attn_q.as_bytes(), &[1 << 32, 1 << 32, 1 << 32], 1, 0)
            }),
            &[attn_q],
        ),
        hdr(
            "dimensions of 2^62 elements",
            with_infos(&|i| i[q] = gguf_info(attn_q.as_bytes(), &[1 << 31, 1 << 31], 1, 0)),
            &[attn_q],
        ),
        hdr(
            "unknown ggml type 99",
            patch(q_ty, &99u32.to_le_bytes()),
            &[attn_q, "99"],
        ),
        hdr(
            "ggml type IQ2_XXS (16)",
            patch(q_ty, &16u32.to_le_bytes()),
            &[attn_q],
        ),
        hdr(
            "Q8_0 row not a multiple of 32",
            with_infos(&|i| i[q] = gguf_info(attn_q.as_bytes(), &[33, 8], 8, 0)),
            &[attn_q],
        ),
        hdr(
            "data offset past the end",
            patch(q_ty + 4, &pow(1 << 40)),
            &[attn_q],
        ),
        hdr(
            "data offset u64::MAX - 31",
            patch(q_ty + 4, &pow(u64::MAX - 31)),
            &[attn_q],
        ),
        hdr(
            "data offset not aligned",
            patch(q_ty + 4, &pow(1)),
            &[attn_q],
        ),
        hdr(
            "duplicate tensor name",
            with_infos(&|i| {
                let d = i[q].clone();
                i.push(d)
            }),
            &[attn_q],
        ),
        hdr(
            "tensor name of 100 bytes",
            with_infos(&|i| i.push(gguf_info(&[b'x'; 100], &[32], 0, 0))),
            &["xxxx"],
        ),
        hdr(
            "non-UTF-8 tensor name",
            with_infos(&|i| i.push(gguf_info(b"bad\xffname", &[32], 0, 0))),
            &["UTF-8"],
        ),
        hdr("token strings cut short", b[..tok_end - 3].to_vec(), &[]),
        // The same checks reach the mmproj reader.
        GgufCase::new(
            "mmproj tensor of unknown type",
            {
                let mut bad = mb.clone();
                bad[mm.infos[3].2..mm.infos[3].2 + 4].copy_from_slice(&77u32.to_le_bytes());
                bad
            },
            true,
            &[&mm.infos[3].0, "77"],
        ),
        GgufCase::new(
            "mmproj version 2",
            {
                let mut bad = mb.clone();
                bad[4..8].copy_from_slice(&2u32.to_le_bytes());
                bad
            },
            true,
            &["version 2"],
        ),
    ];
    refuse_ggufs("hostile GGUF headers", &a, &list);
}

/// Well-formed GGUF files whose content is wrong for the command.
#[test]
fn gguf_wrong_content() {
    let a = artefacts();
    let b = std::fs::read(&a.llm).unwrap();
    let m = walk_gguf(&b);
    let kv_bytes: Vec<Vec<u8>> = m.kvs.iter().map(|(_, s, e)| b[*s..*e].to_vec()).collect();
    let info_bytes: Vec<Vec<u8>> = m
        .infos
        .iter()
        .map(|(_, s, _, e)| b[*s..*e].to_vec())
        .collect();
    let without = |k: &str| {
        let kv: Vec<Vec<u8>> = m
            .kvs
            .iter()
            .zip(&kv_bytes)
            .filter(|(x, _)| x.0 != k)
            .map(|(_, v)| v.clone())
            .collect();
        assemble(&b, &m, &kv, &info_bytes)
    };
    let g = GgufFile::open(&a.llm).unwrap();
    let victim = g.tensor("blk.1.ffn_down.weight").unwrap();
    let mut nan = b.clone();
    nan[victim.offset as usize + 6..victim.offset as usize + 8]
        .copy_from_slice(&0x7e00u16.to_le_bytes());
    let nan = &nan;
    // quantize to Q8_0 from `bytes` written as `dir/in-F16.gguf`, into `dir/out`.
    let quantize = |name: &str, bytes: Vec<u8>, needles: &[&str]| {
        CmdCase::new(
            format!("{name} / quantize"),
            move |dir| {
                let input = dir.join("in-F16.gguf");
                std::fs::write(&input, &bytes).unwrap();
                let out = dir.join("out");
                std::fs::create_dir(&out).unwrap();
                let mut a1 = args(["quantize", "-q", "--type", "Q8_0"]);
                a1.push(input.clone().into());
                a1.extend(args(["-o".into(), out.join("q.gguf").into_os_string()]));
                (a1, out)
            },
            1,
            &[],
            &[needles, &["in-F16.gguf"][..]].concat(),
        )
    };
    // verify with `gguf` as --gguf and the file `mmproj` returns (it may write one under the
    // case's directory) as --mmproj.
    let verify = |name: &str,
                  gguf: &Path,
                  mmproj: Box<dyn Fn(&Path) -> PathBuf>,
                  keep: &[&str],
                  needles: &[&str]| {
        let gguf = gguf.to_path_buf();
        CmdCase::new(
            format!("{name} / verify"),
            move |dir| {
                let mut v = args([
                    "verify".into(),
                    common::ckpt().into_os_string(),
                    "--vision-tower".into(),
                    common::tower().into_os_string(),
                ]);
                v.extend(args([
                    "--gguf".into(),
                    gguf.clone().into_os_string(),
                    "--mmproj".into(),
                    mmproj(dir).into_os_string(),
                    "--device".into(),
                    "cpu".into(),
                ]));
                (v, dir.to_path_buf())
            },
            1,
            keep,
            needles,
        )
    };
    let given = |p: &Path| -> Box<dyn Fn(&Path) -> PathBuf> {
        let p = p.to_path_buf();
        Box::new(move |_| p.clone())
    };
    let mb = std::fs::read(&a.mmproj).unwrap();
    let mm = walk_gguf(&mb);
    let list = vec![
        quantize(
            "no general.architecture",
            without("general.architecture"),
            &["general.architecture"],
        ),
        quantize(
            "no llama.block_count",
            without("llama.block_count"),
            &["llama.block_count"],
        ),
        quantize(
            "NaN in a weight",
            nan.clone(),
            &["blk.1.ffn_down.weight", "NaN"],
        ),
        // A quantized input is refused, naming a quantized tensor.
        CmdCase::new(
            "already quantized / quantize",
            |dir| {
                let q8 = dir.join("q8.gguf");
                run(
                    args([
                        "quantize".into(),
                        a.llm.clone().into_os_string(),
                        "--type".into(),
                        "Q8_0".into(),
                        "-o".into(),
                        q8.clone().into_os_string(),
                        "-q".into(),
                    ]),
                    dir,
                )
                .ok();
                let out = dir.join("out");
                std::fs::create_dir(&out).unwrap();
                let a1 = args([
                    "quantize".into(),
                    q8.clone().into_os_string(),
                    "--type".into(),
                    "Q4_K_M".into(),
                    "-o".into(),
                    out.join("x.gguf").into_os_string(),
                    "-q".into(),
                ]);
                (a1, out)
            },
            1,
            &[],
            &["q8.gguf", "already quantized"],
        ),
        // NaN: --allow-nonfinite lets F16 through (below) but the block quantizers still
        // refuse, naming it.
        CmdCase::new(
            "NaN with --allow-nonfinite, Q8_0 / quantize",
            |dir| {
                let input = dir.join("nan-F16.gguf");
                std::fs::write(&input, nan).unwrap();
                let out = dir.join("out");
                std::fs::create_dir(&out).unwrap();
                let a1 = args([
                    "quantize".into(),
                    input.clone().into_os_string(),
                    "--type".into(),
                    "Q8_0".into(),
                    "--allow-nonfinite".into(),
                    "-o".into(),
                    out.join("x.gguf").into_os_string(),
                    "-q".into(),
                ]);
                (a1, out)
            },
            1,
            &[],
            &["nan-F16.gguf", "blk.1.ffn_down.weight"],
        ),
        // verify: an LLM given as --mmproj (and the reverse), and an mmproj missing a key.
        verify(
            "LLM as --mmproj",
            &a.llm,
            given(&a.llm),
            &[],
            &["general.architecture"],
        ),
        verify(
            "mmproj as --gguf",
            &a.mmproj,
            given(&a.mmproj),
            &[],
            &["general.architecture"],
        ),
        verify(
            "mmproj without mmfuser.head_count",
            &a.llm,
            Box::new(move |dir| {
                let kvs: Vec<Vec<u8>> = mm
                    .kvs
                    .iter()
                    .filter(|x| x.0 != "mmfuser.head_count")
                    .map(|(_, s, e)| mb[*s..*e].to_vec())
                    .collect();
                let infos: Vec<Vec<u8>> = mm
                    .infos
                    .iter()
                    .map(|(_, s, _, e)| mb[*s..*e].to_vec())
                    .collect();
                let broken = assemble(&mb, &mm, &kvs, &infos);
                let p = dir.join("mmproj-nokey.gguf");
                std::fs::write(&p, broken).unwrap();
                p
            }),
            &["mmproj-nokey.gguf"],
            &["mmproj-nokey.gguf", "mmfuser.head_count"],
        ),
    ];
    run_cmds("GGUF with wrong content", list);
    // The escape hatch itself: F16 with --allow-nonfinite keeps the NaN.
    let tmp = tempdir();
    let input = tmp.path().join("nan-F16.gguf");
    std::fs::write(&input, nan).unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    run(
        args([
            "quantize".into(),
            input.clone().into_os_string(),
            "--type".into(),
            "F16".into(),
            "--allow-nonfinite".into(),
            "-o".into(),
            out.join("x.gguf").into_os_string(),
            "-q".into(),
        ]),
        tmp.path(),
    )
    .ok();
    let g = GgufFile::open(out.join("x.gguf")).unwrap();
    let t = g.tensor("blk.1.ffn_down.weight").unwrap();
    let d = g.data(t);
    assert!(
        half::f16::from_le_bytes([d[6], d[7]]).is_nan(),
        "NaN passed through with --allow-nonfinite"
    );
}

#[test]
fn issue16_cases() {
    run_rows("issue 16, GGUF", issue16_rows());
}

fn issue16_rows() -> Vec<Row> {
    vec![
        // 12. Messages.
        Row {
            case: "an mmproj tensor of the wrong shape is reported against the mmproj / verify",
            cmd: |e| {
                // mm.1.weight with its two dimensions swapped (same byte count).
                let mut b = std::fs::read(&e.mmproj).unwrap();
                let m = walk_gguf(&b);
                let ty_at = m.infos.iter().find(|i| i.0 == "mm.1.weight").unwrap().2;
                let (d0, d1) = (
                    b[ty_at - 16..ty_at - 8].to_vec(),
                    b[ty_at - 8..ty_at].to_vec(),
                );
                assert_ne!(d0, d1);
                b[ty_at - 16..ty_at - 8].copy_from_slice(&d1);
                b[ty_at - 8..ty_at].copy_from_slice(&d0);
                let p = put(e, "bad-mmproj.gguf", &b);
                verify_with(e, &e.llm, &p, vec![])
            },
            env: &[],
            code: 3,
            needles: &["bad-mmproj.gguf", "mm.1.weight"],
            keep: &[],
        },
    ]
}
