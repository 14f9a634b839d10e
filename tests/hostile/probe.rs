//! verify's probe inputs: --pixel-values (.npy), --image, --input-ids.
use super::*;

fn npy(header: &str, data: &[u8]) -> Vec<u8> {
    let mut h = header.to_string();
    while !(10 + h.len() + 1).is_multiple_of(64) {
        h.push(' ');
    }
    h.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend((h.len() as u16).to_le_bytes());
    b.extend(h.as_bytes());
    b.extend(data);
    b
}

fn png_chunk(t: &[u8], d: &[u8]) -> Vec<u8> {
    // CRC-32 (IEEE), as PNG wants.
    let crc = |b: &[u8]| {
        let mut c = 0xffff_ffffu32;
        for &x in b {
            c ^= x as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    };
    let mut v = (d.len() as u32).to_be_bytes().to_vec();
    v.extend(t);
    v.extend(d);
    v.extend(crc(&[t, d].concat()).to_be_bytes());
    v
}

/// A zlib stream of stored (uncompressed) deflate blocks.
fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let mut z = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = if data.is_empty() {
        vec![&[]]
    } else {
        data.chunks(65535).collect()
    };
    for (i, b) in blocks.iter().enumerate() {
        z.push((i + 1 == blocks.len()) as u8);
        z.extend((b.len() as u16).to_le_bytes());
        z.extend((!(b.len() as u16)).to_le_bytes());
        z.extend(*b);
    }
    let (mut a, mut s) = (1u32, 0u32);
    for &x in data {
        a = (a + x as u32) % 65521;
        s = (s + a) % 65521;
    }
    z.extend(((s << 16) | a).to_be_bytes());
    z
}

/// An 8-bit grey PNG of `w` x `h` pixels, all mid-grey (`rows` = false: IHDR without pixel data).
pub(super) fn grey_png(w: u32, h: u32, rows: bool) -> Vec<u8> {
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 0, 0, 0, 0]);
    let raw: Vec<u8> = if rows {
        (0..h)
            .flat_map(|_| std::iter::once(0u8).chain(std::iter::repeat_n(128u8, w as usize)))
            .collect()
    } else {
        vec![]
    };
    [
        b"\x89PNG\r\n\x1a\n".to_vec(),
        png_chunk(b"IHDR", &ihdr),
        png_chunk(b"IDAT", &zlib_stored(&raw)),
        png_chunk(b"IEND", &[]),
    ]
    .concat()
}

/// Directory numbers for the probe inputs (see `verify_probe_inputs`).
static NEXT_DIR: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

