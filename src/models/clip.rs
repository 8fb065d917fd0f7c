//! CLIP text encoders in the transformers layout: `CLIPTextModel` (SD1.x / SDXL
//! `text_encoder`) and `CLIPTextModelWithProjection` (SD2 / SDXL `text_encoder_2`).
//!
//! Variables carry the `text_model.` prefix used by SD `text_encoder/` checkpoints;
//! files saved without it (`embeddings.*`, `encoder.*`, `final_layer_norm.*`) load too.
//! The encoder is a pre-norm transformer with a causal mask, an optional padding
//! mask, and a final layer norm. The pooled output is the final hidden state at the
//! end-of-text position, chosen as transformers does: the argmax of `input_ids` when
//! the config's `eos_token_id` is 2 (legacy OpenAI configs, where end-of-text is the
//! largest id), otherwise the first position holding `eos_token_id`.

use crate::models::forward_input as required;
use crate::weights;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use tch::nn::{self, Module, VarStore};
use tch::{Device, Kind, Tensor};

fn default_hidden_act() -> String {
    "quick_gelu".to_string()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_eos() -> i64 {
    2
}
fn default_max_pos() -> i64 {
    77
}
fn default_vocab() -> i64 {
    49408
}
fn default_projection_dim() -> i64 {
    512
}

/// `config.json` of a transformers `CLIPTextModel` / `CLIPTextModelWithProjection`
/// (or the `text_config` of a full `CLIPModel`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClipTextConfig {
    #[serde(default = "default_vocab")]
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: i64,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_projection_dim")]
    pub projection_dim: i64,
    #[serde(default = "default_eos")]
    pub eos_token_id: i64,
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
}

/// Activation of the MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP ViT-L/14, SD1.x).
    QuickGelu,
    /// Exact (erf) GELU (OpenCLIP ViT-H / bigG, SD2 and SDXL `text_encoder_2`).
    Gelu,
    /// Tanh-approximated GELU (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
}

impl Activation {
    fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
            other => bail!(
                "CLIP text config: hidden_act {other:?} is not supported \
                 (expected quick_gelu, gelu, gelu_new or gelu_pytorch_tanh)"
            ),
        })
    }

    pub(crate) fn apply(self, x: &Tensor) -> Tensor {
        match self {
            Activation::QuickGelu => x * (x * 1.702).sigmoid(),
            Activation::Gelu => x.gelu("none"),
            Activation::GeluTanh => x.gelu("tanh"),
        }
    }
}

impl ClipTextConfig {
    fn base(hidden: i64, layers: i64, heads: i64, inter: i64, act: &str, proj: i64) -> Self {
        ClipTextConfig {
            vocab_size: 49408,
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            max_position_embeddings: 77,
            hidden_act: act.to_string(),
            layer_norm_eps: 1e-5,
            projection_dim: proj,
            eos_token_id: 2,
            architectures: None,
        }
    }

    /// A tiny encoder with the full CLIP vocabulary, for tests.
    pub fn tiny() -> Self {
        Self::base(16, 2, 2, 32, "quick_gelu", 16)
    }

    /// SD1.x `text_encoder`: OpenAI CLIP ViT-L/14 text tower.
    pub fn sd15() -> Self {
        Self::base(768, 12, 12, 3072, "quick_gelu", 768)
    }

    /// SD2.x `text_encoder`: OpenCLIP ViT-H/14 text tower (the checkpoints keep 23 of
    /// its 24 layers).
    pub fn sd2() -> Self {
        Self::base(1024, 23, 16, 4096, "gelu", 512)
    }

    /// SDXL `text_encoder_2`: OpenCLIP ViT-bigG/14 text tower with projection.
    pub fn sdxl_te2() -> Self {
        Self::base(1280, 32, 20, 5120, "gelu", 1280)
    }

    /// Check the fields that change the architecture.
    pub fn validate(&self) -> Result<()> {
        Activation::parse(&self.hidden_act)?;
        ensure!(
            self.hidden_size > 0 && self.num_attention_heads > 0,
            "CLIP text config: hidden_size {} / num_attention_heads {} must be positive",
            self.hidden_size,
            self.num_attention_heads
        );
        ensure!(
            self.hidden_size % self.num_attention_heads == 0,
            "CLIP text config: hidden_size {} is not divisible by num_attention_heads {}",
            self.hidden_size,
            self.num_attention_heads
        );
        ensure!(
            self.num_hidden_layers >= 1,
            "CLIP text config: num_hidden_layers {} must be at least 1",
            self.num_hidden_layers
        );
        Ok(())
    }

