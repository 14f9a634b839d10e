//! generate: run the converted model (image + prompt -> text) from the GGUF artefacts, or from the
//! source checkpoint for comparison, on the CPU or CUDA backend.
//!
//! The image is encoded once (CLIP -> fuser -> MLP); the prompt is built with the llava_v1
//! template and prefilled into a KV cache (`model::llama::KvCache`); then one position per
//! generated token. Tokens stream out as text through a SentencePiece detokenizer.
use crate::convert::source::Source;
use crate::cpu::CpuBackend;
use crate::formats::checkpoint::tokenizer::chat::{
    first_user_message, llava_v1_prompt, next_turn, LLAVA_V1_SYSTEM,
};
use crate::formats::checkpoint::tokenizer::{Detokenizer, SpmTokenizer};
use crate::ground::error::{Error, Result};
use crate::ground::progress::Progress;
use crate::model::hparams::ModelHParams;
use crate::model::llama::{decode_cached, KvCache};
use crate::model::{self, Backend, KvType, WeightSource};
use crate::runtime::device::Device as RunDevice;
use crate::runtime::weights::GgufWeights;
use candle_core::{Device, Tensor};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const REPORT_SCHEMA: &str = "mmfuser-convert/generate/v1";

// ---------------------------------------------------------------------------------- sampling

/// How the next token is chosen. `temperature` 0 is greedy (argmax).
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct SamplingOptions {
    pub temperature: f32,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p (1: all).
    pub top_p: f32,
    pub seed: u64,
}