#[test]
fn verify_probe_inputs() {
    let (g, m) = good_artefacts();
    let px = "[3, 56, 56]";
    let f4 = |n: usize| vec![0u8; n * 4];
    let good_header = "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 56, 56), }";
    let small_png = std::fs::read(fixture("image_refs/small.png")).unwrap();
    let mut ihdr = 65535u32.to_be_bytes().to_vec();
    ihdr.extend(65535u32.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    let huge_png = [
        &b"\x89PNG\r\n\x1a\n"[..],
        &png_chunk(b"IHDR", &ihdr),
        &png_chunk(b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]),
        &png_chunk(b"IEND", b""),
    ]
    .concat();
    let long_ids = serde_json::to_vec(
        &std::iter::once(1)
            .chain(std::iter::repeat_n(5, 100_000))
            .collect::<Vec<i64>>(),
    )
    .unwrap();
    // verify with `flag` naming `bytes` written as `name`; the error names the file (but for
    // two images, which is about the ids) and `needles`; nothing but the input is left.
    let probe =
        |case: &str, flag: &'static str, name: &'static str, bytes: Vec<u8>, needles: &[&str]| {
            let (g, m) = (g.clone(), m.clone());
            let mut n = needles.to_vec();
            if !case.starts_with("ids: two") {
                n.push(name);
            }
            // Each input lies in a directory of its own with a neutral name: the path is in the
            // error, and a name made from the case could meet a needle the message lacks.
            let sub = format!(
                "probe-{}",
                NEXT_DIR.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            );
            CmdCase::new(
                case,
                move |dir| {
                    let dir = dir.join(&sub);
                    std::fs::create_dir(&dir).unwrap();
                    let f = dir.join(name);
                    std::fs::write(&f, &bytes).unwrap();
                    let mut a = args([
                        "verify".into(),
                        common::ckpt().into_os_string(),
                        "--vision-tower".into(),
                        common::tower().into_os_string(),
                    ]);
                    a.extend(args([
                        OsString::from("--gguf"),
                        g.clone().into(),
                        "--mmproj".into(),
                        m.clone().into(),
                        "--device".into(),
                        "cpu".into(),
                    ]));
                    a.extend(args([OsString::from(flag), f.clone().into()]));
                    (a, dir)
                },
                1,
                &[name],
                &n,
            )
        };
    let list = vec![
        probe(
            "npy: bad magic",
            "--pixel-values",
            "px.npy",
            b"NUMPY\x01\x00".repeat(4),
            &["magic"],
        ),
        probe(
            "npy: header cut",
            "--pixel-values",
            "px.npy",
            npy(good_header, &[])[..30].to_vec(),
            &["header"],
        ),
        probe(
            "npy: version 9",
            "--pixel-values",
            "px.npy",
            [
                &b"\x93NUMPY\x09\x00"[..],
                &npy(good_header, &f4(3 * 56 * 56))[8..],
            ]
            .concat(),
            &["version 9"],
        ),
        probe(
            "npy: dtype '<'",
            "--pixel-values",
            "px.npy",
            npy(
                "{'descr': '<', 'fortran_order': False, 'shape': (3, 56, 56), }",
                &f4(9408),
            ),
            &["dtype"],
        ),
        probe(
            "npy: dtype non-ASCII",
            "--pixel-values",
            "px.npy",
            npy(
                "{'descr': '<\u{e9}', 'fortran_order': False, 'shape': (3, 56, 56), }",
                &f4(9408),
            ),
            &["dtype"],
        ),
        probe(
            "npy: shape whose product overflows",
            "--pixel-values",
            "px.npy",
            npy(
                "{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904, 4, 3), }",
                &[],
            ),
            &["overflows"],
        ),
        probe(
            "npy: data short",
            "--pixel-values",
            "px.npy",
            npy(good_header, &f4(100)),
            &["data bytes"],
        ),
        probe(
            "npy: wrong shape",
            "--pixel-values",
            "px.npy",
            npy(
                "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 10, 10), }",
                &f4(300),
            ),
            &[px],
        ),
        probe(
            "npy: Fortran order",
            "--pixel-values",
            "px.npy",
            npy(
                "{'descr': '<f4', 'fortran_order': True, 'shape': (3, 56, 56), }",
                &f4(9408),
            ),
            &["Fortran"],
        ),
        probe(
            "image: text",
            "--image",
            "img.png",
            b"not an image at all".to_vec(),
            &["PNG or JPEG"],
        ),
        probe(
            "image: PNG cut in half",
            "--image",
            "img.png",
            small_png[..small_png.len() / 2].to_vec(),
            &["cannot decode"],
        ),
        probe(
            "image: PNG claiming 65535x65535",
            "--image",
            "img.png",
            huge_png,
            &["65535x65535"],
        ),
        probe(
            "image: BMP",
            "--image",
            "img.bmp",
            b"BM\x3a\0\0\0\0\0\0\0\x36\0\0\0\x28\0\0\0".to_vec(),
            &["not supported"],
        ),
        probe(
            "ids: not JSON",
            "--input-ids",
            "ids.json",
            b"[1, 2,".to_vec(),
            &["JSON list"],
        ),
        probe(
            "ids: out of the vocabulary",
            "--input-ids",
            "ids.json",
            b"[1, 1000000000]".to_vec(),
            &["token id 1000000000"],
        ),
        probe(
            "ids: 100k positions",
            "--input-ids",
            "ids.json",
            long_ids,
            &["context length"],
        ),
        probe(
            "ids: two images",
            "--input-ids",
            "ids.json",
            b"[1, -200, 5, -200]".to_vec(),
            &["<image>"],
        ),
    ];
    run_cmds("verify probe inputs", list);
}

#[test]
fn issue16_cases() {
    run_rows("issue 16, probe inputs", issue16_rows());
}

fn issue16_rows() -> Vec<Row> {
    vec![
        // 1. Images: decode limits, and padding that never builds the square.
        Row {
            case: "png 100000 x 1 (would pad to 30 GB) / verify --image",
            cmd: |e| {
                let p = put(e, "wide.png", &grey_png(100_000, 1, true));
                verify16(e, args(["--image".into(), os(&p)]))
            },
            env: &[],
            code: 1,
            needles: &["wide.png", "100000x1", "32768"],
            keep: &[],
        },
        Row {
            case: "png 20000 x 20000 grey (header only) / verify --image",
            cmd: |e| {
                let p = put(e, "huge.png", &grey_png(20_000, 20_000, false));
                verify16(e, args(["--image".into(), os(&p)]))
            },
            env: &[],
            code: 1,
            needles: &["huge.png", "20000x20000", "pixels"],
            keep: &[],
        },
        Row {
            case: "png 30000 x 1 verifies within the memory cap (padding not built)",
            cmd: |e| {
                let p = put(e, "strip.png", &grey_png(30_000, 1, true));
                verify16(e, args(["--image".into(), os(&p)]))
            },
            env: &[],
            code: 0,
            needles: &[],
            keep: &[],
        },
        // 12. Messages.
        Row {
            case: "big-endian --pixel-values names the file / verify",
            cmd: |e| {
                let data = vec![0u8; 3 * 56 * 56 * 4];
                let b = npy(
                    "{'descr': '>f4', 'fortran_order': False, 'shape': (3, 56, 56), }",
                    &data,
                );
                let p = put(e, "be.npy", &b);
                verify16(e, args(["--pixel-values".into(), os(&p)]))
            },
            env: &[],
            code: 1,
            needles: &["be.npy", "big-endian"],
            keep: &[],
        },
        Row {
            case: "--input-ids [] names the ids file / verify",
            cmd: |e| {
                let p = put(e, "ids.json", b"[]");
                verify16(e, args(["--input-ids".into(), os(&p)]))
            },
            env: &[],
            code: 1,
            needles: &["ids.json", "empty"],
            keep: &[],
        },
    ]
}