    /// Read `config.json`, accepting a full `CLIPModel` config (its `text_config`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let v = crate::models::config::read_json(path)?;
        let v = match v.get("text_config") {
            Some(tc) if v.get("hidden_size").is_none() => tc.clone(),
            _ => v,
        };
        let cfg: ClipTextConfig = serde_json::from_value(v)
            .with_context(|| format!("{}: invalid CLIP text config", path.display()))?;
        cfg.validate()
            .with_context(|| format!("{}: unsupported CLIP text config", path.display()))?;
        Ok(cfg)
    }

    fn declares_projection(&self) -> bool {
        self.architectures
            .as_ref()
            .is_some_and(|a| a.iter().any(|s| s == "CLIPTextModelWithProjection"))
    }
}

/// One pre-norm transformer layer (`layer_norm1`, `self_attn`, `layer_norm2`, `mlp`),
/// shared by the text and vision towers.
pub(crate) struct EncoderLayer {
    layer_norm1: nn::LayerNorm,
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    out_proj: nn::Linear,
    layer_norm2: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl EncoderLayer {
    pub(crate) fn new(p: &nn::Path, h: i64, intermediate: i64, eps: f64) -> Self {
        let ln = nn::LayerNormConfig {
            eps,
            ..Default::default()
        };
        let attn = p / "self_attn";
        let mlp = p / "mlp";
        EncoderLayer {
            layer_norm1: nn::layer_norm(p / "layer_norm1", vec![h], ln),
            q_proj: nn::linear(&attn / "q_proj", h, h, Default::default()),
            k_proj: nn::linear(&attn / "k_proj", h, h, Default::default()),
            v_proj: nn::linear(&attn / "v_proj", h, h, Default::default()),
            out_proj: nn::linear(&attn / "out_proj", h, h, Default::default()),
            layer_norm2: nn::layer_norm(p / "layer_norm2", vec![h], ln),
            fc1: nn::linear(&mlp / "fc1", h, intermediate, Default::default()),
            fc2: nn::linear(&mlp / "fc2", intermediate, h, Default::default()),
        }
    }

    /// `mask`: an additive [B, 1, S, S] mask, or None; `causal` applies the plain
    /// causal mask when `mask` is None (the vision tower attends everywhere).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        heads: i64,
        act: Activation,
        mask: Option<&Tensor>,
        causal: bool,
    ) -> Tensor {
        let (b, s, h) = x.size3().expect("CLIP hidden states are [B, S, H]");
        let d = h / heads;
        let y = self.layer_norm1.forward(x);
        let split = |t: Tensor| t.view([b, s, heads, d]).transpose(1, 2);
        let q = split(self.q_proj.forward(&y));
        let k = split(self.k_proj.forward(&y));
        let v = split(self.v_proj.forward(&y));
        let scale = (d as f64).powf(-0.5);
        let causal = causal && mask.is_none();
        let a = Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, causal, scale, false);
        let a = a.transpose(1, 2).contiguous().view([b, s, h]);
        let x = x + self.out_proj.forward(&a);
        let y = self.layer_norm2.forward(&x);
        let y = self.fc2.forward(&act.apply(&self.fc1.forward(&y)));
        x + y
    }
}

/// Outputs of [`ClipTextModel::forward`].
pub struct ClipTextOutput {
    /// Final hidden states after `final_layer_norm`, [B, S, H].
    pub last_hidden_state: Tensor,
    /// Final-normed hidden state at the end-of-text position, [B, H].
    pub pooler_output: Tensor,
    /// Embeddings, then the output of every layer (before the final norm):
    /// `num_hidden_layers + 1` tensors of [B, S, H]. `hidden_states[len - 2]` is the
    /// penultimate layer output that SDXL conditions on.
    pub hidden_states: Vec<Tensor>,
    /// `text_projection(pooler_output)`, [B, projection_dim], for the model with
    /// projection.
    pub text_embeds: Option<Tensor>,
}

