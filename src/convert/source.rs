//! A source checkpoint opened for conversion or inference: config, weights, vision tower,
//! recipe and the tensor plan that maps every source tensor to its GGUF name.
use crate::convert::hparams_table;
use crate::convert::recipe::{self, ArtefactKind, Pattern, PlanRow, Recipe, Transform, Var, Vars};
use crate::formats::checkpoint::config::{clip_hparams, read_json, LlavaConfig, SelectLayers};
use crate::formats::checkpoint::store::{src_dtype_name, SrcTensor, TensorStore};
use crate::ground::error::{Error, Result};
use crate::model::hparams::{ClipHParams, FuserHParams, ModelHParams, ProjectorHParams};
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The released MSCrossAttnBlock hard-codes 16 heads; M is not derivable from the shapes alone
/// (only M*P is), so a config key may override it.
pub const DEFAULT_FUSER_HEADS: usize = 16;
pub const FUSER_HEADS_CONFIG_KEY: &str = "mmfuser_n_heads";
/// MSCrossAttnBlock's LayerNorm epsilon (spec §2).
pub const FUSER_LN_EPS: f32 = 1e-6;

/// Which store a tensor comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreId {
    Checkpoint,
    Tower,
}

#[derive(Debug, Clone)]
pub struct SourceRow {
    pub row: PlanRow,
    pub store: StoreId,
    /// Index into `recipe.artefacts`.
    pub artefact: usize,
}

pub struct Source {
    pub dir: PathBuf,
    pub name: String,
    pub config: LlavaConfig,
    pub recipe: Recipe,
    pub hparams: ModelHParams,
    pub vars: Vars,
    pub store: TensorStore,
    pub tower: Option<(PathBuf, TensorStore)>,
    pub rows: Vec<SourceRow>,
    /// Source tensors read, checked and deliberately not written (e.g. CLIP blocks past the last selected layer).
    pub dropped: Vec<(StoreId, String)>,
    by_gguf: BTreeMap<String, usize>,
}

impl Source {
    pub fn store(&self, id: StoreId) -> &TensorStore {
        match id {
            StoreId::Checkpoint => &self.store,
            StoreId::Tower => {
                &self
                    .tower
                    .as_ref()
                    .expect("tower rows only exist with a tower")
                    .1
            }
        }
    }

    /// Files read (weights, configs, tokenizer) for the manifest.
    pub fn input_files(&self) -> Vec<PathBuf> {
        let mut v = self.checkpoint_files();
        if let Some((dir, t)) = &self.tower {
            v.extend(t.files().map(Path::to_path_buf));
            for f in ["config.json", "preprocessor_config.json"] {
                if dir.join(f).exists() {
                    v.push(dir.join(f));
                }
            }
        }
        for f in [
            "config.json",
            "model.safetensors.index.json",
            "pytorch_model.bin.index.json",
            "tokenizer.model",
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "added_tokens.json",
        ] {
            if self.dir.join(f).exists() {
                v.push(self.dir.join(f));
            }
        }
        v
    }

