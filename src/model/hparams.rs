//! Model hyper-parameters, read from a checkpoint's config.json (see `checkpoint::config`)
//! or from GGUF metadata (see `gguf` keys). The model runtime and the recipes both use these.

/// LLaMA decoder (llama.cpp `llama.*` keys).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LlamaHParams {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_vocab: usize,
    pub n_ctx: usize,
    pub rms_eps: f32,
    pub rope_theta: f32,
}

impl LlamaHParams {
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }
}

/// CLIP vision tower (HF CLIPVisionConfig; llama.cpp `clip.vision.*` keys).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClipHParams {
    pub image_size: usize,
    pub patch_size: usize,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_head: usize,
    /// Encoder layers in the source model.
    pub n_layer: usize,
    pub eps: f32,
    /// quick_gelu (true for CLIP ViT-L) or exact gelu.
    pub quick_gelu: bool,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
    /// Non-negative hidden-state indices (0 = embeddings after pre_layrnorm, k = output of layer k).
    pub feature_layers: Vec<usize>,
}

impl ClipHParams {
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }
    pub fn n_patches(&self) -> usize {
        self.patches_per_side() * self.patches_per_side()
    }
    /// Encoder blocks that must run: the largest selected hidden-state index.
    pub fn blocks_needed(&self) -> usize {
        self.feature_layers.iter().copied().max().unwrap_or(0)
    }
}

/// MMFuser (MSCrossAttnBlock) shape parameters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FuserHParams {
    /// Deformable attention heads (M).
    pub n_heads: usize,
    /// Levels fused by the cross attention (L); the self attention uses 1.
    pub n_levels: usize,
    /// Sampling points per head and level (P).
    pub n_points: usize,
    /// LayerNorm epsilon of query_norm / feat_norm / norm1.
    pub eps: f32,
}

/// What follows the vision tower.
#[derive(Debug, Clone, PartialEq)]
pub enum ProjectorHParams {
    /// LLaVA-1.5 `mlp2x_gelu`: Linear, GELU, Linear (mm.0, mm.2).
    Mlp,
    /// LLaVA-MMFuser: fuser, then Linear, GELU, Linear (mm.fuser.*, mm.1, mm.3).
    MmFuser(FuserHParams),
}

/// Everything the forward pass needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelHParams {
    pub llama: LlamaHParams,
    pub clip: ClipHParams,
    pub projector: ProjectorHParams,
}