impl ClipTextOutput {
    /// `hidden_states[-2]` (penultimate layer, un-normed).
    pub fn penultimate(&self) -> &Tensor {
        &self.hidden_states[self.hidden_states.len() - 2]
    }
}

/// CLIP text transformer, with or without the final text projection.
pub struct ClipTextModel {
    token_embedding: nn::Embedding,
    position_embedding: nn::Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: nn::LayerNorm,
    text_projection: Option<nn::Linear>,
    act: Activation,
    heads: i64,
    max_positions: i64,
    eos_token_id: i64,
}

impl ClipTextModel {
    /// Build the variables under `p` (the root of the checkpoint: `p / "text_model"`
    /// holds the transformer). `with_projection` adds `text_projection.weight`.
    pub fn new(p: &nn::Path, cfg: &ClipTextConfig, with_projection: bool) -> Result<Self> {
        cfg.validate()?;
        let tm = p / "text_model";
        let emb = &tm / "embeddings";
        let h = cfg.hidden_size;
        let token_embedding = nn::embedding(
            &emb / "token_embedding",
            cfg.vocab_size,
            h,
            Default::default(),
        );
        let position_embedding = nn::embedding(
            &emb / "position_embedding",
            cfg.max_position_embeddings,
            h,
            Default::default(),
        );
        let enc = &tm / "encoder" / "layers";
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(&(&enc / i), h, cfg.intermediate_size, cfg.layer_norm_eps))
            .collect();
        let ln = nn::LayerNormConfig {
            eps: cfg.layer_norm_eps,
            ..Default::default()
        };
        let final_layer_norm = nn::layer_norm(&tm / "final_layer_norm", vec![h], ln);
        let text_projection = with_projection.then(|| {
            nn::linear(
                p / "text_projection",
                h,
                cfg.projection_dim,
                nn::LinearConfig {
                    bias: false,
                    ..Default::default()
                },
            )
        });
        Ok(ClipTextModel {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            text_projection,
            act: Activation::parse(&cfg.hidden_act)?,
            heads: cfg.num_attention_heads,
            max_positions: cfg.max_position_embeddings,
            eos_token_id: cfg.eos_token_id,
        })
    }

    pub fn has_projection(&self) -> bool {
        self.text_projection.is_some()
    }

    /// Run the encoder on int64 `input_ids` [B, S] (S <= max_position_embeddings),
    /// with an optional padding `attention_mask` [B, S] (1 = keep, 0 = padding).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> Result<ClipTextOutput> {
        let (b, s) = input_ids.size2().with_context(|| {
            format!("CLIP input_ids must be [B, S], got {:?}", input_ids.size())
        })?;
        ensure!(
            s >= 1 && s <= self.max_positions,
            "CLIP input_ids: sequence length {s} must be in 1..={} (max_position_embeddings)",
            self.max_positions
        );
        let device = self.token_embedding.ws.device();
        let ids = input_ids.to_device(device).to_kind(Kind::Int64);
        let positions = Tensor::arange(s, (Kind::Int64, device));
        let mut x = self.token_embedding.forward(&ids)
            + self.position_embedding.forward(&positions).unsqueeze(0);
        let mask = match attention_mask {
            None => None,
            Some(m) => {
                ensure!(
                    m.size() == [b, s],
                    "CLIP attention_mask must be [{b}, {s}] like input_ids, got {:?}",
                    m.size()
                );
                let kind = x.kind();
                let keep_key = m.to_device(device).ne(0).view([b, 1, 1, s]);
                let causal = Tensor::ones([s, s], (Kind::Bool, device))
                    .tril(0)
                    .view([1, 1, s, s]);
                let allowed = keep_key.logical_and(&causal);
                let neg = finfo_min(kind);
                let zeros = Tensor::zeros([b, 1, s, s], (kind, device));
                Some(zeros.masked_fill(&allowed.logical_not(), neg))
            }
        };
        let mut hidden_states = Vec::with_capacity(self.layers.len() + 1);
        for layer in &self.layers {
            let next = layer.forward(&x, self.heads, self.act, mask.as_ref(), mask.is_none());
            hidden_states.push(x);
            x = next;
        }
        let last_hidden_state = self.final_layer_norm.forward(&x);
        hidden_states.push(x);
        let eos_pos = if self.eos_token_id == 2 {
            ids.argmax(-1, false)
        } else {
            ids.eq(self.eos_token_id)
                .to_kind(Kind::Int)
                .argmax(-1, false)
        };
        let batch = Tensor::arange(b, (Kind::Int64, device));
        let pooler_output = last_hidden_state.index(&[Some(batch), Some(eos_pos)]);
        let text_embeds = self
            .text_projection
            .as_ref()
            .map(|p| p.forward(&pooler_output));
        Ok(ClipTextOutput {
            last_hidden_state,
            pooler_output,
            hidden_states,
            text_embeds,
        })
    }
}