    pub fn open(dir: &Path, vision_tower: Option<&Path>) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::input(
                dir,
                "not a directory (expected a Hugging Face checkpoint directory)",
            ));
        }
        let config = LlavaConfig::read(dir)?;
        if !matches!(
            config.model_type.as_str(),
            "llava_llama" | "llava" | "llava_mmfuser"
        ) {
            return Err(Error::input(
                &config.path,
                format!(
                    "model_type '{}' is not a LLaVA checkpoint (expected \"llava_llama\")",
                    config.model_type
                ),
            ));
        }
        let select = config.select_layers.clone().ok_or_else(|| {
            Error::input(
                &config.path,
                "no mm_vision_select_layer: this is not a multimodal LLaVA checkpoint",
            )
        })?;
        let recipe = recipe::recipe(recipe_name(&config, &select)?)?;
        if config.select_feature != "patch" {
            return Err(Error::input(
                &config.path,
                format!(
                    "vision feature selection '{}' is not supported (only the patch tokens, CLS dropped: \"patch\" / \"default\")",
                    config.select_feature
                ),
            ));
        }
        let store = TensorStore::open_dir(dir)?;
        let ck_names = canonical_names(&store, &store_rules(&recipe, StoreId::Checkpoint)?, dir)?;

        // The vision tower: --vision-tower, else embedded in the checkpoint.
        let clip_map = recipe::name_map(recipe::TOWER_COMPONENT)?;
        let embedded_prefix = recipe.prefix(&clip_map).to_string();
        let embedded =
            ck_names.contains_key(&format!("{embedded_prefix}embeddings.class_embedding"));
        let hub = config
            .vision_tower
            .clone()
            .unwrap_or_else(|| "(mm_vision_tower not set)".into());
        let mut table_note = String::new();
        let (tower, tower_prefix, clip_cfg_path, clip_cfg, preproc) = match vision_tower {
            Some(tdir) => {
                if !tdir.is_dir() {
                    return Err(Error::input(tdir, "--vision-tower must be a directory holding a Hugging Face CLIP model"));
                }
                let cfg_path = tdir.join("config.json");
                let cfg = read_json(&cfg_path)?;
                let pre = tdir.join("preprocessor_config.json");
                let pre = if pre.exists() { Some((read_json(&pre)?, pre)) } else { None };
                (Some((tdir.to_path_buf(), TensorStore::open_dir(tdir)?)), String::new(), cfg_path, cfg, pre)
            }
            None if embedded => {
                let pre = dir.join("preprocessor_config.json");
                let pre = if pre.exists() { Some((read_json(&pre)?, pre)) } else { None };
                let (cfg, pre) = match (config.vision_config.clone(), recipe::known_tower(&hub)?) {
                    (Some(cfg), _) => (cfg, pre),
                    // Only the hub id: the built-in table's config (every shape is still checked).
                    (None, Some(k)) => {
                        table_note = format!(" (the vision tower's config is the built-in one for '{hub}'; if the embedded tower is not that model, pass --vision-tower DIR)");
                        (k.config, pre.or_else(|| {
                            k.preprocessor.map(|j| (j, PathBuf::from(format!("the built-in preprocessor config of '{hub}'"))))
                        }))
                    }
                    (None, None) => return Err(Error::input(
                        &config.path,
                        format!("the vision tower is embedded in the checkpoint but config.json has no \"vision_config\" and '{hub}' is not a tower this tool knows; pass --vision-tower DIR (a local copy of '{hub}') for its config"),
                    )),
                };
                (None, embedded_prefix, config.path.clone(), cfg, pre)
            }
            None => {
                return Err(Error::input(
                    dir,
                    format!("no vision tower: the checkpoint does not embed one, so pass --vision-tower DIR with a local copy of the Hugging Face model '{hub}' (e.g. `huggingface-cli download {hub} --local-dir DIR`)"),
                ))
            }
        };
        let clip = clip_hparams(
            &clip_cfg_path,
            &clip_cfg,
            preproc.as_ref().map(|(j, p)| (p.as_path(), j)),
            &select,
            &config.path,
        )?;
        if let Some(mm) = config.mm_hidden_size {
            if mm != clip.n_embd {
                return Err(Error::input(
                    &config.path,
                    format!(
                        "mm_hidden_size {mm} differs from the vision tower's hidden_size {}{table_note}",
                        clip.n_embd
                    ),
                ));
            }
        }
        let projector = match recipe.projector_type.as_str() {
            "mmfuser" => {
                if config
                    .projector_type
                    .as_deref()
                    .is_some_and(|p| p != "mlp2x_gelu")
                {
                    return Err(Error::input(&config.path, format!("mm_projector_type '{}' with an MMFuser select list is not supported (mlp2x_gelu)", config.projector_type.as_deref().unwrap_or(""))));
                }
                if select.indices().len() != 5 {
                    return Err(Error::input(
                        &config.path,
                        "MMFuser needs exactly 5 selected layers (4 levels + the query layer)",
                    ));
                }
                ProjectorHParams::MmFuser(fuser_hparams(&store, &config, &clip)?)
            }
            _ => {
                if config
                    .projector_type
                    .as_deref()
                    .is_some_and(|p| p != "mlp2x_gelu")
                {
                    return Err(Error::input(
                        &config.path,
                        format!(
                            "mm_projector_type '{}' is not supported (mlp2x_gelu)",
                            config.projector_type.as_deref().unwrap_or("")
                        ),
                    ));
                }
                ProjectorHParams::Mlp
            }
        };
        // Every layer has stored tensors: a config claiming more layers than the checkpoint holds
        // tensors is wrong (and would otherwise plan billions of rows before any shape check).
        let held = store.names().count() + tower.as_ref().map_or(0, |(_, t)| t.names().count());
        for (n, what, path) in [
            (config.llama.n_layer, "num_hidden_layers", &config.path),
            (clip.blocks_needed(), "the vision blocks the selected layers need (num_hidden_layers, mm_vision_select_layer)", &clip_cfg_path),
        ] {
            if n > held {
                return Err(Error::input(
                    path,
                    format!("{what}: {n} layers, but the weights hold only {held} tensors"),
                ));
            }
        }
        let hparams = ModelHParams {
            llama: config.llama.clone(),
            clip,
            projector,
        };
        let name = dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().to_string()))
            .unwrap_or_else(|| "model".into());
        let vars = make_vars(&hparams, &name, &config);

        let mut src = Source {
            dir: dir.to_path_buf(),
            name,
            config,
            recipe,
            hparams,
            vars,
            store,
            tower,
            rows: vec![],
            dropped: vec![],
            by_gguf: BTreeMap::new(),
        };
        src.plan(&tower_prefix)
            .map_err(|e| with_note(e, &table_note))?;
        // general.basename / general.size_label of the LLM, as llama.cpp's converter derives them.
        let llm_params: u64 = src
            .rows
            .iter()
            .filter(|r| src.recipe.artefacts[r.artefact].kind == ArtefactKind::Llm)
            .map(|r| r.row.shape.iter().map(|&d| d as u64).product::<u64>())
            .sum();
        let name_or_path = src.config.raw.get("_name_or_path").and_then(|v| v.as_str());
        let (basename, size) =
            crate::convert::naming::basename_and_size(name_or_path, &src.name, llm_params);
        if let Some(b) = basename {
            src.vars.set("basename", Var::Str(b));
        }
        if let Some(s) = size {
            src.vars.set("size_label", Var::Str(s));
        }
        Ok(src)
    }

    /// Expand the recipe's name maps, then check that every needed tensor exists with the right
    /// shape and that every source tensor is either used or deliberately dropped. Name maps speak
    /// of canonical names; each row's `src` becomes the name the checkpoint actually uses.
    fn plan(&mut self, tower_prefix: &str) -> Result<()> {
        let tower_store = if self.tower.is_some() {
            StoreId::Tower
        } else {
            StoreId::Checkpoint
        };
        let ck_rules = store_rules(&self.recipe, StoreId::Checkpoint)?;
        let tower_rules = store_rules(&self.recipe, StoreId::Tower)?;
        let ck_names = canonical_names(&self.store, &ck_rules, &self.dir)?;
        let tower_names = match &self.tower {
            Some((d, t)) => canonical_names(t, &tower_rules, d)?,
            None => BTreeMap::new(),
        };
        let mut drops: Vec<(StoreId, Pattern)> = vec![];
        for (ai, art) in self.recipe.artefacts.iter().enumerate() {
            for comp in &art.components {
                let map = recipe::name_map(comp)?;
                let (store, prefix) = if comp == recipe::TOWER_COMPONENT {
                    (tower_store, tower_prefix.to_string())
                } else {
                    (StoreId::Checkpoint, self.recipe.prefix(&map).to_string())
                };
                let (rows, d) = recipe::expand(&map, &prefix, &self.vars)?;
                drops.extend(d.into_iter().map(|p| (store, p)));
                self.rows.extend(rows.into_iter().map(|row| SourceRow {
                    row,
                    store,
                    artefact: ai,
                }));
            }
        }
        // With --vision-tower, an embedded copy in the checkpoint is not used.
        if self.tower.is_some() {
            let clip_map = recipe::name_map(recipe::TOWER_COMPONENT)?;
            drops.push((
                StoreId::Checkpoint,
                Pattern::parse(&format!("{}*", self.recipe.prefix(&clip_map)), &self.vars)?,
            ));
        }
        let mut missing = vec![];
        for r in &mut self.rows {
            let names = match r.store {
                StoreId::Checkpoint => &ck_names,
                StoreId::Tower => &tower_names,
            };
            match names.get(&r.row.src) {
                Some(actual) => r.row.src = actual.clone(),
                None => missing.push(r.row.src.clone()),
            }
        }
        for r in &self.rows {
            let store = self.store(r.store);
            if let Some(e) = store.entry(&r.row.src) {
                if e.shape != r.row.shape {
                    let file = store.file_of(&r.row.src).unwrap_or(Path::new("?"));
                    return Err(Error::tensor(
                        file,
                        &r.row.src,
                        format!(
                            "shape {:?} does not match the {:?} that config.json implies",
                            e.shape, r.row.shape
                        ),
                    ));
                }
            }
        }
        if !missing.is_empty() {
            let loc = match self.tower.as_ref() {
                Some((d, _)) => format!("{} and {}", self.dir.display(), d.display()),
                None => self.dir.display().to_string(),
            };
            let gamma = if missing.iter().any(|m| m.contains("gamma")) {
                " (gamma1/gamma2 must be stored under their own names; some loaders rename keys containing 'gamma' to 'weight')"
            } else {
                ""
            };
            return Err(Error::input(
                &self.dir,
                format!(
                    "{} tensor(s) the {} recipe needs are missing from {loc}{gamma}: {}",
                    missing.len(),
                    self.recipe.name,
                    list(&missing)
                ),
            ));
        }
        let used: BTreeSet<(bool, &str)> = self
            .rows
            .iter()
            .map(|r| (r.store == StoreId::Tower, r.row.src.as_str()))
            .collect();
        let mut unknown = vec![];
        let mut dropped = vec![];
        for (id, names) in [
            (StoreId::Checkpoint, &ck_names),
            (StoreId::Tower, &tower_names),
        ] {
            for (canon, n) in names {
                if used.contains(&(id == StoreId::Tower, n.as_str())) {
                    continue;
                }
                if drops.iter().any(|(sid, p)| *sid == id && p.matches(canon)) {
                    dropped.push((id, n.clone()));
                } else {
                    unknown.push(n.clone());
                }
            }
        }
        if !unknown.is_empty() {
            return Err(Error::input(
                &self.dir,
                format!("{} source tensor(s) are not used by the {} recipe (refusing to drop weights silently): {}", unknown.len(), self.recipe.name, list(&unknown)),
            ));
        }
        self.dropped = dropped;
        self.by_gguf = self
            .rows
            .iter()
            .enumerate()
            .map(|(i, r)| (r.row.dst.clone(), i))
            .collect();
        Ok(())
    }

    pub fn row(&self, gguf_name: &str) -> Option<&SourceRow> {
        self.by_gguf.get(gguf_name).map(|&i| &self.rows[i])
    }

    /// A source tensor converted to its GGUF layout (Q/K rows permuted), still in its source type.
    pub fn read(&self, r: &SourceRow) -> Result<SrcTensor<'_>> {
        self.transform(r, self.store(r.store).get(&r.row.src)?)
    }

    /// The heads a row's transform permutes its rows within (None: no transform).
    fn transform_heads(&self, r: &SourceRow) -> Option<usize> {
        match r.row.transform? {
            Transform::PermuteQ => Some(self.hparams.llama.n_head),
            Transform::PermuteK => Some(self.hparams.llama.n_head_kv),
        }
    }

    /// The row's transform (if any) applied to its source tensor `t`, however it was read.
    pub fn transform<'a>(&self, r: &SourceRow, t: SrcTensor<'a>) -> Result<SrcTensor<'a>> {
        let Some(heads) = self.transform_heads(r) else {
            return Ok(t);
        };
        let (rows, cols) = (t.shape[0], t.shape[1..].iter().product());
        let data = recipe::permute_rows(&t.data, rows, cols, heads, t.ty.type_size());
        Ok(SrcTensor {
            ty: t.ty,
            shape: t.shape.clone(),
            data: Cow::Owned(data),
        })
    }

    /// Where [`Source::transform`] puts each of a `rows`-row tensor's rows: `order[dst] = src`,
    /// found by running that very transform on the row numbers (so it is the plan's permutation,
    /// right or wrong). None when the row has no transform or it is not a permutation.
    pub fn transform_order(&self, r: &SourceRow, rows: usize) -> Option<Vec<usize>> {
        let heads = self.transform_heads(r)?;
        let numbers: Vec<u8> = (0..rows as u32).flat_map(u32::to_le_bytes).collect();
        let moved = recipe::permute_rows(&numbers, rows, 1, heads, 4);
        let order: Vec<usize> = moved
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .collect();
        let mut seen = vec![false; rows];
        for &o in &order {
            if o >= rows || std::mem::replace(&mut seen[o], true) {
                return None;
            }
        }
        (order.len() == rows).then_some(order)
    }

    /// (store, file index, byte offset) of a row's source tensor: reading rows in this order reads
    /// every file sequentially.
    pub fn source_position(&self, r: &SourceRow) -> (u8, usize, usize) {
        let e = self.store(r.store).entry(&r.row.src);
        (
            r.store as u8,
            e.map_or(0, |e| e.file),
            e.map_or(0, |e| e.range.0),
        )
    }

    /// The checkpoint's own weight files, in store order (the first `input_files`).
    pub fn checkpoint_files(&self) -> Vec<PathBuf> {
        self.store.files().map(Path::to_path_buf).collect()
    }

    /// File index (into `checkpoint_files`) and byte range of a checkpoint row whose bytes can
    /// be taken as they lie in the file (safetensors): what a `ShardStream` delivers.
    pub fn stream_range(&self, r: &SourceRow) -> Option<(usize, u64, u64)> {
        match r.store {
            StoreId::Checkpoint => self.store.file_range(&r.row.src),
            StoreId::Tower => None,
        }
    }

    /// Ask the kernel to start reading a row's bytes now (the next tensor, while this one converts).
    pub fn prefetch(&self, r: &SourceRow) {
        self.store(r.store).prefetch(&r.row.src);
    }

    pub fn file_of(&self, r: &SourceRow) -> PathBuf {
        self.store(r.store)
            .file_of(&r.row.src)
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }

    pub fn dtype_name(&self, r: &SourceRow) -> &'static str {
        self.store(r.store)
            .entry(&r.row.src)
            .map(|e| src_dtype_name(e.ty))
            .unwrap_or("?")
    }
}

