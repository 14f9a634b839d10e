//! The probes verify runs the model on: images (or pixels) and prompts, paired, tokenized by the
//! source tokenizer and by the artefact's own vocabulary.
use super::VerifyOptions;
use crate::formats::checkpoint::tokenizer::{chat, SpmTokenizer};
use crate::ground::error::{Error, Result};
use crate::model::{self, hparams::ModelHParams};
use crate::runtime::weights::GgufWeights;
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};

pub const DEFAULT_QUESTION: &str = "Describe the image.";

pub(super) fn read_ids(path: &Path) -> Result<Vec<i64>> {
    let ids = crate::runtime::inputs::read_ids(path)?;
    if ids.is_empty() {
        return Err(Error::input(path, "the list of token ids is empty"));
    }
    Ok(ids)
}

/// The probes' pixel values: `--pixel-values`, each `--image`, or the synthetic probe.
pub(super) fn probe_pixels(
    opts: &VerifyOptions,
    hp: &ModelHParams,
) -> Result<Vec<(Vec<f32>, String)>> {
    let s = hp.clip.image_size;
    if let Some(p) = &opts.pixel_values {
        let v = crate::runtime::inputs::read_pixels(p, s)?;
        return Ok(vec![(v, p.display().to_string())]);
    }
    if opts.image.is_empty() {
        return Ok(vec![(
            crate::formats::image::synthetic_probe(s, hp.clip.image_mean, hp.clip.image_std),
            "synthetic probe".into(),
        )]);
    }
    opts.image
        .iter()
        .map(|p| {
            Ok((
                crate::formats::image::preprocess(p, s, hp.clip.image_mean, hp.clip.image_std)?,
                p.display().to_string(),
            ))
        })
        .collect()
}

/// Each probe prompt's token ids as the source tokenizer and as the artefact's own vocabulary
/// encode it (a runtime tokenizes with the GGUF's vocabulary). With `--input-ids`, both sides
/// take the ids. Returns (source ids, artefact ids or why they could not be made, description).
#[allow(clippy::type_complexity)]
pub(super) fn probe_ids(
    opts: &VerifyOptions,
    art: &GgufWeights,
) -> Result<Vec<(Vec<i64>, std::result::Result<Vec<i64>, String>, String)>> {
    if let Some(p) = &opts.input_ids {
        if !opts.prompt.is_empty() {
            return Err(Error::usage("give --prompt or --input-ids, not both"));
        }
        let ids = read_ids(p)?;
        return Ok(vec![(ids.clone(), Ok(ids), p.display().to_string())]);
    }
    let art_tok = art
        .vocab()
        .map_err(|e| e.to_string())
        .and_then(|v| SpmTokenizer::from_vocab(&v));
    let questions = if opts.prompt.is_empty() {
        vec![DEFAULT_QUESTION.to_string()]
    } else {
        opts.prompt.clone()
    };
    questions
        .into_iter()
        .map(|q| -> Result<_> {
            let text = if q.contains("<image>") {
                q
            } else {
                chat::llava_v1_prompt(
                    chat::LLAVA_V1_SYSTEM,
                    &[(&chat::first_user_message(&q), None)],
                )
            };
            let art_ids = match &art_tok {
                Ok(t) => Ok(t.encode_llava_prompt(&text)),
                Err(e) => Err(e.clone()),
            };
            Ok((
                crate::formats::checkpoint::tokenizer::encode_llava_prompt(
                    &opts.checkpoint,
                    &text,
                )?,
                art_ids,
                text,
            ))
        })
        .collect()
}