impl SamplingOptions {
    pub fn greedy() -> Self {
        SamplingOptions {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }

    pub fn check(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::usage(format!(
                "--temp {} must be a finite number >= 0",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::usage(format!(
                "--top-p {} must be in (0, 1]",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// The index of the largest logit (the first on a tie; NaN never wins).
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best
}

/// The tokens sampling may pick and their probabilities, most likely first, in the order
/// transformers' generate applies its warpers: logits / temperature, top-k, softmax, top-p
/// (the most likely tokens until their probability reaches p, the one that crosses it included).
pub fn candidates(logits: &[f32], o: &SamplingOptions) -> Vec<(u32, f64)> {
    let t = f64::from(o.temperature.max(f32::MIN_POSITIVE));
    let mut c: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .filter(|(_, v)| !v.is_nan())
        .map(|(i, &v)| (i as u32, f64::from(v) / t))
        .collect();
    c.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if o.top_k > 0 {
        c.truncate(o.top_k);
    }
    let Some(&(_, max)) = c.first() else {
        return c;
    };
    let mut sum = 0.0;
    for e in c.iter_mut() {
        e.1 = (e.1 - max).exp();
        sum += e.1;
    }
    let (mut cum, n) = (0.0, c.len());
    let mut keep = n;
    for (i, e) in c.iter_mut().enumerate() {
        e.1 /= sum;
        cum += e.1;
        if cum >= f64::from(o.top_p) && keep == n {
            keep = i + 1;
        }
    }
    c.truncate(keep);
    let kept: f64 = c.iter().map(|e| e.1).sum();
    c.iter_mut().for_each(|e| e.1 /= kept);
    c
}

/// Picks tokens with a seeded generator (splitmix64), so a seed gives the same text every run.
pub struct Sampler {
    pub opts: SamplingOptions,
    state: u64,
}

impl Sampler {
    pub fn new(opts: SamplingOptions) -> Self {
        Sampler {
            opts,
            state: opts.seed,
        }
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.opts.temperature == 0.0 {
            return argmax(logits) as u32;
        }
        let c = candidates(logits, &self.opts);
        let r = self.next_f64();
        let mut cum = 0.0;
        for &(id, p) in &c {
            cum += p;
            if r < cum {
                return id;
            }
        }
        c.last().map_or(argmax(logits) as u32, |e| e.0)
    }
}

// ---------------------------------------------------------------------------------- the model

/// The SentencePiece vocabulary of an LLM GGUF (`tokenizer.ggml.*`), for encoding and decoding
/// (one reader, shared with verify's artefact side).
pub use crate::runtime::weights::vocab_from_gguf;

/// Where the weights come from: the GGUF artefacts, or the source checkpoint itself.
pub enum Weights {
    Gguf(Box<GgufWeights>),
    Checkpoint(Box<Source>),
}

/// A model ready to run: weights, hyper-parameters, tokenizer.
pub struct LoadedModel {
    pub weights: Weights,
    pub hparams: ModelHParams,
    pub tokenizer: SpmTokenizer,
}

impl LoadedModel {
    pub fn from_gguf(llm: &Path, mmproj: &Path) -> Result<Self> {
        let mut w = GgufWeights::open(llm, mmproj)?;
        w.keep_resident = true;
        w.llm.read_ahead();
        w.mmproj.read_ahead();
        let mut hparams = w.hparams()?;
        hparams.clip.n_layer = hparams.clip.blocks_needed();
        let vocab = vocab_from_gguf(&w.llm)?;
        let tokenizer = SpmTokenizer::from_vocab(&vocab).map_err(|e| Error::input(llm, e))?;
        Ok(LoadedModel {
            weights: Weights::Gguf(Box::new(w)),
            hparams,
            tokenizer,
        })
    }

    pub fn from_checkpoint(dir: &Path, vision_tower: Option<&Path>) -> Result<Self> {
        let src = Source::open(dir, vision_tower)?;
        let mut hparams = src.hparams.clone();
        hparams.clip.n_layer = hparams.clip.blocks_needed();
        let tokenizer = SpmTokenizer::from_file(&dir.join("tokenizer.model"))?;
        Ok(LoadedModel {
            weights: Weights::Checkpoint(Box::new(src)),
            hparams,
            tokenizer,
        })
    }

    pub fn ws(&self) -> &dyn WeightSource {
        match &self.weights {
            Weights::Gguf(w) => w.as_ref(),
            Weights::Checkpoint(s) => s.as_ref(),
        }
    }

    pub fn eos(&self) -> Option<u32> {
        self.tokenizer.eos_id()
    }
}

/// One conversation with the model on one backend: the KV cache of everything fed so far.
pub struct Session<'a, B: Backend> {
    b: &'a B,
    ws: &'a dyn WeightSource,
    hp: &'a ModelHParams,
    cache: KvCache<B::T>,
    /// Sampled but not yet fed (the last token of a finished answer).
    pending: Vec<i64>,
}

impl<'a, B: Backend> Session<'a, B> {
    /// A session whose KV cache stores f32 (see [`Session::with_kv`]).
    pub fn new(b: &'a B, ws: &'a dyn WeightSource, hp: &'a ModelHParams) -> Self {
        Self::with_kv(b, ws, hp, KvType::F32)
    }

    /// A session whose KV cache stores keys and values as `kv`.
    pub fn with_kv(b: &'a B, ws: &'a dyn WeightSource, hp: &'a ModelHParams, kv: KvType) -> Self {
        Session {
            b,
            ws,
            hp,
            cache: KvCache::new(hp.llama.n_layer, kv),
            pending: Vec::new(),
        }
    }

    /// Positions in the cache.
    pub fn positions(&self) -> usize {
        self.cache.len()
    }

    /// Whether `n` more text ids (after the pending token) fit in the model's context.
    pub fn fits(&self, n: usize) -> bool {
        self.positions() + self.pending.len() + n <= self.hp.llama.n_ctx
    }

    /// The image embeddings [N, H] of CLIP-normalized pixels [3, S, S].
    pub fn encode_image(&self, pixels: &Tensor) -> Result<Tensor> {
        Ok(model::encode_image_with(self.b, self.ws, self.hp, pixels)?.image_embeds)
    }

    /// Feed `ids` (-200 = the image embeddings) after what the cache holds; logits of the new
    /// positions [n, vocab], or of the last one [1, vocab].
    pub fn feed(&mut self, ids: &[i64], image: Option<&Tensor>, last_only: bool) -> Result<Tensor> {
        let embeds = model::build_inputs(self.ws, ids, image)?;
        let lg = decode_cached(
            self.b,
            self.ws,
            &self.hp.llama,
            &embeds,
            &mut self.cache,
            last_only,
        )?;
        self.b.download(&lg)
    }
}

/// Why a turn stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stop {
    Eos,
    MaxTokens,
    Context,
}

impl std::fmt::Display for Stop {
    /// The JSON report's spelling, so the human line and `--json` say the same words.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stop::Eos => "eos",
            Stop::MaxTokens => "max_tokens",
            Stop::Context => "context",
        })
    }
}

/// One answer.
#[derive(Debug, Clone)]
pub struct TurnOutput {
    /// The sampled ids, EOS included when it ended the answer.
    pub tokens: Vec<u32>,
    pub text: String,
    pub stop: Stop,
    /// Positions prefilled (pending token + prompt ids, the image as its N positions).
    pub prefill_positions: usize,
    pub prefill_seconds: f64,
    /// One-position forward passes after the prefill.
    pub decode_steps: usize,
    pub decode_seconds: f64,
    /// With `keep_logits`: the logits each token was sampled from.
    pub step_logits: Vec<Vec<f32>>,
}

/// Options of one turn besides its prompt.
pub struct TurnOptions<'t> {
    pub max_tokens: usize,
    pub eos: Option<u32>,
    pub keep_logits: bool,
    pub tokenizer: &'t SpmTokenizer,
}