/// `e` with `note` appended to its message (input and tensor errors).
fn with_note(e: Error, note: &str) -> Error {
    match e {
        Error::Input { path, msg } => Error::Input {
            path,
            msg: msg + note,
        },
        Error::Tensor { path, tensor, msg } => Error::Tensor {
            path,
            tensor,
            msg: msg + note,
        },
        e => e,
    }
}

/// The name rewrites of one store: the recipe's whole-name aliases (checkpoint only), then each
/// component's aliases under the prefix it has in that store.
fn store_rules(recipe: &Recipe, id: StoreId) -> Result<[Vec<(String, String)>; 2]> {
    let mut comp = vec![];
    for art in &recipe.artefacts {
        for c in &art.components {
            let map = recipe::name_map(c)?;
            let prefix = match id {
                StoreId::Tower if c == recipe::TOWER_COMPONENT => "",
                StoreId::Tower => continue,
                StoreId::Checkpoint => recipe.prefix(&map),
            };
            comp.extend(
                map.aliases
                    .iter()
                    .map(|(f, t)| (format!("{prefix}{f}"), format!("{prefix}{t}"))),
            );
        }
    }
    let whole = match id {
        StoreId::Checkpoint => recipe.aliases.clone(),
        StoreId::Tower => vec![],
    };
    Ok([whole, comp])
}

