//! PyTorch .bin archives: crafted pickles (code execution attempts, structures that crashed
//! candle's reader), tensors that do not fit their storage, broken zip archives.
use super::*;
use std::io::{Read, Write};
use std::rc::Rc;

const PKL: &str = "pytorch_model/data.pkl";

/// Pickle opcodes, written by hand (protocol 2, as torch.save writes them).
#[derive(Clone, Default)]
struct Pk(Vec<u8>);
impl Pk {
    fn new() -> Self {
        Pk(vec![0x80, 2])
    }
    fn op(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    fn s(self, x: &str) -> Self {
        let mut p = self.op(b"X");
        p.0.extend((x.len() as u32).to_le_bytes());
        p.op(x.as_bytes())
    }
    fn int(self, i: i32) -> Self {
        let mut p = self.op(b"J");
        p.0.extend(i.to_le_bytes());
        p
    }
    fn global(self, m: &str, n: &str) -> Self {
        self.op(format!("c{m}\n{n}\n").as_bytes())
    }
    fn ints(self, v: &[i32]) -> Self {
        let mut p = self.op(b"(");
        for &i in v {
            p = p.int(i);
        }
        p.op(b"t")
    }
    /// `_rebuild_tensor_v2(('storage', torch.<class>, key, 'cpu', numel), offset, shape, stride, False, OrderedDict())`
    fn tensor(
        self,
        class: &str,
        key: &str,
        numel: i32,
        offset: i32,
        shape: &[i32],
        stride: &[i32],
    ) -> Self {
        self.global("torch._utils", "_rebuild_tensor_v2")
            .op(b"((")
            .s("storage")
            .global("torch", class)
            .s(key)
            .s("cpu")
            .int(numel)
            .op(b"tQ")
            .int(offset)
            .ints(shape)
            .ints(stride)
            .op(b"\x89")
            .global("collections", "OrderedDict")
            .op(b")RtR")
    }
}

/// Entries of a zip archive, in order.
fn zip_entries(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut z = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    (0..z.len())
        .map(|i| {
            let mut f = z.by_index(i).unwrap();
            let mut b = vec![];
            f.read_to_end(&mut b).unwrap();
            (f.name().unwrap().to_string(), b)
        })
        .collect()
}

fn write_zip(path: &Path, entries: &[(String, Vec<u8>)]) {
    let mut w = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (n, b) in entries {
        w.start_file(n.as_str(), opts).unwrap();
        w.write_all(b).unwrap();
    }
    w.finish().unwrap();
}

/// The fixture's entries with the pickle replaced by `f(pickle)` and the other entries by `g`.
pub(super) fn rezip(
    ck: &Ck,
    f: impl Fn(&[u8]) -> Vec<u8>,
    g: impl Fn(&str, Vec<u8>) -> Option<Vec<u8>>,
) {
    let p = ck.ckpt.join("pytorch_model.bin");
    let entries: Vec<(String, Vec<u8>)> = zip_entries(&p)
        .into_iter()
        .filter_map(|(n, b)| {
            if n == PKL {
                Some((n, f(&b)))
            } else {
                g(&n, b).map(|b| (n.clone(), b))
            }
        })
        .collect();
    write_zip(&p, &entries);
}

/// The fixture pickle with `extra` inserted as more state-dict items before the final SETITEMS.
fn add_items(pkl: &[u8], extra: &[u8]) -> Vec<u8> {
    assert!(pkl.ends_with(b"u."));
    let mut v = pkl[..pkl.len() - 2].to_vec();
    v.extend_from_slice(extra);
    v.extend_from_slice(b"u.");
    v
}

/// Set the compression method of one entry (local header and central directory) without
/// touching its bytes.
fn set_zip_method(b: &[u8], name: &str, method: u16) -> Vec<u8> {
    let mut b = b.to_vec();
    let n = name.as_bytes();
    let mut hits = 0;
    for i in 0..b.len().saturating_sub(46) {
        let sig = u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let (name_at, method_at, len_at) = match sig {
            0x04034b50 => (i + 30, i + 8, i + 26),
            0x02014b50 => (i + 46, i + 10, i + 28),
            _ => continue,
        };
        let len = u16::from_le_bytes(b[len_at..len_at + 2].try_into().unwrap()) as usize;
        if len == n.len() && b.get(name_at..name_at + len) == Some(n) {
            b[method_at..method_at + 2].copy_from_slice(&method.to_le_bytes());
            hits += 1;
        }
    }
    assert_eq!(
        hits, 2,
        "local header and central directory entry of {name}"
    );
    b
}

#[test]
fn pytorch_archives() {
    let archive = "pytorch_model.bin";
    let keep = |_: &str, b: Vec<u8>| Some(b);
    type Mk = Box<dyn Fn(&Ck)>;
    type PklEdit = Box<dyn Fn(&[u8]) -> Vec<u8>>;
    let pickle = |f: PklEdit| -> Mk { Box::new(move |ck: &Ck| rezip(ck, &f, keep)) };
    let item = |p: Pk| -> Mk {
        let extra = p.0;
        Box::new(move |ck: &Ck| rezip(ck, |pkl| add_items(pkl, &extra), keep))
    };
    let whole = |p: Pk| -> Mk {
        let b = p.0;
        Box::new(move |ck: &Ck| rezip(ck, |_| b.clone(), keep))
    };
    // A broken copy of the .bin fixture: the errors name the archive and `extra`.
    let bin = |name: &str, make: Mk, extra: &[&str]| {
        CkCase::new(name, bin_copy, make, &[&[archive][..], extra].concat())
    };
    let first = "lm_head.weight";
    let mut list = vec![
        // Code execution attempts: refused at the import, never skipped.
        bin(
            "GLOBAL os.system + REDUCE as a state-dict value",
            item(
                Pk::default()
                    .s("evil")
                    .global("os", "system")
                    .s("touch /tmp/pwned")
                    .op(b"\x85R"),
            ),
            &["os.system", "refused"],
        ),
        bin(
            "GLOBAL os.system + REDUCE as the whole pickle",
            whole(
                Pk::new()
                    .global("os", "system")
                    .s("touch /tmp/pwned")
                    .op(b"\x85R."),
            ),
            &["os.system"],
        ),
        bin(
            "builtins.eval through STACK_GLOBAL",
            item(
                Pk::default()
                    .s("evil")
                    .s("builtins")
                    .s("eval")
                    .op(b"\x93")
                    .s("1")
                    .op(b"\x85R"),
            ),
            &["builtins.eval"],
        ),
        bin(
            "INST opcode",
            item(
                Pk::default()
                    .s("evil")
                    .op(b"(X\x01\x00\x00\x00aios\nsystem\n"),
            ),
            &["opcode 0x69"],
        ),
        bin(
            "NEWOBJ of an allowed class",
            item(
                Pk::default()
                    .s("evil")
                    .global("collections", "OrderedDict")
                    .op(b")\x81"),
            ),
            &["opcode 0x81"],
        ),
        bin(
            "torch.load(weights_only=False)-style module object",
            whole(Pk::new().global("__torch__", "Module").op(b")R}b.")),
            &["__torch__.Module"],
        ),
        // Not a flat state dict of tensors: refused, not skipped.
        bin(
            "a non-tensor value (nested dict)",
            item(Pk::default().s("optimizer").op(b"}")),
            &["optimizer", "not a tensor"],
        ),
        bin(
            "a non-string key",
            item(
                Pk::default()
                    .int(7)
                    .tensor("HalfStorage", "0", 131072, 0, &[4], &[1]),
            ),
            &["not a string"],
        ),
        bin(
            "duplicate tensor name",
            item(Pk::default().s(first).tensor(
                "HalfStorage",
                "0",
                131072,
                0,
                &[512, 256],
                &[256, 1],
            )),
            &[first, "twice"],
        ),
        bin(
            "the pickle is a list",
            whole(Pk::new().op(b"].")),
            &["list"],
        ),
        // Structure that crashed candle's reader (panic, stack overflow, 4 GiB allocation, memo bomb).
        bin(
            "_rebuild_tensor_v2 with a short argument tuple",
            whole(
                Pk::new()
                    .op(b"}(")
                    .s("w")
                    .global("torch._utils", "_rebuild_tensor_v2")
                    .op(b"(K\x00K\x01tRu."),
            ),
            &["_rebuild_tensor_v2"],
        ),
        bin(
            "two million nested tuples",
            whole({
                let mut p = Pk::new().op(b"N");
                p.0.extend(std::iter::repeat_n(0x85u8, 2_000_000));
                p.op(b".")
            }),
            &["nested"],
        ),
        bin(
            "BINUNICODE of length 0xFFFFFFFF",
            whole(Pk::new().op(b"X\xff\xff\xff\xff.")),
            &["truncated"],
        ),
        bin(
            "memo bomb (2^40 objects by reference)",
            whole({
                let mut p = Pk::new().op(b"}(").s("w").op(b"N");
                for _ in 0..40 {
                    p = p.op(b"q\x00h\x00\x86");
                }
                p.op(b"u.")
            }),
            &[],
        ),
        bin(
            "SETITEMS growing a shared dict (quadratic copying)",
            whole({
                let mut p = Pk::new().op(b"}");
                for i in 0..100_000 {
                    p = p.op(b"q\x00(").s(&format!("k{i}")).op(b"Nu");
                }
                p.op(b".")
            }),
            &[],
        ),
        bin(
            "LONG1 of 255 bytes",
            item(Pk::default().s("x").op(b"\x8a\xff").op(&[1u8; 255])),
            &["LONG1"],
        ),
        bin(
            "stack underflow",
            whole(Pk::new().op(b"R.")),
            &["underflow"],
        ),
        bin(
            "memo get of an unknown index",
            whole(Pk::new().op(b"h\x07.")),
            &["memo"],
        ),
        bin(
            "pickle cut before STOP",
            pickle(Box::new(|p: &[u8]| p[..p.len() - 1].to_vec())),
            &["truncated"],
        ),
        bin(
            "pickle cut in the middle",
            pickle(Box::new(|p: &[u8]| p[..p.len() / 2].to_vec())),
            &[PKL],
        ),
        bin(
            "bytes after STOP",
            pickle(Box::new(|p: &[u8]| {
                let mut v = p.to_vec();
                v.extend_from_slice(b"cos\nsystem\n");
                v
            })),
            &["after STOP"],
        ),
        bin(
            "protocol 1",
            pickle(Box::new(|p: &[u8]| [&[0x80, 1][..], &p[2..]].concat())),
            &["protocol 1"],
        ),
        bin(
            "malformed persistent id",
            item(
                Pk::default()
                    .s("x")
                    .global("torch._utils", "_rebuild_tensor_v2")
                    .op(b"((")
                    .s("storage")
                    .s("0")
                    .op(b"tQ"),
            ),
            &["persistent id"],
        ),
        // Tensors that do not fit their storage.
        bin(
            "unsupported storage type (int32)",
            pickle(Box::new(|p: &[u8]| {
                let s = p
                    .windows(19)
                    .position(|w| w == b"ctorch\nHalfStorage\n")
                    .unwrap();
                [&p[..s], b"ctorch\nIntStorage\n", &p[s + 19..]].concat()
            })),
            &[first, "int32"],
        ),
        bin(
            "an int32 tensor",
            whole(
                Pk::new()
                    .op(b"}(")
                    .s(first)
                    .tensor("IntStorage", "0", 65536, 0, &[512, 128], &[128, 1])
                    .op(b"u."),
            ),
            &[first, "int32 is not supported"],
        ),
        bin(
            "view past the end of its storage",
            item(Pk::default().s("late").tensor(
                "HalfStorage",
                "0",
                131072,
                131000,
                &[512, 256],
                &[256, 1],
            )),
            &["late", "storage '0'"],
        ),
        bin(
            "shape whose product overflows",
            item(Pk::default().s("huge").tensor(
                "HalfStorage",
                "0",
                131072,
                0,
                &[65536, 65536, 65536, 65536],
                &[1, 1, 1, 1],
            )),
            &["huge"],
        ),
        bin(
            "storage claiming more elements than its entry holds",
            item(
                Pk::default()
                    .s("w2")
                    .tensor("HalfStorage", "0", i32::MAX, 0, &[4], &[1]),
            ),
            &["w2", "claims"],
        ),
        bin(
            "storage entry missing",
            item(
                Pk::default()
                    .s("ghost")
                    .tensor("HalfStorage", "999", 4, 0, &[4], &[1]),
            ),
            &["ghost", "pytorch_model/data/999"],
        ),
        bin(
            "storage entry truncated",
            Box::new(|ck: &Ck| {
                rezip(
                    ck,
                    |p| p.to_vec(),
                    |n, b| {
                        Some(if n == "pytorch_model/data/0" {
                            b[..1000].to_vec()
                        } else {
                            b
                        })
                    },
                )
            }),
            &[first],
        ),
        bin(
            "big-endian storages",
            Box::new(|ck: &Ck| {
                rezip(
                    ck,
                    |p| p.to_vec(),
                    |n, b| {
                        Some(if n.ends_with("/byteorder") {
                            b"big".to_vec()
                        } else {
                            b
                        })
                    },
                )
            }),
            &["byteorder", "little-endian"],
        ),
        bin(
            "two data.pkl entries",
            Box::new(|ck: &Ck| {
                let p = ck.ckpt.join("pytorch_model.bin");
                let mut e = zip_entries(&p);
                let pkl = e.iter().find(|(n, _)| n == PKL).unwrap().1.clone();
                e.push(("other/data.pkl".into(), pkl));
                write_zip(&p, &e);
            }),
            &["data.pkl"],
        ),
        bin(
            "no data.pkl",
            Box::new(|ck: &Ck| {
                let p = ck.ckpt.join("pytorch_model.bin");
                let e: Vec<_> = zip_entries(&p)
                    .into_iter()
                    .filter(|(n, _)| n != PKL)
                    .collect();
                write_zip(&p, &e);
            }),
            &["no data.pkl"],
        ),
        bin(
            "compressed (deflate) data entry",
            Box::new(|ck: &Ck| {
                let p = ck.ckpt.join("pytorch_model.bin");
                let b = set_zip_method(&std::fs::read(&p).unwrap(), "pytorch_model/data/0", 8);
                std::fs::write(&p, b).unwrap();
            }),
            &[first],
        ),
        bin(
            "not a zip (a legacy pickle)",
            Box::new(|ck: &Ck| {
                std::fs::write(ck.ckpt.join("pytorch_model.bin"), Pk::new().op(b"}.").0).unwrap()
            }),
            &["zip"],
        ),
        bin(
            "empty file",
            Box::new(|ck: &Ck| std::fs::write(ck.ckpt.join("pytorch_model.bin"), b"").unwrap()),
            &[],
        ),
    ];
    // The archive cut at each of its sections.
    let p = fixture(BIN_CKPT).join("pytorch_model.bin");
    let b = std::fs::read(&p).unwrap();
    let mut z = zip::ZipArchive::new(std::fs::File::open(&p).unwrap()).unwrap();
    let (pkl_start, pkl_data) = {
        let f = z.by_name(PKL).unwrap();
        (f.header_start() as usize, f.data_start().unwrap() as usize)
    };
    let second = z.by_index(1).unwrap().header_start() as usize;
    let cd = z.central_directory_start() as usize;
    let b = Rc::new(b);
    for cut in [
        10,
        pkl_start + 20,
        pkl_data + 100,
        second + 10,
        cd,
        cd + 30,
        b.len() - 22,
        b.len() - 1,
    ] {
        let b = b.clone();
        list.push(bin(
            &format!("archive cut at byte {cut}"),
            Box::new(move |ck: &Ck| {
                std::fs::write(ck.ckpt.join("pytorch_model.bin"), &b[..cut]).unwrap()
            }),
            &[],
        ));
    }
    refuse_ckpts_then("PyTorch archives", list, |case| {
        assert!(!Path::new("/tmp/pwned").exists(), "{case}: code ran")
    });
}

/// Not hostile, but the reader that replaced candle's must keep what it did: a tensor saved as a
/// transposed view (strides (1, rows)) converts to exactly the bytes of the contiguous one.
#[test]
fn pytorch_strided_tensor_converts_like_contiguous() {
    let a = bin_copy();
    let b = bin_copy();
    // lm_head.weight [512, 256], stride (256, 1), storage '0': store its transpose instead and
    // say so with stride (1, 512).
    rezip(
        &b,
        |p| {
            let at = p
                .windows(6)
                .position(|w| w == b"M\x00\x01K\x01\x86")
                .unwrap();
            [&p[..at], b"K\x01M\x00\x02\x86", &p[at + 6..]].concat()
        },
        |n, d| {
            if n != "pytorch_model/data/0" {
                return Some(d);
            }
            let mut t = vec![0u8; d.len()];
            for i in 0..512 {
                for j in 0..256 {
                    let (src, dst) = ((i * 256 + j) * 2, (j * 512 + i) * 2);
                    t[dst..dst + 2].copy_from_slice(&d[src..src + 2]);
                }
            }
            Some(t)
        },
    );
    let out_a = a.root.join("out");
    let out_b = b.root.join("out");
    run(
        args([
            OsString::from("hf-to-gguf"),
            a.ckpt.clone().into(),
            "--out-dir".into(),
            out_a.clone().into(),
            "-q".into(),
        ]),
        &a.root,
    )
    .ok();
    run(
        args([
            OsString::from("hf-to-gguf"),
            b.ckpt.clone().into(),
            "--out-dir".into(),
            out_b.clone().into(),
            "-q".into(),
        ]),
        &b.root,
    )
    .ok();
    for f in ["ckpt-F16.gguf", "mmproj-ckpt-F16.gguf"] {
        assert!(
            std::fs::read(out_a.join(f)).unwrap() == std::fs::read(out_b.join(f)).unwrap(),
            "{f} differs"
        );
    }
}

#[test]
fn issue16_cases() {
    run_rows("issue 16, PyTorch archives", issue16_rows());
}

fn issue16_rows() -> Vec<Row> {
    vec![
        // 11. Checkpoint contents.
        Row {
            case: "pytorch zip with a storage entry stored twice / hf-to-gguf",
            cmd: |e| {
                // The .bin fixture, plus a second 'pytorch_model/data/0' with other bytes (the
                // zip writer refuses duplicate names: written as '.../X', then renamed in place).
                let ck = e.root.join("bin");
                copy_dir(&fixture(BIN_CKPT), &ck);
                let bin = ck.join("pytorch_model.bin");
                let mut ents = zip_entries(&bin);
                let d0 = ents
                    .iter()
                    .find(|x| x.0 == "pytorch_model/data/0")
                    .unwrap()
                    .1
                    .clone();
                ents.push((
                    "pytorch_model/data/X".into(),
                    d0.iter().map(|b| !b).collect(),
                ));
                write_zip(&bin, &ents);
                let mut b = std::fs::read(&bin).unwrap();
                let (from, to) = (b"pytorch_model/data/X", b"pytorch_model/data/0");
                let mut n = 0;
                while let Some(at) = b.windows(from.len()).position(|w| w == from) {
                    b[at..at + to.len()].copy_from_slice(to);
                    n += 1;
                }
                assert_eq!(n, 2, "local header and central directory");
                std::fs::write(&bin, b).unwrap();
                args([
                    "hf-to-gguf".into(),
                    os(&ck),
                    "--out-dir".into(),
                    os(&e.out),
                    "-q".into(),
                ])
            },
            env: &[],
            code: 1,
            needles: &["pytorch_model.bin", "entry name twice"],
            keep: &[],
        },
    ]
}