/// Prefill `ids` (after any pending token of the previous answer), then sample up to
/// `max_tokens` tokens one position at a time; `emit` gets the text as it completes.
pub fn run_turn<B: Backend>(
    sess: &mut Session<'_, B>,
    ids: &[i64],
    image: Option<&Tensor>,
    sampler: &mut Sampler,
    o: &TurnOptions<'_>,
    emit: &mut dyn FnMut(&str) -> Result<()>,
) -> Result<TurnOutput> {
    let mut feed: Vec<i64> = std::mem::take(&mut sess.pending);
    feed.extend_from_slice(ids);
    let n_image = if feed.contains(&model::IMAGE_TOKEN) {
        sess.hp.clip.n_patches()
    } else {
        0
    };
    let prefill_positions = feed.len() + n_image - usize::from(n_image > 0);
    let n_ctx = sess.hp.llama.n_ctx;
    if sess.positions() + prefill_positions > n_ctx {
        return Err(Error::usage(format!(
            "the prompt needs {} positions after {} already used; the model's context is {n_ctx}",
            prefill_positions,
            sess.positions()
        )));
    }
    let t0 = Instant::now();
    let mut logits = sess.feed(&feed, image, true)?;
    let prefill_seconds = t0.elapsed().as_secs_f64();
    let mut out = TurnOutput {
        tokens: vec![],
        text: String::new(),
        stop: Stop::MaxTokens,
        prefill_positions,
        prefill_seconds,
        decode_steps: 0,
        decode_seconds: 0.0,
        step_logits: vec![],
    };
    let mut detok = Detokenizer::new(o.tokenizer);
    let t1 = Instant::now();
    for step in 0..o.max_tokens {
        let row = logits.flatten_all()?.to_vec1::<f32>()?;
        let t = sampler.sample(&row);
        if o.keep_logits {
            out.step_logits.push(row);
        }
        out.tokens.push(t);
        let piece = detok.push(t);
        out.text += &piece;
        emit(&piece)?;
        if Some(t) == o.eos {
            out.stop = Stop::Eos;
            sess.pending = vec![i64::from(t)];
            break;
        }
        if step + 1 == o.max_tokens {
            sess.pending = vec![i64::from(t)];
            break;
        }
        if sess.positions() + 1 > n_ctx {
            out.stop = Stop::Context;
            sess.pending = vec![i64::from(t)];
            break;
        }
        logits = sess.feed(&[i64::from(t)], None, true)?;
        out.decode_steps += 1;
    }
    out.decode_seconds = t1.elapsed().as_secs_f64();
    let rest = detok.finish();
    out.text += &rest;
    emit(&rest)?;
    Ok(out)
}

