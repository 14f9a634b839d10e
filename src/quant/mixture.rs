//! llama-quantize's per-tensor type choice (llama.cpp src/llama-quant.cpp, as vendored in
//! llama-cpp-python 0.3.36: `tensor_allows_quantization`, `tensor_get_category`,
//! `llama_tensor_get_type[_impl]`, `tensor_type_fallback`) and its tensor order
//! (src/llama-model-loader.h `weight_name_comparer`), for the file types this tool writes.
//!
//! The rules, as a table (no imatrix, default params, non-Falcon, no experts):
//!
//! | tensor (category)                        | Q8_0 | Q4_0 | Q4_K_S              | Q4_K_M                    | Q6_K |
//! |------------------------------------------|------|------|---------------------|---------------------------|------|
//! | default                                  | Q8_0 | Q4_0 | Q4_K                | Q4_K                      | Q6_K |
//! | output.weight (token_embd if tied) (1)   | Q8_0 | Q6_K | Q6_K                | Q6_K                      | Q6_K |
//! | attn_v / attn_qkv / attn_kv_b (2)        |  -   |  -   | Q5_K if i_v < 4     | Q6_K if more_bits(i_v, n_v) |  -   |
//! | ffn_down* (3)                            |  -   |  -   | Q5_K if i < n_layer/8 | Q6_K if more_bits(i, n_layer) | - |
//!
//! (1) Q8_0 instead when ne[0] is not a multiple of the *default* type's block.
//! (2) i_v counts attn_v-like tensors that are quantized, in processing order; n_v counts all
//!     attn_v-like tensors. A LLaMA-70B (80 layers, GQA) bumps Q4_K attn_v to Q5_K.
//! (3) i counts quantized ffn_down tensors in processing order.
//! `more_bits(i, n) = i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2`.
//!
//! Then, for quantized file types only, a type whose block does not divide ne[0] falls back:
//! Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0 (32-block types stay), and if that still does not
//! divide, F16. F16/BF16/F32 file types convert every eligible tensor to that type, whatever
//! its shape. Ineligible tensors (1-D, names not ending in "weight", `*_norm.weight`, a few
//! named small/positional tensors) keep their input type.
//!
//! Not modelled (never hit by LLaMA/LLaVA conversions): Falcon's rules, mixture-of-experts
//! (`n_expert == 8`) rules, imatrix-dependent rules, user overrides (--pure, --tensor-type,
//! --output-tensor-type, --token-embedding-type).

use super::GgmlType;
use crate::ground::dtype::FileType;
use std::cmp::Ordering;

/// One tensor as llama-quantize sees it: name, GGUF `ne` (ne[0] = row length), input type.
#[derive(Debug, Clone, Copy)]
pub struct TensorDesc<'a> {
    pub name: &'a str,
    pub ne: &'a [u64],
    pub ty: GgmlType,
}

/// The layer number `sscanf(name, "blk.%d.", &layer)` reads, or -1 (non-layer tensors).
/// `%d` skips leading white space and takes an optional sign; the trailing "." is not checked
/// once the number has been read.
fn layer_of(name: &str) -> i64 {
    let Some(rest) = name.strip_prefix("blk.") else {
        return -1;
    };
    let rest = rest.trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r']);
    let (neg, digits) = match rest.as_bytes().first() {
        Some(b'-') => (true, &rest[1..]),
        Some(b'+') => (false, &rest[1..]),
        _ => (false, rest),
    };
    let n = digits.bytes().take_while(u8::is_ascii_digit).count();
    if n == 0 {
        return -1;
    }
    let v = digits[..n]
        .parse::<i64>()
        .unwrap_or(i64::MAX)
        .min(i32::MAX as i64);
    if neg {
        -v
    } else {
        v
    }
}

/// llama.cpp's `weight_name_comparer`: tensors without a "blk.N." prefix first (layer -1), then
/// by layer number, then by name (byte order).
pub fn weight_name_cmp(a: &str, b: &str) -> Ordering {
    layer_of(a)
        .cmp(&layer_of(b))
        .then_with(|| a.as_bytes().cmp(b.as_bytes()))
}