/// A source name in the spelling the name maps use.
fn canonical(rules: &[Vec<(String, String)>; 2], name: &str) -> String {
    let n = recipe::rewrite(&rules[0], name).unwrap_or_else(|| name.to_string());
    recipe::rewrite(&rules[1], &n).unwrap_or(n)
}

/// canonical name -> the store's own name, for every tensor in `store`; two spellings of one
/// tensor are refused (which would be converted is not ours to guess).
fn canonical_names(
    store: &TensorStore,
    rules: &[Vec<(String, String)>; 2],
    dir: &Path,
) -> Result<BTreeMap<String, String>> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    for n in store.names() {
        let c = canonical(rules, n);
        if let Some(other) = out.get(&c) {
            return Err(Error::input(
                dir,
                format!("tensors '{other}' and '{n}' are two spellings of the same weight '{c}'; keep one"),
            ));
        }
        out.insert(c, n.clone());
    }
    Ok(out)
}

/// Which recipe a config selects: transformers' own LLaVA layout, or the LLaVA repository's
/// with a list of selected layers (MMFuser) or one (LLaVA-1.5).
fn recipe_name(config: &LlavaConfig, select: &SelectLayers) -> Result<&'static str> {
    match (config.hf_layout, select) {
        (true, SelectLayers::Single(_)) => Ok("llava-hf"),
        (true, SelectLayers::List(_)) => Err(Error::input(
            &config.path,
            "vision_feature_layer as a list (several CLIP layers concatenated) is not supported; one layer, or an MMFuser checkpoint's mm_vision_select_layer list",
        )),
        (false, SelectLayers::List(_)) => Ok("llava-mmfuser"),
        (false, SelectLayers::Single(_)) => Ok("llava-1.5"),
    }
}