/// The ids that continue a conversation after an answer: "</s>" if the answer did not end with
/// it, then "USER: {question} ASSISTANT:" (no dummy prefix after a special token).
pub fn next_turn_ids(tok: &SpmTokenizer, previous: &TurnOutput, question: &str) -> Vec<i64> {
    let mut ids = vec![];
    if previous.stop != Stop::Eos {
        ids.extend(tok.eos_id().map(i64::from));
    }
    ids.extend(
        tok.encode_continuation(&next_turn(question))
            .into_iter()
            .map(i64::from),
    );
    ids
}

// ---------------------------------------------------------------------------------- the command

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub gguf: Option<PathBuf>,
    pub mmproj: Option<PathBuf>,
    pub checkpoint: Option<PathBuf>,
    pub vision_tower: Option<PathBuf>,
    pub image: Option<PathBuf>,
    pub pixel_values: Option<PathBuf>,
    pub prompt: Option<String>,
    pub input_ids: Option<PathBuf>,
    pub max_tokens: usize,
    pub sampling: SamplingOptions,
    pub interactive: bool,
    /// Stream the text to stdout as it comes (off for --json).
    pub stream: bool,
    /// How the KV cache stores keys and values.
    pub kv_cache: KvType,
}

#[derive(Debug, Clone, Serialize)]
pub struct Speed {
    pub positions: usize,
    pub seconds: f64,
    pub tokens_per_second: f64,
}