/// Sorts `names` into the order llama-quantize writes tensors in (its `weights_map` order),
/// e.g. output.weight, output_norm.weight, token_embd.weight, blk.0.attn_k.weight, ...,
/// blk.2.*, ..., blk.10.*.
/// (Takes a slice, so `&mut Vec<String>` works too.)
pub fn llama_quantize_order(names: &mut [String]) {
    names.sort_by(|a, b| weight_name_cmp(a, b));
}

/// `tensor_get_category`, reduced to the categories whose rules we model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Category {
    Output,
    TokenEmbd,
    /// attn_qkv / attn_kv_b / attn_v (`category_is_attn_v`)
    AttnV,
    FfnDown,
    Other,
}

fn category(name: &str) -> Category {
    if name == "output.weight" {
        return Category::Output;
    }
    if name == "token_embd.weight" || name == "per_layer_token_embd.weight" {
        return Category::TokenEmbd;
    }
    if ["attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight"]
        .iter()
        .any(|p| name.contains(p))
    {
        return Category::AttnV;
    }
    // llama.cpp tests attn_k/q/output, then "ffn_up" and "ffn_gate" before "ffn_down".
    if [
        "attn_k.weight",
        "attn_q.weight",
        "attn_output.weight",
        "ffn_up",
        "ffn_gate",
    ]
    .iter()
    .any(|p| name.contains(p))
    {
        return Category::Other;
    }
    if name.contains("ffn_down") {
        return Category::FfnDown;
    }
    Category::Other
}

/// Name fragments `tensor_allows_quantization` refuses (small, positional or routing tensors).
const NEVER_QUANTIZED_PARTS: &[&str] = &[
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    "time_mix_first.weight",
    "time_mix_w0.weight",
    "time_mix_w1.weight",
    "time_mix_w2.weight",
    "time_mix_v0.weight",
    "time_mix_v1.weight",
    "time_mix_v2.weight",
    "time_mix_a0.weight",
    "time_mix_a1.weight",
    "time_mix_a2.weight",
    "time_mix_g1.weight",
    "time_mix_g2.weight",
    "time_mix_decay_w1.weight",
    "time_mix_decay_w2.weight",
    "time_mix_lerp_fused.weight",
    "attn_rel_b.weight",
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
];

/// `ggml_n_dims`: 1 + index of the last dimension > 1 (trailing 1s do not count).
fn n_dims(ne: &[u64]) -> usize {
    (1..ne.len())
        .rev()
        .find(|&i| ne[i] > 1)
        .map_or(1, |i| i + 1)
}

/// `tensor_allows_quantization` with default params.
pub fn allows_quantization(t: &TensorDesc) -> bool {
    n_dims(t.ne) >= 2
        && t.name.ends_with("weight")
        && !NEVER_QUANTIZED_PARTS.iter().any(|p| t.name.contains(p))
        && t.name != "position_embd.weight"
        && t.name != "token_types.weight"
}

/// `llama_ftype_get_default_type`.
fn default_type(ftype: FileType) -> GgmlType {
    match ftype {
        FileType::AllF32 => GgmlType::F32,
        FileType::MostlyF16 => GgmlType::F16,
        FileType::MostlyBF16 => GgmlType::BF16,
        FileType::MostlyQ8_0 => GgmlType::Q8_0,
        FileType::MostlyQ4_0 => GgmlType::Q4_0,
        FileType::MostlyQ4KS | FileType::MostlyQ4KM => GgmlType::Q4K,
        FileType::MostlyQ6K => GgmlType::Q6K,
    }
}