fn finfo_min(kind: Kind) -> f64 {
    match kind {
        Kind::Half => -65504.0,
        Kind::BFloat16 => -3.3895313892515355e38,
        Kind::Double => f64::MIN,
        _ => f32::MIN as f64,
    }
}

/// A CLIP text encoder loaded from a checkpoint folder.
pub struct LoadedClipText {
    pub vs: VarStore,
    pub model: ClipTextModel,
    pub config: ClipTextConfig,
}

impl ClipTextModel {
    /// Load `config.json` + `model[.fp16].safetensors` from `dir`. The projection is
    /// built when the config's architectures name `CLIPTextModelWithProjection` or the
    /// weights hold `text_projection.weight`. The weights are converted to `kind`.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<LoadedClipText> {
        let config = ClipTextConfig::from_file(&dir.join("config.json"))?;
        let files = weights::find_weight_files(dir, &["model"], Some("fp16"))?;
        let mut names = Vec::new();
        for f in &files {
            names.extend(weights::tensor_names(f)?);
        }
        let with_projection =
            config.declares_projection() || names.iter().any(|n| n == "text_projection.weight");
        let prefixed = names.iter().any(|n| n.starts_with("text_model."));
        let mut vs = VarStore::new(device);
        let model = ClipTextModel::new(&vs.root(), &config, with_projection)
            .with_context(|| format!("building the CLIP text encoder of {}", dir.display()))?;
        if kind != Kind::Float {
            vs.set_kind(kind);
        }
        let mut opts = weights::LoadOptions {
            ignore: vec![
                "text_model.embeddings.position_ids".into(),
                "embeddings.position_ids".into(),
            ],
            rename: Vec::new(),
        };
        if !prefixed {
            for p in ["embeddings.", "encoder.", "final_layer_norm."] {
                opts.rename.push((p.to_string(), format!("text_model.{p}")));
            }
        }
        weights::load_into(&mut vs, &files, &opts)?;
        Ok(LoadedClipText { vs, model, config })
    }
}

/// `adt forward` for `clip-text` (outputs `last_hidden_state`, `pooler_output`,
/// `hidden_states_m2`) and `clip-text-proj` (outputs `text_embeds`,
/// `last_hidden_state`, `hidden_states_m2`). Inputs: `input_ids`, optional
/// `attention_mask`. Runs in float32 on the CPU.
pub fn run_forward(
    component: &str,
    model_dir: &Path,
    inputs: &HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    if component != "clip-text" && component != "clip-text-proj" {
        bail!("unknown CLIP component {component:?} (expected clip-text or clip-text-proj)");
    }
    let input_ids = required(inputs, "input_ids", component)?;
    let attention_mask = inputs.get("attention_mask");
    let loaded = ClipTextModel::load(model_dir, Device::Cpu, Kind::Float)?;
    let out = tch::no_grad(|| loaded.model.forward(input_ids, attention_mask))?;
    let mut res = HashMap::new();
    res.insert(
        "hidden_states_m2".to_string(),
        out.penultimate().shallow_clone(),
    );
    res.insert(
        "last_hidden_state".to_string(),
        out.last_hidden_state.shallow_clone(),
    );
    if component == "clip-text-proj" {
        let te = out.text_embeds.with_context(|| {
            format!(
                "{}: clip-text-proj needs text_projection.weight, which this checkpoint lacks",
                model_dir.display()
            )
        })?;
        res.insert("text_embeds".to_string(), te);
    } else {
        res.insert("pooler_output".to_string(), out.pooler_output);
    }
    Ok(res)
}