fn list(names: &[String]) -> String {
    let shown: Vec<&str> = names.iter().take(12).map(String::as_str).collect();
    let more = if names.len() > 12 {
        format!(" ... and {} more", names.len() - 12)
    } else {
        String::new()
    };
    format!("{}{more}", shown.join(", "))
}

/// Derive M, L, P from the fuser's shapes (spec §2): L from the ratio of the sampling_offsets
/// rows, M from config (default 16), P from the self attention's attention_weights rows.
fn fuser_hparams(
    store: &TensorStore,
    config: &LlavaConfig,
    clip: &ClipHParams,
) -> Result<FuserHParams> {
    let p = "model.mm_projector.0.";
    let rows = |n: &str| -> Result<usize> {
        let full = format!("{p}{n}");
        store.entry(&full).map(|e| e.shape[0]).ok_or_else(|| {
            Error::input(&config.path, format!("fuser tensor '{full}' is missing (needed to derive the fuser's heads, levels and points)"))
        })
    };
    let off_cross = rows("cross_attn.sampling_offsets.weight")?;
    let off_self = rows("self_attn.sampling_offsets.weight")?;
    let attn_cross = rows("cross_attn.attention_weights.weight")?;
    let attn_self = rows("self_attn.attention_weights.weight")?;
    let m = config
        .raw
        .get(FUSER_HEADS_CONFIG_KEY)
        .and_then(|v| v.as_u64())
        .map(|v| v as usize)
        .unwrap_or(DEFAULT_FUSER_HEADS);
    let bad = |why: String| {
        Error::input(
            &config.path,
            format!("fuser shapes are inconsistent: {why}"),
        )
    };
    if off_self == 0 || off_cross % off_self != 0 {
        return Err(bad(format!(
            "cross sampling_offsets rows {off_cross} not a multiple of self rows {off_self}"
        )));
    }
    let l = off_cross / off_self;
    if m == 0 || attn_self % m != 0 {
        return Err(bad(format!(
            "self attention_weights rows {attn_self} not a multiple of {m} heads"
        )));
    }
    let pts = attn_self / m;
    if off_self != m * pts * 2 || attn_cross != m * l * pts || !clip.n_embd.is_multiple_of(m) {
        return Err(bad(format!("M={m}, L={l}, P={pts} do not explain offsets {off_cross}/{off_self}, weights {attn_cross}/{attn_self}, C={}", clip.n_embd)));
    }
    if l != 4 {
        return Err(bad(format!(
            "{l} levels, but 5 selected layers give 4 levels"
        )));
    }
    Ok(FuserHParams {
        n_heads: m,
        n_levels: l,
        n_points: pts,
        eps: FUSER_LN_EPS,
    })
}