fn use_more_bits(i: i64, n: i64) -> bool {
    // C integer division / remainder truncate toward zero; Rust's `/` and `%` on i64 do too.
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// `tensor_type_fallback`: the type actually used when `target`'s block does not divide ne[0].
fn fallback(target: GgmlType, ne0: u64) -> (GgmlType, bool) {
    if ne0.is_multiple_of(target.block_size() as u64) {
        return (target, false);
    }
    let demoted = match target {
        GgmlType::Q4K => GgmlType::Q5_0,
        GgmlType::Q5K => GgmlType::Q5_1,
        GgmlType::Q6K => GgmlType::Q8_0,
        other => other, // 32-block types have nothing smaller to demote to
    };
    if !ne0.is_multiple_of(demoted.block_size() as u64) {
        (GgmlType::F16, true)
    } else {
        (demoted, true)
    }
}

/// Choose the output type of every tensor (result `i` belongs to `tensors[i]`) exactly as
/// llama-quantize does for `ftype`, with `n_layer` = the model's block count. The running
/// counters follow llama-quantize's processing order ([`weight_name_cmp`]), whatever the
/// order of `tensors`. The bool is true where the shape forced a fallback type.
pub fn choose_types(
    ftype: FileType,
    tensors: &[TensorDesc],
    n_layer: usize,
) -> Vec<(GgmlType, bool)> {
    let default = default_type(ftype);
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by(|&a, &b| weight_name_cmp(tensors[a].name, tensors[b].name));

    let n_attention_wv = tensors
        .iter()
        .filter(|t| category(t.name) == Category::AttnV)
        .count() as i64;
    let tied_embeddings = !tensors.iter().any(|t| t.name == "output.weight");
    let n_layer = n_layer as i64;
    // LLM_TYPE_70B (llama: 80 layers and n_head != n_head_kv), read off the q/k shapes.
    let ne1_of = |suffix: &str| {
        tensors
            .iter()
            .find(|t| t.name.ends_with(suffix))
            .and_then(|t| t.ne.get(1).copied())
    };
    let is_70b = n_layer == 80
        && matches!((ne1_of("attn_q.weight"), ne1_of("attn_k.weight")), (Some(q), Some(k)) if q != k);

    let mut i_attention_wv = 0i64;
    let mut i_ffn_down = 0i64;
    let mut out = vec![(GgmlType::F32, false); tensors.len()];
    for idx in order {
        let t = &tensors[idx];
        if !allows_quantization(t) {
            out[idx] = (t.ty, false);
            continue;
        }
        if !default.is_quantized() {
            out[idx] = (default, false);
            continue;
        }
        let ne0 = t.ne.first().copied().unwrap_or(1);
        let mut ty = default;
        match category(t.name) {
            Category::Output | Category::TokenEmbd
                if t.name == "output.weight" || tied_embeddings =>
            {
                if !ne0.is_multiple_of(default.block_size() as u64) {
                    ty = GgmlType::Q8_0;
                } else if default != GgmlType::Q8_0 {
                    ty = GgmlType::Q6K;
                }
            }
            Category::AttnV => {
                if ftype == FileType::MostlyQ4KM && use_more_bits(i_attention_wv, n_attention_wv) {
                    ty = GgmlType::Q6K;
                } else if ftype == FileType::MostlyQ4KS && i_attention_wv < 4 {
                    ty = GgmlType::Q5K;
                }
                if is_70b && ty == GgmlType::Q4K {
                    ty = GgmlType::Q5K;
                }
                i_attention_wv += 1;
            }
            Category::FfnDown => {
                if ftype == FileType::MostlyQ4KM && use_more_bits(i_ffn_down, n_layer) {
                    ty = GgmlType::Q6K;
                } else if ftype == FileType::MostlyQ4KS && i_ffn_down < n_layer / 8 {
                    ty = GgmlType::Q5K;
                }
                i_ffn_down += 1;
            }
            _ => {}
        }
        out[idx] = fallback(ty, ne0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc<'a>(name: &'a str, ne: &'a [u64]) -> TensorDesc<'a> {
        TensorDesc {
            name,
            ne,
            ty: GgmlType::F32,
        }
    }

    #[test]
    fn quant_mixture_order() {
        let mut names: Vec<String> = [
            "blk.10.attn_q.weight",
            "blk.2.ffn_down.weight",
            "token_embd.weight",
            "blk.2.attn_k.weight",
            "output.weight",
            "output_norm.weight",
            "blk.0.attn_v.weight",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        llama_quantize_order(&mut names);
        assert_eq!(
            names,
            [
                "output.weight",
                "output_norm.weight",
                "token_embd.weight",
                "blk.0.attn_v.weight",
                "blk.2.attn_k.weight",
                "blk.2.ffn_down.weight",
                "blk.10.attn_q.weight"
            ]
        );
        assert_eq!(layer_of("blk.7x"), 7);
        assert_eq!(layer_of("blk. 3.a"), 3);
        assert_eq!(layer_of("blk.-2.a"), -2);
        assert_eq!(layer_of("blk.a"), -1);
        assert_eq!(layer_of("v.blk.3.x"), -1);
    }

    #[test]
    fn quant_mixture_use_more_bits_sets() {
        let set = |n: i64| (0..n).filter(|&i| use_more_bits(i, n)).collect::<Vec<_>>();
        assert_eq!(
            set(32),
            [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
        assert_eq!(
            set(40),
            [0, 1, 2, 3, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31, 34, 35, 36, 37, 38, 39]
        );
    }

    #[test]
    fn quant_mixture_llama7b_counts() {
        // facts §11: a LLaMA-7B-shaped model, 32 layers, untied output.
        let mut names = vec![
            "token_embd.weight".to_string(),
            "output_norm.weight".into(),
            "output.weight".into(),
        ];
        for i in 0..32 {
            for t in [
                "attn_norm",
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "ffn_norm",
                "ffn_gate",
                "ffn_up",
                "ffn_down",
            ] {
                names.push(format!("blk.{i}.{t}.weight"));
            }
        }
        llama_quantize_order(&mut names);
        let shapes: Vec<Vec<u64>> = names
            .iter()
            .map(|n| {
                if n.contains("norm") {
                    vec![4096]
                } else if n.contains("ffn_down") {
                    vec![11008, 4096]
                } else if n.contains("ffn_") {
                    vec![4096, 11008]
                } else if n.contains("token_embd") || n == "output.weight" {
                    vec![4096, 32000]
                } else {
                    vec![4096, 4096]
                }
            })
            .collect();
        let descs: Vec<TensorDesc> = names.iter().zip(&shapes).map(|(n, s)| desc(n, s)).collect();
        let count = |v: &[(GgmlType, bool)], ty: GgmlType| v.iter().filter(|r| r.0 == ty).count();
        let m = choose_types(FileType::MostlyQ4KM, &descs, 32);
        assert_eq!(
            (
                count(&m, GgmlType::Q4K),
                count(&m, GgmlType::Q6K),
                count(&m, GgmlType::F32)
            ),
            (193, 33, 65)
        );
        let q40 = choose_types(FileType::MostlyQ4_0, &descs, 32);
        assert_eq!(
            (count(&q40, GgmlType::Q4_0), count(&q40, GgmlType::Q6K)),
            (225, 1)
        );
        let q8 = choose_types(FileType::MostlyQ8_0, &descs, 32);
        assert_eq!(count(&q8, GgmlType::Q8_0), 226);
        let s = choose_types(FileType::MostlyQ4KS, &descs, 32);
        assert_eq!((count(&s, GgmlType::Q5K), count(&s, GgmlType::Q6K)), (8, 1));
        assert!(m.iter().all(|r| !r.1));
    }

    #[test]
    fn quant_mixture_fallbacks() {
        let f = |ty, ne0| fallback(ty, ne0);
        assert_eq!(f(GgmlType::Q4K, 352), (GgmlType::Q5_0, true));
        assert_eq!(f(GgmlType::Q5K, 352), (GgmlType::Q5_1, true));
        assert_eq!(f(GgmlType::Q6K, 352), (GgmlType::Q8_0, true));
        assert_eq!(f(GgmlType::Q6K, 172), (GgmlType::F16, true));
        assert_eq!(f(GgmlType::Q8_0, 172), (GgmlType::F16, true));
        assert_eq!(f(GgmlType::Q4K, 512), (GgmlType::Q4K, false));
        // ineligible and F16-file tensors
        let ne1 = [256u64];
        let ne2 = [172u64, 8];
        let t = [
            TensorDesc {
                name: "blk.0.attn_norm.weight",
                ne: &ne1,
                ty: GgmlType::F16,
            },
            desc("blk.0.ffn_down.weight", &ne2),
        ];
        assert_eq!(
            choose_types(FileType::MostlyQ4KM, &t, 1),
            [(GgmlType::F16, false), (GgmlType::F16, true)]
        );
        assert_eq!(
            choose_types(FileType::MostlyF16, &t, 1),
            [(GgmlType::F16, false), (GgmlType::F16, false)]
        );
    }
}
