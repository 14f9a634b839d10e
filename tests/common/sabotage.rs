//! Broken artefacts for verify's fail tests (CPU in tests/verify.rs, CUDA in tests/cuda_gpu.rs):
//! each is a GGUF rewritten with one deliberate fault.
use mmfuser_convert::convert::recipe::permute_rows;
use mmfuser_convert::formats::gguf::{GgufFile, GgufWriter, Metadata, TensorInfo};
use mmfuser_convert::ground::dtype::GgmlType;
use std::path::{Path, PathBuf};

/// Rewrite a GGUF with `edit(name, bytes)` applied to tensor data (and optional renames).
pub fn sabotage(
    src: &Path,
    dst: &Path,
    rename: &dyn Fn(&str) -> String,
    edit: &dyn Fn(&str, &GgufFile, &mut Vec<u8>),
) {
    let g = GgufFile::open(src).unwrap();
    let infos: Vec<_> = g
        .tensors
        .iter()
        .map(|t| {
            let mut i = t.info.clone();
            i.name = rename(&i.name);
            i
        })
        .collect();
    let mut w = GgufWriter::create(dst, &g.metadata, infos.clone()).unwrap();
    for (t, i) in g.tensors.iter().zip(&infos) {
        let mut data = g.data(t).to_vec();
        edit(&t.info.name, &g, &mut data);
        w.write_tensor(&i.name, &data).unwrap();
    }
    w.finish().unwrap();
}

/// The four sabotaged (LLM, mmproj) pairs built from the fixture's artefacts (an F16 or quantized
/// LLM), written into `dir`:
/// Q/K left unpermuted, layers 0 and 1 swapped, the fuser's gamma2 zeroed, one tensor perturbed.
pub fn sabotaged_artefacts(
    dir: &Path,
    llm: &Path,
    mmproj: &Path,
) -> Vec<(&'static str, PathBuf, PathBuf)> {
    let same = |n: &str| n.to_string();
    let none = |_: &str, _: &GgufFile, _: &mut Vec<u8>| {};
    // Q/K left unpermuted: the permutation has a finite order on each head; applying it until the
    // data cycles back, the step before is its inverse (the HF layout).
    let unperm = dir.join("unperm.gguf");
    sabotage(llm, &unperm, &same, &|name, g, data| {
        let heads = if name.ends_with("attn_q.weight") {
            4
        } else if name.ends_with("attn_k.weight") {
            2
        } else {
            return;
        };
        let t = g.tensor(name).unwrap();
        // Rows are whole blocks in every type: permute them as opaque byte rows.
        let (cols, rows) = (t.info.ne[0], t.info.ne[1] as usize);
        let row_bytes = t.info.ty.bytes_for(cols).unwrap() as usize;
        let orig = data.clone();
        let mut cur = permute_rows(&orig, rows, row_bytes, heads, 1);
        let mut prev = orig.clone();
        while cur != orig {
            prev = cur.clone();
            cur = permute_rows(&cur, rows, row_bytes, heads, 1);
        }
        *data = prev;
    });
    let swapped = dir.join("swapped.gguf");
    sabotage(
        llm,
        &swapped,
        &|n: &str| {
            if let Some(r) = n.strip_prefix("blk.0.") {
                format!("blk.1.{r}")
            } else if let Some(r) = n.strip_prefix("blk.1.") {
                format!("blk.0.{r}")
            } else {
                n.to_string()
            }
        },
        &none,
    );
    let gamma = dir.join("mmproj-gamma.gguf");
    sabotage(mmproj, &gamma, &same, &|name, _, data| {
        if name == "mm.fuser.gamma2" {
            data.iter_mut().for_each(|b| *b = 0);
        }
    });
    // A few bytes of one matrix perturbed (for F16: one bit of 2000 values).
    let perturbed = dir.join("perturbed.gguf");
    sabotage(llm, &perturbed, &same, &|name, _, data| {
        if name == "blk.1.ffn_down.weight" {
            for i in (0..data.len()).step_by(2).take(2000) {
                data[i + 1] ^= 0x04;
            }
        }
    });
    vec![
        ("unpermuted Q/K", unperm, mmproj.to_path_buf()),
        ("swapped layers", swapped, mmproj.to_path_buf()),
        ("zeroed gamma2", llm.to_path_buf(), gamma),
        ("perturbed tensor", perturbed, mmproj.to_path_buf()),
    ]
}

/// Rewrite a GGUF with its metadata edited (tensor data unchanged).
pub fn with_metadata(src: &Path, dst: &Path, edit: &dyn Fn(&mut Metadata)) {
    rewrite(src, dst, edit, &|_, _, _| {}, None);
}

/// Rewrite a GGUF with metadata and tensor data edited, optionally appending one tensor.
pub fn rewrite(
    src: &Path,
    dst: &Path,
    edit_meta: &dyn Fn(&mut Metadata),
    edit: &dyn Fn(&str, &GgufFile, &mut Vec<u8>),
    extra: Option<(TensorInfo, Vec<u8>)>,
) {
    let g = GgufFile::open(src).unwrap();
    let mut meta = g.metadata.clone();
    edit_meta(&mut meta);
    let mut infos: Vec<TensorInfo> = g.tensors.iter().map(|t| t.info.clone()).collect();
    if let Some((i, _)) = &extra {
        infos.push(i.clone());
    }
    let mut w = GgufWriter::create(dst, &meta, infos).unwrap();
    for t in &g.tensors {
        let mut data = g.data(t).to_vec();
        edit(&t.info.name, &g, &mut data);
        w.write_tensor(&t.info.name, &data).unwrap();
    }
    if let Some((i, d)) = &extra {
        w.write_tensor(&i.name, d).unwrap();
    }
    w.finish().unwrap();
}

/// Multiply the f16 at `at` in `data` by `k`.
pub fn scale_f16(data: &mut [u8], at: usize, k: f32) {
    let v = half::f16::from_le_bytes([data[at], data[at + 1]]).to_f32() * k;
    data[at..at + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
}

/// Offset of the super-block scale `d` (an f16) inside one block of a quantized type: Q4_K and
/// Q8_0/Q4_0 begin with it, Q6_K ends with it (ggml's block layouts).
pub fn scale_offset(ty: GgmlType) -> usize {
    match ty {
        GgmlType::Q6K => ty.type_size() - 2,
        _ => 0,
    }
}