/// The first position where two id lists differ, named with both sides' pieces.
pub(super) fn ids_diff(
    src: &[i64],
    art: &[i64],
    art_vocab: Option<&crate::formats::checkpoint::tokenizer::GgufVocab>,
) -> Option<String> {
    let i = (0..src.len().max(art.len())).find(|&i| src.get(i) != art.get(i))?;
    let piece = |id: Option<&i64>| -> String {
        match id {
            None => "(end)".into(),
            Some(&id) => {
                let p = art_vocab
                    .and_then(|v| usize::try_from(id).ok().and_then(|u| v.tokens.get(u)))
                    .map(|s| format!(" {s:?}"))
                    .unwrap_or_default();
                format!("{id}{p}")
            }
        }
    };
    Some(format!(
        "the artefact's vocabulary tokenizes the probe differently: token {i} is {} from the checkpoint's tokenizer, {} from the artefact's ({} vs {} tokens)",
        piece(src.get(i)),
        piece(art.get(i)),
        src.len(),
        art.len()
    ))
}

/// One probe, ready to run.
pub(super) struct ProbeIn {
    pub(super) pv: Tensor,
    pub(super) ids: Vec<i64>,
    /// The ids the artefact's own vocabulary gives (the source's where it cannot tokenize).
    pub(super) art_ids: Vec<i64>,
    /// Why the artefact's ids differ from the source's, if they do.
    pub(super) art_ids_problem: Option<String>,
    pub(super) image: String,
    pub(super) prompt: String,
    pub(super) n_pos: usize,
    pub(super) has_image: bool,
}

/// The probes: images and prompts paired in order (one of either applies to all).
pub(super) fn probes(
    opts: &VerifyOptions,
    art: &GgufWeights,
    hp: &ModelHParams,
) -> Result<Vec<ProbeIn>> {
    let pixels = probe_pixels(opts, hp)?;
    let prompts = probe_ids(opts, art)?;
    if pixels.len() > 1 && prompts.len() > 1 && pixels.len() != prompts.len() {
        return Err(Error::usage(format!(
            "{} images and {} prompts: give them in pairs, or one of either for all",
            pixels.len(),
            prompts.len()
        )));
    }
    let art_vocab = art.vocab().ok();
    let ids_origin = || {
        opts.input_ids
            .clone()
            .unwrap_or_else(|| PathBuf::from("--prompt"))
    };
    let s = hp.clip.image_size;
    let mut out = vec![];
    for i in 0..pixels.len().max(prompts.len()) {
        let (px, image) = &pixels[i.min(pixels.len() - 1)];
        let (ids, art_ids, prompt) = &prompts[i.min(prompts.len() - 1)];
        if let Some(bad) = ids
            .iter()
            .find(|&&i| i >= hp.llama.n_vocab as i64 || (i < 0 && i != model::IMAGE_TOKEN))
        {
            return Err(Error::input(
                ids_origin(),
                format!(
                    "token id {bad}: ids must be in 0..{} (or -200 for the image)",
                    hp.llama.n_vocab
                ),
            ));
        }
        // Positions after the image marker expands: beyond the model's context the attention
        // alone would need n^2 floats (a 100k-token ids file asked for 160 GB).
        let n_pos = ids.len()
            + ids.iter().filter(|&&i| i == model::IMAGE_TOKEN).count()
                * hp.clip.n_patches().saturating_sub(1);
        if n_pos > hp.llama.n_ctx {
            return Err(Error::input(ids_origin(), format!(
                "the probe has {n_pos} positions, more than the model's context length {} (max_position_embeddings)",
                hp.llama.n_ctx
            )));
        }
        let (art_ids, problem) = match art_ids {
            Ok(a) => (a.clone(), ids_diff(ids, a, art_vocab.as_ref())),
            Err(e) => (
                ids.clone(),
                Some(format!(
                    "the artefact's vocabulary cannot tokenize the probe: {e}"
                )),
            ),
        };
        out.push(ProbeIn {
            pv: Tensor::from_vec(px.clone(), (3, s, s), &Device::Cpu)?,
            has_image: ids.contains(&model::IMAGE_TOKEN),
            ids: ids.clone(),
            art_ids,
            art_ids_problem: problem,
            image: image.clone(),
            prompt: prompt.clone(),
            n_pos,
        });
    }
    Ok(out)
}