/// The named values recipes refer to (shape variables and metadata sources).
pub fn make_vars(hp: &ModelHParams, name: &str, config: &LlavaConfig) -> Vars {
    let mut v = Vars::default();
    // The hyper-parameters the metadata rules write (llama.*, clip.*, fuser.*).
    hparams_table::vars_of(hp, &mut v);
    shape_vars(hp, &mut v);
    v.set("name", Var::Str(name.to_string()));
    let aspect = config
        .raw
        .get("image_aspect_ratio")
        .and_then(|x| x.as_str())
        .unwrap_or("pad");
    v.set("image_aspect_ratio", Var::Str(aspect.to_string()));
    v
}

/// The short names of the name maps' shape expressions (schemas/names/*.json).
pub fn shape_vars(hp: &ModelHParams, v: &mut Vars) {
    let l = &hp.llama;
    let c = &hp.clip;
    let i = |x: usize| Var::Int(x as i64);
    for (k, x) in [
        ("n_vocab", l.n_vocab),
        ("n_embd", l.n_embd),
        ("n_layer", l.n_layer),
        ("n_head", l.n_head),
        ("n_head_kv", l.n_head_kv),
        ("head_dim", l.head_dim()),
        ("n_ff", l.n_ff),
        ("n_ctx", l.n_ctx),
        ("c_embd", c.n_embd),
        ("c_ff", c.n_ff),
        ("n_channels", 3),
        ("patch", c.patch_size),
        ("n_pos", c.n_patches() + 1),
        ("n_blocks", c.blocks_needed()),
        ("c_layer", c.n_layer),
    ] {
        v.set(k, i(x));
    }
    if let ProjectorHParams::MmFuser(f) = &hp.projector {
        for (k, x) in [
            ("f_heads", f.n_heads),
            ("f_levels", f.n_levels),
            ("f_points", f.n_points),
        ] {
            v.set(k, i(x));
        }
    }
}
