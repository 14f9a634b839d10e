//! `general.basename` and `general.size_label` as llama.cpp's convert_hf_to_gguf.py sets them
//! (gguf-py 0.19.0, `Metadata.load` then `size_label`): the model id (config.json's
//! `_name_or_path` when it has at most one '/', else the checkpoint directory's name) is split at
//! '-' and each part classified (version, quantization type, size, finetune word); the leading
//! name-like parts form the basename. A size label found in the id wins; otherwise the parameter
//! count gives one ("6.7B", "1.3M"). Not read: a model card (README.md front matter), which the
//! converter consults first. Checked against gguf-py itself in tests/layouts.rs.

/// What a model id says about the model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdParts {
    pub basename: Option<String>,
    pub size_label: Option<String>,
    pub finetune: Option<String>,
    pub version: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Basename,
    SizeLabel,
    Finetune,
    Version,
    Type,
}

/// `(v|iter)?\d+(\.\d+)*`, case-insensitive.
fn is_version(p: &str) -> bool {
    let l = p.to_ascii_lowercase();
    let rest = l
        .strip_prefix("iter")
        .or_else(|| l.strip_prefix('v'))
        .unwrap_or(&l);
    !rest.is_empty()
        && rest
            .split('.')
            .all(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

/// A quantization type name: `i?q\d(_\w)*` or `b?fp?(16|32)`, case-insensitive.
fn is_type(p: &str) -> bool {
    let l = p.to_ascii_lowercase();
    let q = l.strip_prefix('i').unwrap_or(&l);
    if let Some(r) = q.strip_prefix('q') {
        let mut c = r.chars();
        if c.next().is_some_and(|d| d.is_ascii_digit()) {
            // then zero or more "_" + one word character
            let tail: Vec<char> = c.collect();
            return tail.len().is_multiple_of(2)
                && tail
                    .chunks(2)
                    .all(|w| w[0] == '_' && (w[1].is_alphanumeric() || w[1] == '_'));
        }
    }
    let f = l.strip_prefix('b').unwrap_or(&l);
    let f = f.strip_prefix('f').unwrap_or("x");
    let f = f.strip_prefix('p').unwrap_or(f);
    f == "16" || f == "32"
}

/// A size: `(([A]|\d+[x])?\d+([._]\d+)?[KMBT][\d]?` or a size word, case-insensitive.
fn is_size(p: &str) -> bool {
    let l = p.to_ascii_lowercase();
    if matches!(
        l.as_str(),
        "small" | "mini" | "medium" | "large" | "xl" | "xxl"
    ) {
        return true;
    }
    let b = l.as_bytes();
    let digits = |s: &[u8]| s.iter().take_while(|c| c.is_ascii_digit()).count();
    let mut i = 0;
    if b.first() == Some(&b'a') {
        i = 1;
    } else {
        let n = digits(b);
        if n > 0 && b.get(n) == Some(&b'x') {
            i = n + 1;
        }
    }
    // \d+([._]\d+)?[kmbt][\d]?
    let n = digits(&b[i..]);
    if n == 0 {
        // the optional prefix may have been the start of the number itself
        return false;
    }
    i += n;
    if matches!(b.get(i), Some(b'.') | Some(b'_')) {
        let m = digits(&b[i + 1..]);
        if m > 0 {
            i += 1 + m;
        }
    }
    if !matches!(b.get(i), Some(b'k' | b'm' | b'b' | b't')) {
        return false;
    }
    i += 1;
    if b.get(i).is_some_and(|c| c.is_ascii_digit()) {
        i += 1;
    }
    i == b.len()
}

/// A size part as the converter rewrites it: '_' -> '.', "7b1" -> "7.1b", suffix upper-case.
fn normalize_size(p: &str) -> String {
    let mut s: Vec<char> = p.replace('_', ".").chars().collect();
    let n = s.len();
    if n >= 2 && s[n - 1].is_ascii_digit() {
        let (a, b) = (s[n - 2], s[n - 1]);
        s.truncate(n - 2);
        s.extend(['.', b, a]);
    }
    let n = s.len();
    if n > 1 && s[n - 2].is_ascii_digit() && "kmbt".contains(s[n - 1]) {
        s[n - 1] = s[n - 1].to_ascii_uppercase();
    }
    s.into_iter().collect()
}

/// The parameter count a size part names, when it is a plain number with a suffix.
fn label_params(p: &str) -> Option<f64> {
    let (num, suf) = p.split_at(p.len().checked_sub(1)?);
    let v: f64 = num.parse().ok()?;
    let scale = match suf {
        "K" => 1e3,
        "M" => 1e6,
        "B" => 1e9,
        "T" => 1e12,
        " " => 1.0,
        _ => 1e-3, // the converter's " KMBT".find() is -1 for anything else: 1000^-1
    };
    Some(v * scale)
}

/// The parts of a Hugging Face style model id (`org/name-7b-chat-v1.5`).
pub fn model_id_parts(model_id: &str, total_params: i64) -> IdParts {
    if model_id.contains(' ') {
        return IdParts::default();
    }
    let name = model_id.split_once('/').map_or(model_id, |(_, n)| n);
    let mut parts: Vec<String> = name
        .split('-')
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    let mut kinds: Vec<Vec<Kind>> = vec![vec![]; parts.len()];
    for i in 0..parts.len() {
        let p = parts[i].clone();
        if is_version(&p) {
            kinds[i].push(Kind::Version);
        } else if is_type(&p) {
            kinds[i].push(Kind::Type);
            parts[i] = p.to_uppercase();
        } else if i > 0 && is_size(&p) {
            let mut s = normalize_size(&p);
            if total_params != 0 {
                if let Some(lp) = label_params(&s) {
                    let t = total_params as f64;
                    let off = if total_params > 0 {
                        (lp - t).abs() > (7 * total_params / 8) as f64
                    } else {
                        lp < (total_params.abs() / 8) as f64
                    };
                    if off {
                        // likely a context length: a finetune, lower-case suffix
                        kinds[i].push(Kind::Finetune);
                        let last = s.pop().map(|c| c.to_ascii_lowercase());
                        s.extend(last);
                    }
                }
            }
            if kinds[i].is_empty() {
                kinds[i].push(Kind::SizeLabel);
            }
            parts[i] = s;
        } else if i > 0
            && matches!(
                p.to_ascii_lowercase().as_str(),
                "chat" | "instruct" | "vision" | "lora"
            )
        {
            kinds[i].push(Kind::Finetune);
        }
    }
    // word sizes ("large") give way to a numeric one
    let numeric = parts
        .iter()
        .zip(&kinds)
        .any(|(p, k)| k.contains(&Kind::SizeLabel) && p.chars().any(|c| c.is_ascii_digit()));
    if numeric {
        for (p, k) in parts.iter().zip(kinds.iter_mut()) {
            if k.contains(&Kind::SizeLabel) && p.chars().all(char::is_alphabetic) {
                k.retain(|x| *x != Kind::SizeLabel);
            }
        }
    }
    let mut at_start = true;
    for (p, k) in parts.iter().zip(kinds.iter_mut()) {
        let name_like = k.is_empty() && p.chars().next().is_some_and(char::is_alphabetic);
        if at_start && (name_like || k.contains(&Kind::Version)) {
            k.push(Kind::Basename);
        } else {
            at_start = false;
            if k.is_empty() {
                k.push(Kind::Finetune);
            }
        }
    }
    // a trailing version is not part of the basename
    for k in kinds.iter_mut().rev() {
        if k.contains(&Kind::Basename) && k.len() > 1 {
            k.retain(|x| *x != Kind::Basename);
        } else {
            break;
        }
    }
    let join = |want: Kind, skip: Option<Kind>, dedup: bool| -> Option<String> {
        let mut v: Vec<&str> = vec![];
        for (p, k) in parts.iter().zip(&kinds) {
            if k.contains(&want)
                && skip.is_none_or(|s| !k.contains(&s))
                && !(dedup && v.contains(&p.as_str()))
            {
                v.push(p);
            }
        }
        (!v.is_empty()).then(|| v.join("-"))
    };
    let mut out = IdParts {
        basename: join(Kind::Basename, None, false),
        size_label: join(Kind::SizeLabel, None, true),
        finetune: join(Kind::Finetune, None, false),
        version: join(Kind::Version, Some(Kind::Basename), false),
    };
    if out.size_label.is_none() && out.finetune.is_none() && out.version.is_none() {
        out.basename = None; // too ambiguous
    }
    out
}

/// A parameter count as a size label: "6.7B", "13B", "1.3M", two significant digits at least.
pub fn size_label(total_params: u64) -> String {
    let n = total_params as f64;
    let (scaled, suffix) = if n > 1e12 {
        (n * 1e-12, "T")
    } else if n > 1e9 {
        (n * 1e-9, "B")
    } else if n > 1e6 {
        (n * 1e-6, "M")
    } else {
        (n * 1e-3, "K")
    };
    let int_digits = format!("{}", scaled.round_ties_even() as u64)
        .trim_start_matches('0')
        .len();
    let fix = 2usize.saturating_sub(int_digits);
    format!("{scaled:.fix$}{suffix}")
}

/// (basename, size_label) for a model: the id parts of `name_or_path` (config.json's
/// `_name_or_path`, used when it has at most one '/'), then of the directory name, each filling
/// what is still missing; the size label falls back to the parameter count.
pub fn basename_and_size(
    name_or_path: Option<&str>,
    dir_name: &str,
    total_params: u64,
) -> (Option<String>, Option<String>) {
    let t = i64::try_from(total_params).unwrap_or(i64::MAX);
    let mut basename = None;
    let mut size = None;
    let ids = name_or_path
        .filter(|n| n.matches('/').count() <= 1)
        .into_iter()
        .chain(std::iter::once(dir_name));
    for id in ids {
        let p = model_id_parts(id, t);
        basename = basename.or(p.basename);
        size = size.or(p.size_label);
    }
    if size.is_none() && total_params > 0 {
        size = Some(size_label(total_params));
    }
    (basename, size)
}