impl Speed {
    fn new(positions: usize, seconds: f64) -> Self {
        Speed {
            positions,
            seconds,
            tokens_per_second: if seconds > 0.0 {
                positions as f64 / seconds
            } else {
                0.0
            },
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gguf: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mmproj: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<PathBuf>,
    pub device: String,
    pub image: String,
    pub prompt: String,
    pub prompt_ids: Vec<i64>,
    pub n_image_positions: usize,
    pub sampling: SamplingOptions,
    pub max_tokens: usize,
    /// How the KV cache stored keys and values: "f32" or "f16".
    pub kv_cache: String,
    /// The generated ids, EOS included when it ended the text.
    pub tokens: Vec<u32>,
    pub text: String,
    pub stop_reason: Stop,
    pub image_seconds: f64,
    /// Prompt positions (the image counted as its N positions) per second.
    pub prefill: Speed,
    /// One-position forward passes per second (the first token comes from the prefill).
    pub decode: Speed,
    pub peak_rss_bytes: u64,
}

/// Pixels [3, S, S] from --pixel-values or --image (LLaVA's pad-to-square preprocessing).
fn pixel_values(opts: &GenerateOptions, hp: &ModelHParams) -> Result<Option<(Tensor, String)>> {
    let s = hp.clip.image_size;
    let v = if let Some(p) = &opts.pixel_values {
        (
            crate::runtime::inputs::read_pixels(p, s)?,
            p.display().to_string(),
        )
    } else if let Some(p) = &opts.image {
        let v = crate::formats::image::preprocess(p, s, hp.clip.image_mean, hp.clip.image_std)?;
        (v, p.display().to_string())
    } else {
        return Ok(None);
    };
    Ok(Some((Tensor::from_vec(v.0, (3, s, s), &Device::Cpu)?, v.1)))
}

/// The prompt's ids and a description: --input-ids as given, or the question in the llava_v1
/// template (a prompt containing "<image>" is the user message itself).
pub fn prompt_ids(tok: &SpmTokenizer, question: &str) -> Vec<i64> {
    let user = first_user_message(question);
    tok.encode_llava_chat(&llava_v1_prompt(LLAVA_V1_SYSTEM, &[(&user, None)]))
}

fn check_ids(ids: &[i64], n_vocab: usize, origin: &Path) -> Result<()> {
    if let Some(bad) = ids
        .iter()
        .find(|&&i| i >= n_vocab as i64 || (i < 0 && i != model::IMAGE_TOKEN))
    {
        return Err(Error::input(
            origin,
            format!("token id {bad}: ids must be in 0..{n_vocab} (or -200 for the image)"),
        ));
    }
    Ok(())
}

/// Load the model, run one turn (or a conversation with `--interactive`, questions from
/// `input`), stream text to `out`. Returns the report of the first turn.
pub fn run(
    opts: &GenerateOptions,
    dev: &RunDevice,
    input: &mut dyn std::io::BufRead,
    out: &mut dyn std::io::Write,
    progress: &dyn Progress,
) -> Result<Report> {
    opts.sampling.check()?;
    if opts.max_tokens == 0 {
        return Err(Error::usage("--max-tokens must be at least 1"));
    }
    let m = match (&opts.checkpoint, &opts.gguf, &opts.mmproj) {
        (Some(c), None, None) => LoadedModel::from_checkpoint(c, opts.vision_tower.as_deref())?,
        (None, Some(g), Some(p)) => {
            if opts.vision_tower.is_some() {
                return Err(Error::usage("--vision-tower goes with --checkpoint"));
            }
            LoadedModel::from_gguf(g, p)?
        }
        (None, Some(_), None) | (None, None, Some(_)) => {
            return Err(Error::usage("give both --gguf and --mmproj"))
        }
        (None, None, None) => {
            return Err(Error::usage(
                "give --gguf LLM.gguf --mmproj MMPROJ.gguf, or --checkpoint DIR",
            ))
        }
        (Some(_), _, _) => {
            return Err(Error::usage(
                "--checkpoint runs the source model: leave out --gguf / --mmproj",
            ))
        }
    };
    match dev {
        RunDevice::Cpu => run_with(&CpuBackend, dev, &m, opts, input, out, progress),
        RunDevice::Cuda(b) => {
            let r = run_with(b.as_ref(), dev, &m, opts, input, out, progress);
            progress.warn(&b.memory_report());
            r
        }
    }
}

fn run_with<B: Backend>(
    b: &B,
    dev: &RunDevice,
    m: &LoadedModel,
    opts: &GenerateOptions,
    input: &mut dyn std::io::BufRead,
    out: &mut dyn std::io::Write,
    progress: &dyn Progress,
) -> Result<Report> {
    let hp = &m.hparams;
    let tok = &m.tokenizer;
    let read_question = |input: &mut dyn std::io::BufRead| -> Result<Option<String>> {
        progress.prompt("> ");
        let mut line = String::new();
        let n = input
            .read_line(&mut line)
            .map_err(|e| Error::io("<stdin>", e))?;
        let q = line.trim_end_matches(['\n', '\r']).to_string();
        Ok((n > 0 && !q.trim().is_empty()).then_some(q))
    };
    let (ids, prompt_desc) = match (&opts.input_ids, &opts.prompt) {
        (Some(_), Some(_)) => return Err(Error::usage("give --prompt or --input-ids, not both")),
        (Some(p), None) => {
            let ids = crate::runtime::inputs::read_ids(p)?;
            check_ids(&ids, hp.llama.n_vocab, p)?;
            (ids, p.display().to_string())
        }
        (None, Some(q)) => (prompt_ids(tok, q), q.clone()),
        (None, None) if opts.interactive => match read_question(input)? {
            Some(q) => (prompt_ids(tok, &q), q),
            None => return Err(Error::usage("no question given")),
        },
        (None, None) => return Err(Error::usage("give --prompt TEXT or --input-ids IDS.json")),
    };
    if ids.is_empty() {
        return Err(Error::usage("the prompt has no tokens"));
    }
    let markers = ids.iter().filter(|&&i| i == model::IMAGE_TOKEN).count();
    let n_pos = ids.len() + markers * hp.clip.n_patches().saturating_sub(1);
    if n_pos > hp.llama.n_ctx {
        return Err(Error::input(
            opts.input_ids
                .clone()
                .unwrap_or_else(|| PathBuf::from("--prompt")),
            format!(
                "the prompt has {n_pos} positions, more than the model's context length {}",
                hp.llama.n_ctx
            ),
        ));
    }
    if markers > 1 {
        let what = format!("the prompt has {markers} <image> markers; one image is supported");
        return Err(match &opts.input_ids {
            Some(f) => Error::input(f, what),
            None => Error::usage(format!("--prompt: {what}")),
        });
    }
    let has_image = markers == 1;
    let pixels = pixel_values(opts, hp)?;
    let (pixels, image_desc) = match (has_image, pixels) {
        (true, Some(p)) => (Some(p.0), p.1),
        (true, None) => {
            return Err(Error::usage(
                "the prompt has an <image> (--prompt puts the question after one): give --image FILE or --pixel-values X.npy",
            ))
        }
        (false, Some(_)) => {
            return Err(Error::usage(
                "an image was given but the prompt has no <image> marker (-200)",
            ))
        }
        (false, None) => (None, "none".to_string()),
    };
    let mut sess = Session::with_kv(b, m.ws(), hp, opts.kv_cache);
    let t0 = Instant::now();
    let image = pixels.map(|p| sess.encode_image(&p)).transpose()?;
    let image_seconds = t0.elapsed().as_secs_f64();
    let mut sampler = Sampler::new(opts.sampling);
    let topts = TurnOptions {
        max_tokens: opts.max_tokens,
        eos: m.eos(),
        keep_logits: false,
        tokenizer: tok,
    };
    let stream = opts.stream;
    let mut emit = |s: &str| -> Result<()> {
        if stream && !s.is_empty() {
            out.write_all(s.as_bytes())
                .and_then(|_| out.flush())
                .map_err(|e| Error::io("<stdout>", e))?;
        }
        Ok(())
    };
    let first = run_turn(
        &mut sess,
        &ids,
        image.as_ref(),
        &mut sampler,
        &topts,
        &mut emit,
    )?;
    let stats = |t: &TurnOutput| {
        progress.warn(&format!(
            "\nprefill {} positions in {:.3} s ({:.1} tokens/s); decode {} tokens in {:.3} s ({:.1} tokens/s); stop: {}",
            t.prefill_positions,
            t.prefill_seconds,
            Speed::new(t.prefill_positions, t.prefill_seconds).tokens_per_second,
            t.decode_steps,
            t.decode_seconds,
            Speed::new(t.decode_steps, t.decode_seconds).tokens_per_second,
            t.stop
        ));
    };
    if stream {
        emit("\n")?;
        stats(&first);
    }
    if opts.interactive {
        let mut last = first.clone();
        while last.stop != Stop::Context {
            let Some(q) = read_question(input)? else {
                break;
            };
            let ids = next_turn_ids(tok, &last, &q);
            if !sess.fits(ids.len()) {
                last.stop = Stop::Context;
                break;
            }
            last = run_turn(&mut sess, &ids, None, &mut sampler, &topts, &mut emit)?;
            emit("\n")?;
            stats(&last);
        }
        if last.stop == Stop::Context {
            progress.warn(&format!(
                "the model's context ({} positions) is full: the conversation ends",
                hp.llama.n_ctx
            ));
        }
    }
    let report = Report {
        schema: REPORT_SCHEMA.into(),
        gguf: opts.gguf.clone(),
        mmproj: opts.mmproj.clone(),
        checkpoint: opts.checkpoint.clone(),
        device: dev.name().into(),
        image: image_desc,
        prompt: prompt_desc,
        prompt_ids: ids,
        n_image_positions: if has_image { hp.clip.n_patches() } else { 0 },
        sampling: opts.sampling,
        max_tokens: opts.max_tokens,
        kv_cache: opts.kv_cache.name().into(),
        tokens: first.tokens.clone(),
        text: first.text.clone(),
        stop_reason: first.stop,
        image_seconds,
        prefill: Speed::new(first.prefill_positions, first.prefill_seconds),
        decode: Speed::new(first.decode_steps, first.decode_seconds),
        peak_rss_bytes: crate::ground::progress::peak_rss_bytes(),
    };
    if stream {
        progress.warn(&format!(
            "image {:.3} s; peak memory {:.1} MiB",
            image_seconds,
            report.peak_rss_bytes as f64 / (1u64 << 20) as f64
        ));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_prints_as_the_report_spells_it() {
        for s in [Stop::Eos, Stop::MaxTokens, Stop::Context] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.to_string());
        }
    }

    fn opts(t: f32, k: usize, p: f32) -> SamplingOptions {
        SamplingOptions {
            temperature: t,
            top_k: k,
            top_p: p,
            seed: 1,
        }
    }

    #[test]
    fn argmax_first_max_and_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, 0.7]), 2);
        assert_eq!(argmax(&[-1.0, f32::NAN, -2.0]), 0);
    }

    /// Probabilities against softmax by hand: logits ln(4), ln(3), ln(2), ln(1) -> 0.4, 0.3, 0.2, 0.1.
    #[test]
    fn candidates_topk_topp_temperature() {
        let l: Vec<f32> = [4.0f32, 3.0, 2.0, 1.0].iter().map(|v| v.ln()).collect();
        let ids = |c: &[(u32, f64)]| c.iter().map(|e| e.0).collect::<Vec<_>>();
        let c = candidates(&l, &opts(1.0, 0, 1.0));
        assert_eq!(ids(&c), vec![0, 1, 2, 3]);
        for (e, want) in c.iter().zip([0.4, 0.3, 0.2, 0.1]) {
            assert!((e.1 - want).abs() < 1e-6, "{c:?}");
        }
        // top-k 2: 4/7, 3/7.
        let c = candidates(&l, &opts(1.0, 2, 1.0));
        assert_eq!(ids(&c), vec![0, 1]);
        assert!((c[0].1 - 4.0 / 7.0).abs() < 1e-6);
        // top-p 0.7: 0.4 + 0.3 reaches it; 0.75 needs the third.
        assert_eq!(ids(&candidates(&l, &opts(1.0, 0, 0.7))), vec![0, 1]);
        assert_eq!(ids(&candidates(&l, &opts(1.0, 0, 0.75))), vec![0, 1, 2]);
        assert_eq!(ids(&candidates(&l, &opts(1.0, 0, 0.1))), vec![0]);
        // Temperature 0.5 squares the ratios: 16:9:4:1 (before top-p).
        let c = candidates(&l, &opts(0.5, 0, 1.0));
        assert!((c[0].1 - 16.0 / 30.0).abs() < 1e-6, "{c:?}");
        let c = candidates(&l, &opts(0.5, 0, 0.8));
        assert_eq!(ids(&c), vec![0, 1]); // 16/30 + 9/30 = 0.833 >= 0.8
    }

    #[test]
    fn sampler_is_seeded_and_follows_probabilities() {
        let l: Vec<f32> = [4.0f32, 3.0, 2.0, 1.0].iter().map(|v| v.ln()).collect();
        let draw = |seed: u64, n: usize| {
            let mut s = Sampler::new(SamplingOptions {
                seed,
                ..opts(1.0, 0, 1.0)
            });
            (0..n).map(|_| s.sample(&l)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7, 50), draw(7, 50));
        assert_ne!(draw(7, 50), draw(8, 50));
        let n = 40_000;
        let mut count = [0usize; 4];
        for t in draw(3, n) {
            count[t as usize] += 1;
        }
        for (c, p) in count.iter().zip([0.4, 0.3, 0.2, 0.1]) {
            // 4.5 standard deviations of a binomial count.
            let sd = (n as f64 * p * (1.0 - p)).sqrt();
            assert!((*c as f64 - n as f64 * p).abs() < 4.5 * sd, "{count:?}");
        }
        // Greedy ignores the seed; top-k 1 is greedy at any temperature.
        let mut g = Sampler::new(opts(0.0, 0, 1.0));
        assert_eq!(g.sample(&l), 0);
        let mut k1 = Sampler::new(opts(5.0, 1, 1.0));
        assert!((0..100).all(|_| k1.sample(&l) == 0));
    }
}
