//! `UNet2DConditionModel` (SD1.x / SD2.x / SDXL) in the diffusers layout.
//!
//! Supported: `CrossAttnDownBlock2D` / `DownBlock2D`, `UNetMidBlock2DCrossAttn`,
//! `UpBlock2D` / `CrossAttnUpBlock2D`, conv or linear transformer projections, per-block
//! head counts and transformer depths, positional timestep embeddings and SDXL's
//! `text_time` additional embedding. Configurations outside that set are rejected with an
//! error naming the field.

use crate::models::blocks::{
    conv2d, group_norm, layer_norm, linear, timestep_embedding, Attention, Downsample2D,
    GegluFeedForward, ResnetBlock2D, TimestepEmbedding, Upsample2D,
};
use crate::models::checkpoint::checkpoint1;
use crate::models::forward_input as input;
use crate::weights;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

/// A config value given once for all blocks or once per block.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Many(Vec<T>),
}

/// Shown as the JSON value would be: `8` or `[5, 10, 20]`.
impl<T: std::fmt::Debug> std::fmt::Debug for PerBlock<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PerBlock::One(v) => write!(f, "{v:?}"),
            PerBlock::Many(v) => write!(f, "{v:?}"),
        }
    }
}

impl<T: Clone + std::fmt::Debug> PerBlock<T> {
    /// The per-block values for `n` blocks; a list must have exactly `n` entries.
    pub fn expand(&self, n: usize, field: &str) -> Result<Vec<T>> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); n]),
            PerBlock::Many(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Many(v) => bail!(
                "config field {field}: expected one value or {n} (one per down block), found {v:?}"
            ),
        }
    }
}

fn d_true() -> bool {
    true
}
fn d_four() -> i64 {
    4
}
fn d_one() -> i64 {
    1
}
fn d_three() -> i64 {
    3
}
fn d_one_f() -> f64 {
    1.0
}
fn d_silu() -> String {
    "silu".into()
}
fn d_default() -> String {
    "default".into()
}
fn d_positional() -> String {
    "positional".into()
}
fn d_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_groups() -> Option<i64> {
    Some(32)
}
fn d_eps() -> f64 {
    1e-5
}
fn d_layers() -> PerBlock<i64> {
    PerBlock::One(2)
}
fn d_head_dim() -> PerBlock<i64> {
    PerBlock::One(8)
}
fn d_cross() -> PerBlock<i64> {
    PerBlock::One(1280)
}
fn d_one_pb() -> PerBlock<i64> {
    PerBlock::One(1)
}
fn d_false_pb() -> PerBlock<bool> {
    PerBlock::One(false)
}
fn d_down() -> Vec<String> {
    [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_up() -> Vec<String> {
    [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn d_channels() -> Vec<i64> {
    vec![320, 640, 1280, 1280]
}

/// The fields of diffusers' `UNet2DConditionModel` config (defaults as in diffusers).
/// Unknown fields are ignored; see [`UNetConfig::validate`] for what is supported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UNetConfig {
    #[serde(default)]
    pub sample_size: Option<i64>,
    #[serde(default = "d_four")]
    pub in_channels: i64,
    #[serde(default = "d_four")]
    pub out_channels: i64,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_mid")]
    pub mid_block_type: Option<String>,
    #[serde(default = "d_up")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_false_pb")]
    pub only_cross_attention: PerBlock<bool>,
    #[serde(default = "d_channels")]
    pub block_out_channels: Vec<i64>,
    #[serde(default = "d_layers")]
    pub layers_per_block: PerBlock<i64>,
    #[serde(default = "d_one")]
    pub downsample_padding: i64,
    #[serde(default = "d_one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_groups")]
    pub norm_num_groups: Option<i64>,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_cross")]
    pub cross_attention_dim: PerBlock<i64>,
    #[serde(default = "d_one_pb")]
    pub transformer_layers_per_block: PerBlock<i64>,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    #[serde(default)]
    pub encoder_hid_dim: Option<i64>,
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: PerBlock<i64>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<i64>>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<i64>,
    #[serde(default)]
    pub num_class_embeds: Option<i64>,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    #[serde(default = "d_one_f")]
    pub resnet_out_scale_factor: f64,
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    #[serde(default)]
    pub time_embedding_dim: Option<i64>,
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<i64>,
    #[serde(default = "d_three")]
    pub conv_in_kernel: i64,
    #[serde(default = "d_three")]
    pub conv_out_kernel: i64,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<i64>,
    #[serde(default = "d_default")]
    pub attention_type: String,
    #[serde(default)]
    pub class_embeddings_concat: bool,
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
}

/// The per-block architecture derived from a validated config.
#[derive(Debug, Clone)]
struct Plan {
    n: usize,
    layers: Vec<i64>,
    heads: Vec<i64>,
    depth: Vec<i64>,
    cross: Vec<i64>,
    groups: i64,
    time_embed_dim: i64,
}

impl UNetConfig {
    /// Parse a config JSON value (as read from `config.json`) and validate it.
    pub fn from_value(v: &serde_json::Value) -> Result<Self> {
        let cfg: Self =
            serde_json::from_value(v.clone()).context("invalid UNet2DConditionModel config")?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The config as diffusers writes it (with `_class_name`).
    pub fn to_value(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("UNetConfig serializes");
        v["_class_name"] = serde_json::Value::from("UNet2DConditionModel");
        v["_diffusers_version"] = crate::models::config::DIFFUSERS_VERSION.into();
        // Options this implementation does not use, at diffusers' defaults, so that the
        // file has every key diffusers writes.
        for (k, d) in [
            ("addition_embed_type_num_heads", serde_json::json!(64)),
            ("mid_block_only_cross_attention", serde_json::Value::Null),
        ] {
            if v.get(k).is_none() {
                v[k] = d;
            }
        }
        v
    }

    /// Stable Diffusion 1.x sizes.
    pub fn sd15() -> Self {
        let mut c: Self = serde_json::from_value(serde_json::json!({})).expect("defaults");
        c.sample_size = Some(64);
        c.cross_attention_dim = PerBlock::One(768);
        c.attention_head_dim = PerBlock::One(8);
        c.layers_per_block = PerBlock::One(2);
        c
    }

    /// Stable Diffusion XL base sizes.
    pub fn sdxl() -> Self {
        let mut c = Self::sd15();
        c.sample_size = Some(128);
        c.block_out_channels = vec![320, 640, 1280];
        c.down_block_types = [
            "DownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
        ]
        .map(String::from)
        .to_vec();
        c.up_block_types = ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
            .map(String::from)
            .to_vec();
        c.attention_head_dim = PerBlock::Many(vec![5, 10, 20]);
        c.transformer_layers_per_block = PerBlock::Many(vec![1, 2, 10]);
        c.cross_attention_dim = PerBlock::One(2048);
        c.use_linear_projection = true;
        c.addition_embed_type = Some("text_time".into());
        c.addition_time_embed_dim = Some(256);
        c.projection_class_embeddings_input_dim = Some(2816);
        c
    }

    /// A tiny SD1.x-style UNet (two levels, 8/16 channels, cross-attention width 32)
    /// for tests.
    pub fn tiny_sd15() -> Self {
        let mut c = Self::sd15();
        c.sample_size = Some(8);
        c.block_out_channels = vec![8, 16];
        c.down_block_types = ["CrossAttnDownBlock2D", "DownBlock2D"]
            .map(String::from)
            .to_vec();
        c.up_block_types = ["UpBlock2D", "CrossAttnUpBlock2D"]
            .map(String::from)
            .to_vec();
        c.layers_per_block = PerBlock::One(1);
        c.attention_head_dim = PerBlock::One(2);
        c.cross_attention_dim = PerBlock::One(32);
        c.norm_num_groups = Some(4);
        c
    }

    /// A tiny SDXL-style UNet (linear projections, `text_time` embedding with pooled
    /// width 16 and time-id embedding width 4) for tests.
    pub fn tiny_sdxl() -> Self {
        let mut c = Self::tiny_sd15();
        c.down_block_types = ["DownBlock2D", "CrossAttnDownBlock2D"]
            .map(String::from)
            .to_vec();
        c.up_block_types = ["CrossAttnUpBlock2D", "UpBlock2D"]
            .map(String::from)
            .to_vec();
        c.transformer_layers_per_block = PerBlock::Many(vec![1, 2]);
        c.use_linear_projection = true;
        c.addition_embed_type = Some("text_time".into());
        c.addition_time_embed_dim = Some(4);
        c.projection_class_embeddings_input_dim = Some(16 + 6 * 4);
        c
    }

    /// Whether the model needs SDXL's `text_embeds` / `time_ids`.
    pub fn needs_added_cond(&self) -> bool {
        self.addition_embed_type.as_deref() == Some("text_time")
    }

    /// The time-embedding width (`time_embedding_dim` or 4 x the first block's channels).
    pub fn time_embed_dim(&self) -> i64 {
        self.time_embedding_dim
            .unwrap_or(self.block_out_channels[0] * 4)
    }

    /// Check that the config describes an architecture this implementation builds;
    /// the error names the offending field and value.
    pub fn validate(&self) -> Result<()> {
        self.plan().map(|_| ())
    }

    fn plan(&self) -> Result<Plan> {
        fn unsupported(field: &str, value: impl std::fmt::Debug, supported: &str) -> anyhow::Error {
            anyhow::anyhow!(
                "UNet config field {field} = {value:?} is not supported (supported: {supported})"
            )
        }
        let n = self.block_out_channels.len();
        if n == 0 {
            bail!("UNet config field block_out_channels is empty");
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            bail!(
                "UNet config: down_block_types ({}) and up_block_types ({}) must have one entry per block_out_channels ({n})",
                self.down_block_types.len(),
                self.up_block_types.len()
            );
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return Err(unsupported(
                    "down_block_types",
                    t,
                    "CrossAttnDownBlock2D, DownBlock2D",
                ));
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return Err(unsupported(
                    "up_block_types",
                    t,
                    "CrossAttnUpBlock2D, UpBlock2D",
                ));
            }
        }
        if self.mid_block_type.as_deref() != Some("UNetMidBlock2DCrossAttn") {
            let v = self.mid_block_type.as_deref().unwrap_or("null");
            return Err(unsupported("mid_block_type", v, "UNetMidBlock2DCrossAttn"));
        }
        if self.act_fn != "silu" {
            return Err(unsupported("act_fn", &self.act_fn, "silu"));
        }
        if self.resnet_time_scale_shift != "default" {
            return Err(unsupported(
                "resnet_time_scale_shift",
                &self.resnet_time_scale_shift,
                "default",
            ));
        }
        if let Some(v) = &self.class_embed_type {
            return Err(unsupported("class_embed_type", v, "null"));
        }
        if let Some(v) = self.num_class_embeds {
            return Err(unsupported("num_class_embeds", v, "null"));
        }
        if self.class_embeddings_concat {
            return Err(unsupported("class_embeddings_concat", true, "false"));
        }
        if self.time_embedding_type != "positional" {
            return Err(unsupported(
                "time_embedding_type",
                &self.time_embedding_type,
                "positional",
            ));
        }
        if let Some(v) = &self.time_embedding_act_fn {
            return Err(unsupported("time_embedding_act_fn", v, "null"));
        }
        if let Some(v) = &self.timestep_post_act {
            return Err(unsupported("timestep_post_act", v, "null"));
        }
        if let Some(v) = self.time_cond_proj_dim {
            return Err(unsupported("time_cond_proj_dim", v, "null"));
        }
        if let Some(v) = self.encoder_hid_dim {
            return Err(unsupported("encoder_hid_dim", v, "null"));
        }
        if let Some(v) = &self.encoder_hid_dim_type {
            return Err(unsupported("encoder_hid_dim_type", v, "null"));
        }
        if self.dual_cross_attention {
            return Err(unsupported("dual_cross_attention", true, "false"));
        }
        if self
            .only_cross_attention
            .expand(n, "only_cross_attention")?
            .iter()
            .any(|&b| b)
        {
            return Err(unsupported(
                "only_cross_attention",
                &self.only_cross_attention,
                "false",
            ));
        }
        if self.attention_type != "default" {
            return Err(unsupported(
                "attention_type",
                &self.attention_type,
                "default",
            ));
        }
        if let Some(v) = &self.cross_attention_norm {
            return Err(unsupported("cross_attention_norm", v, "null"));
        }
        if self.resnet_skip_time_act {
            return Err(unsupported("resnet_skip_time_act", true, "false"));
        }
        if self.resnet_out_scale_factor != 1.0 {
            return Err(unsupported(
                "resnet_out_scale_factor",
                self.resnet_out_scale_factor,
                "1.0",
            ));
        }
        if self.mid_block_scale_factor != 1.0 {
            return Err(unsupported(
                "mid_block_scale_factor",
                self.mid_block_scale_factor,
                "1",
            ));
        }
        if self.dropout != 0.0 {
            return Err(unsupported("dropout", self.dropout, "0.0"));
        }
        if let Some(v) = self
            .reverse_transformer_layers_per_block
            .as_ref()
            .filter(|v| !v.is_null())
        {
            return Err(unsupported(
                "reverse_transformer_layers_per_block",
                v,
                "null",
            ));
        }
        if let Some(v) = &self.num_attention_heads {
            // diffusers itself refuses this field and reads the head count from
            // `attention_head_dim`.
            return Err(unsupported(
                "num_attention_heads",
                v,
                "null (the head count is attention_head_dim)",
            ));
        }
        if self.conv_in_kernel % 2 == 0 || self.conv_out_kernel % 2 == 0 {
            return Err(unsupported(
                "conv_in_kernel / conv_out_kernel",
                (self.conv_in_kernel, self.conv_out_kernel),
                "odd sizes",
            ));
        }
        if self.downsample_padding != 1 && self.downsample_padding != 0 {
            return Err(unsupported(
                "downsample_padding",
                self.downsample_padding,
                "0 or 1",
            ));
        }
        let groups = self
            .norm_num_groups
            .context("UNet config field norm_num_groups = null is not supported")?;
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time") => {
                let t = self.addition_time_embed_dim.context(
                    "UNet config: addition_embed_type \"text_time\" needs addition_time_embed_dim",
                )?;
                let p = self
                    .projection_class_embeddings_input_dim
                    .context("UNet config: addition_embed_type \"text_time\" needs projection_class_embeddings_input_dim")?;
                ensure!(
                    t > 0 && p > 6 * t,
                    "UNet config: projection_class_embeddings_input_dim ({p}) must exceed 6 x addition_time_embed_dim ({t}) by the pooled text width"
                );
            }
            Some(other) => {
                return Err(unsupported("addition_embed_type", other, "null, text_time"))
            }
        }
        let layers = self.layers_per_block.expand(n, "layers_per_block")?;
        let heads = self.attention_head_dim.expand(n, "attention_head_dim")?;
        let depth = self
            .transformer_layers_per_block
            .expand(n, "transformer_layers_per_block")?;
        let cross = self.cross_attention_dim.expand(n, "cross_attention_dim")?;
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            ensure!(c > 0 && c % groups == 0, "UNet config: block_out_channels[{i}] = {c} is not a multiple of norm_num_groups = {groups}");
            ensure!(heads[i] > 0 && c % heads[i] == 0, "UNet config: block_out_channels[{i}] = {c} is not divisible by the head count attention_head_dim[{i}] = {}", heads[i]);
            ensure!(
                layers[i] > 0,
                "UNet config: layers_per_block[{i}] = {} must be positive",
                layers[i]
            );
            ensure!(
                depth[i] > 0,
                "UNet config: transformer_layers_per_block[{i}] = {} must be positive",
                depth[i]
            );
        }
        Ok(Plan {
            n,
            layers,
            heads,
            depth,
            cross,
            groups,
            time_embed_dim: self.time_embed_dim(),
        })
    }
}

/// diffusers' `BasicTransformerBlock` (layer norms, self-attention, cross-attention,
/// GEGLU feed-forward).
#[derive(Debug)]
struct BasicTransformerBlock {
    norm1: nn::LayerNorm,
    attn1: Attention,
    norm2: nn::LayerNorm,
    attn2: Attention,
    norm3: nn::LayerNorm,
    ff: GegluFeedForward,
}

impl BasicTransformerBlock {
    fn new(p: &nn::Path, dim: i64, heads: i64, cross: i64, upcast: bool) -> Self {
        let hd = dim / heads;
        Self {
            norm1: layer_norm(&(p / "norm1"), dim, 1e-5),
            attn1: Attention::new(&(p / "attn1"), dim, None, heads, hd, false, true, upcast),
            norm2: layer_norm(&(p / "norm2"), dim, 1e-5),
            attn2: Attention::new(
                &(p / "attn2"),
                dim,
                Some(cross),
                heads,
                hd,
                false,
                true,
                upcast,
            ),
            norm3: layer_norm(&(p / "norm3"), dim, 1e-5),
            ff: GegluFeedForward::new(&(p / "ff"), dim, dim * 4),
        }
    }

    fn forward(&self, x: &Tensor, ctx: &Tensor) -> Tensor {
        let x = self.attn1.forward(&self.norm1.forward(x), None) + x;
        let x = self.attn2.forward(&self.norm2.forward(&x), Some(ctx)) + x;
        self.ff.forward(&self.norm3.forward(&x)) + x
    }
}

/// diffusers' `Transformer2DModel` for continuous inputs: group norm (eps 1e-6),
/// `proj_in` (1x1 conv or linear), transformer blocks, `proj_out`, residual.
#[derive(Debug)]
struct Transformer2D {
    norm: nn::GroupNorm,
    proj_in: Proj,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Proj,
}

#[derive(Debug)]
enum Proj {
    Conv(nn::Conv2D),
    Linear(nn::Linear),
}

impl Transformer2D {
    #[allow(clippy::too_many_arguments)]
    fn new(
        p: &nn::Path,
        channels: i64,
        heads: i64,
        depth: i64,
        cross: i64,
        groups: i64,
        linear_proj: bool,
        upcast: bool,
    ) -> Result<Self> {
        let proj = |name: &str| {
            if linear_proj {
                Proj::Linear(linear(&(p / name), channels, channels, true))
            } else {
                Proj::Conv(conv2d(&(p / name), channels, channels, 1))
            }
        };
        Ok(Self {
            norm: group_norm(&(p / "norm"), groups, channels, 1e-6)?,
            proj_in: proj("proj_in"),
            blocks: (0..depth)
                .map(|i| {
                    BasicTransformerBlock::new(
                        &(p / "transformer_blocks" / i),
                        channels,
                        heads,
                        cross,
                        upcast,
                    )
                })
                .collect(),
            proj_out: proj("proj_out"),
        })
    }

    fn forward(&self, x: &Tensor, ctx: &Tensor) -> Tensor {
        let s = x.size();
        let (b, c, h, w) = (s[0], s[1], s[2], s[3]);
        let n = self.norm.forward(x);
        let to_tokens = |t: &Tensor| t.permute([0, 2, 3, 1]).reshape([b, h * w, c]);
        let from_tokens = |t: &Tensor| t.reshape([b, h, w, c]).permute([0, 3, 1, 2]);
        let mut t = match &self.proj_in {
            Proj::Conv(conv) => to_tokens(&conv.forward(&n)),
            Proj::Linear(lin) => lin.forward(&to_tokens(&n)),
        };
        for blk in &self.blocks {
            t = blk.forward(&t, ctx);
        }
        let out = match &self.proj_out {
            Proj::Conv(conv) => conv.forward(&from_tokens(&t).contiguous()),
            Proj::Linear(lin) => from_tokens(&lin.forward(&t)),
        };
        out + x
    }
}

#[derive(Debug)]
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    downsampler: Option<Downsample2D>,
}

#[derive(Debug)]
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    upsampler: Option<Upsample2D>,
}

#[derive(Debug)]
struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
}

/// The SDXL `text_time` additional embedding.
#[derive(Debug)]
struct AddTextTime {
    time_dim: i64,
    add_embedding: TimestepEmbedding,
}

/// diffusers' `UNet2DConditionModel`.
#[derive(Debug)]
pub struct UNet2DConditionModel {
    config: UNetConfig,
    conv_in: nn::Conv2D,
    time_embedding: TimestepEmbedding,
    add: Option<AddTextTime>,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
    /// The linear layers that can carry a LoRA adapter.
    pub lora: crate::models::lora::LoraSlots,
}

impl UNet2DConditionModel {
    /// Build the network's variables under `p`, with the diffusers tensor names.
    pub fn new(p: &nn::Path, cfg: &UNetConfig) -> Result<Self> {
        let (model, slots) = crate::models::lora::collect(|| Self::build(p, cfg));
        let mut model = model?;
        model.lora = slots;
        Ok(model)
    }

    fn build(p: &nn::Path, cfg: &UNetConfig) -> Result<Self> {
        let plan = cfg.plan()?;
        let ch = &cfg.block_out_channels;
        let n = plan.n;
        let groups = plan.groups;
        let eps = cfg.norm_eps;
        let temb = plan.time_embed_dim;
        let upcast = cfg.upcast_attention;
        let lin = cfg.use_linear_projection;

        let conv_in = conv2d(&(p / "conv_in"), cfg.in_channels, ch[0], cfg.conv_in_kernel);
        let time_embedding = TimestepEmbedding::new(&(p / "time_embedding"), ch[0], temb);
        let add = if cfg.needs_added_cond() {
            let time_dim = cfg.addition_time_embed_dim.unwrap_or_default();
            let in_dim = cfg
                .projection_class_embeddings_input_dim
                .unwrap_or_default();
            Some(AddTextTime {
                time_dim,
                add_embedding: TimestepEmbedding::new(&(p / "add_embedding"), in_dim, temb),
            })
        } else {
            None
        };

        let mut down_blocks = Vec::with_capacity(n);
        let mut out_c = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let bp = p / "down_blocks" / i;
            let in_c = out_c;
            out_c = c;
            let cross_attn = cfg.down_block_types[i] == "CrossAttnDownBlock2D";
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..plan.layers[i] {
                let c_in = if j == 0 { in_c } else { out_c };
                resnets.push(ResnetBlock2D::new(
                    &(&bp / "resnets" / j),
                    c_in,
                    out_c,
                    Some(temb),
                    groups,
                    eps,
                )?);
                if cross_attn {
                    attentions.push(Transformer2D::new(
                        &(&bp / "attentions" / j),
                        out_c,
                        plan.heads[i],
                        plan.depth[i],
                        plan.cross[i],
                        groups,
                        lin,
                        upcast,
                    )?);
                }
            }
            let downsampler = if i + 1 < n {
                Some(Downsample2D::new(
                    &(&bp / "downsamplers" / 0),
                    out_c,
                    cfg.downsample_padding,
                )?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets,
                attentions,
                downsampler,
            });
        }

        let mp = p / "mid_block";
        let last = ch[n - 1];
        let mid_block = MidBlock {
            resnets: vec![
                ResnetBlock2D::new(&(&mp / "resnets" / 0), last, last, Some(temb), groups, eps)?,
                ResnetBlock2D::new(&(&mp / "resnets" / 1), last, last, Some(temb), groups, eps)?,
            ],
            attentions: vec![Transformer2D::new(
                &(&mp / "attentions" / 0),
                last,
                plan.heads[n - 1],
                plan.depth[n - 1],
                plan.cross[n - 1],
                groups,
                lin,
                upcast,
            )?],
        };

        let mut up_blocks = Vec::with_capacity(n);
        let rev = |v: &[i64], i: usize| v[n - 1 - i];
        let mut out_c = rev(ch, 0);
        for i in 0..n {
            let bp = p / "up_blocks" / i;
            let prev_c = out_c;
            out_c = rev(ch, i);
            let skip_in = rev(ch, (i + 1).min(n - 1));
            let num = rev(&plan.layers, i) + 1;
            let cross_attn = cfg.up_block_types[i] == "CrossAttnUpBlock2D";
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..num {
                let skip = if j == num - 1 { skip_in } else { out_c };
                let c_in = if j == 0 { prev_c } else { out_c };
                resnets.push(ResnetBlock2D::new(
                    &(&bp / "resnets" / j),
                    c_in + skip,
                    out_c,
                    Some(temb),
                    groups,
                    eps,
                )?);
                if cross_attn {
                    attentions.push(Transformer2D::new(
                        &(&bp / "attentions" / j),
                        out_c,
                        rev(&plan.heads, i),
                        rev(&plan.depth, i),
                        rev(&plan.cross, i),
                        groups,
                        lin,
                        upcast,
                    )?);
                }
            }
            let upsampler = (i + 1 < n).then(|| Upsample2D::new(&(&bp / "upsamplers" / 0), out_c));
            up_blocks.push(UpBlock {
                resnets,
                attentions,
                upsampler,
            });
        }

        Ok(Self {
            config: cfg.clone(),
            conv_in,
            time_embedding,
            add,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(&(p / "conv_norm_out"), groups, ch[0], eps)?,
            conv_out: conv2d(
                &(p / "conv_out"),
                ch[0],
                cfg.out_channels,
                cfg.conv_out_kernel,
            ),
            lora: Default::default(),
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// The dtype of the (base) weights.
    pub fn weight_kind(&self) -> Kind {
        self.conv_in.ws.kind()
    }

    /// The raw model output (noise, v or whatever the checkpoint predicts).
    ///
    /// * `sample`: `[B, in_channels, H, W]` latents;
    /// * `timestep`: 0-d (broadcast over the batch) or `[B]`, integer or float;
    /// * `encoder_hidden_states`: `[B, L, cross_attention_dim]`;
    /// * `added`: SDXL's `(text_embeds [B, P], time_ids [B, 6])`, required exactly when
    ///   `addition_embed_type` is "text_time".
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
        added: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let s = sample.size();
        ensure!(
            s.len() == 4 && s[1] == cfg.in_channels,
            "UNet forward: sample must be [B, {}, H, W], found {s:?}",
            cfg.in_channels
        );
        let b = s[0];
        let e = encoder_hidden_states.size();
        ensure!(
            e.len() == 3 && e[0] == b,
            "UNet forward: encoder_hidden_states must be [{b}, L, D], found {e:?}"
        );
        let kind = sample.kind();
        let device = sample.device();
        let t = match timestep.dim() {
            0 => timestep.reshape([1]).expand([b], false),
            1 if timestep.size()[0] == b => timestep.shallow_clone(),
            1 if timestep.size()[0] == 1 => timestep.expand([b], false),
            _ => bail!(
                "UNet forward: timestep must be 0-d or [{b}], found {:?}",
                timestep.size()
            ),
        }
        .to_device(device);
        let t_emb = timestep_embedding(
            &t,
            cfg.block_out_channels[0],
            cfg.flip_sin_to_cos,
            cfg.freq_shift,
        )
        .to_kind(kind);
        let mut emb = self.time_embedding.forward(&t_emb);
        match (&self.add, added) {
            (Some(add), Some((text_embeds, time_ids))) => {
                let te = text_embeds.size();
                let ti = time_ids.size();
                ensure!(te.len() == 2 && te[0] == b, "UNet forward: text_embeds must be [{b}, P], found {te:?}");
                ensure!(ti.len() == 2 && ti[0] == b, "UNet forward: time_ids must be [{b}, K], found {ti:?}");
                let tid = timestep_embedding(&time_ids.to_device(device).flatten(0, -1), add.time_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
                    .reshape([b, -1]);
                let add_in = Tensor::cat(&[text_embeds.to_device(device).to_kind(kind), tid.to_kind(kind)], -1);
                let want = cfg.projection_class_embeddings_input_dim.unwrap_or_default();
                ensure!(
                    add_in.size()[1] == want,
                    "UNet forward: text_embeds width {} + {} time ids x {} = {} does not match projection_class_embeddings_input_dim = {want}",
                    te[1],
                    ti[1],
                    add.time_dim,
                    add_in.size()[1]
                );
                emb = &emb + add.add_embedding.forward(&add_in);
            }
            (Some(_), None) => bail!("UNet forward: this UNet (addition_embed_type \"text_time\") needs text_embeds and time_ids"),
            (None, Some(_)) => bail!("UNet forward: text_embeds / time_ids were given, but the config has no addition_embed_type"),
            (None, None) => {}
        }
        let ctx = encoder_hidden_states.to_device(device).to_kind(kind);

        let x = if cfg.center_input_sample {
            sample * 2.0 - 1.0
        } else {
            sample.shallow_clone()
        };
        let mut h = self.conv_in.forward(&x);
        let mut skips = vec![h.shallow_clone()];
        for blk in &self.down_blocks {
            for (j, r) in blk.resnets.iter().enumerate() {
                h = resnet(r, &h, &emb)?;
                if let Some(a) = blk.attentions.get(j) {
                    h = attention(a, &h, &ctx)?;
                }
                skips.push(h.shallow_clone());
            }
            if let Some(d) = &blk.downsampler {
                h = d.forward(&h);
                skips.push(h.shallow_clone());
            }
        }

        h = resnet(&self.mid_block.resnets[0], &h, &emb)?;
        for (a, r) in self
            .mid_block
            .attentions
            .iter()
            .zip(&self.mid_block.resnets[1..])
        {
            h = resnet(r, &attention(a, &h, &ctx)?, &emb)?;
        }

        for blk in &self.up_blocks {
            for (j, r) in blk.resnets.iter().enumerate() {
                let skip = skips
                    .pop()
                    .context("UNet forward: skip connections exhausted")?;
                h = resnet(r, &Tensor::cat(&[&h, &skip], 1), &emb)?;
                if let Some(a) = blk.attentions.get(j) {
                    h = attention(a, &h, &ctx)?;
                }
            }
            if let Some(u) = &blk.upsampler {
                // Upsample to the size of the next skip connection (x2 unless the
                // input size was not a multiple of the total down-sampling factor).
                let size = skips.last().map(|t| {
                    let z = t.size();
                    (z[2], z[3])
                });
                h = u.forward(&h, size);
            }
        }
        let h = self.conv_norm_out.forward(&h).silu();
        Ok(self.conv_out.forward(&h))
    }
}

/// A resnet block, checkpointed inside a checkpointing scope (`models::checkpoint`).
fn resnet(r: &ResnetBlock2D, h: &Tensor, emb: &Tensor) -> Result<Tensor> {
    // SAFETY: the segment borrows only the block's weights, which belong to the
    // model and outlive the scope; the activations are passed as inputs.
    unsafe { checkpoint1(&[h, emb], move |xs| r.forward(&xs[0], Some(&xs[1]))) }
}

/// A transformer block (`Transformer2D`), checkpointed as [`resnet`].
fn attention(a: &Transformer2D, h: &Tensor, ctx: &Tensor) -> Result<Tensor> {
    // SAFETY: as in `resnet`.
    unsafe { checkpoint1(&[h, ctx], move |xs| a.forward(&xs[0], &xs[1])) }
}

/// A UNet with its variables, config and the original config JSON.
pub struct LoadedUNet {
    pub vs: nn::VarStore,
    pub model: UNet2DConditionModel,
    pub config: UNetConfig,
    /// The config JSON as read (written back unchanged by [`LoadedUNet::save_pretrained`]).
    pub raw_config: serde_json::Value,
}

const WEIGHT_STEM: &str = "diffusion_pytorch_model";

/// The weight files of a diffusers component folder: the plain files, or the fp16
/// variant (preferred when loading in half precision).
pub(crate) fn component_weight_files(dir: &Path, kind: Kind) -> Result<Vec<PathBuf>> {
    if kind == Kind::Half {
        weights::find_weight_files(dir, &[WEIGHT_STEM], Some("fp16"))
    } else {
        weights::find_weight_files(dir, &[WEIGHT_STEM], None).or_else(|e| {
            weights::find_weight_files(dir, &[WEIGHT_STEM], Some("fp16")).map_err(|_| e)
        })
    }
}

impl LoadedUNet {
    /// A randomly initialised UNet for `config` (trainable variables).
    pub fn from_config(config: &UNetConfig, device: Device, kind: Kind) -> Result<Self> {
        let mut vs = nn::VarStore::new(device);
        vs.set_kind(kind);
        let model = UNet2DConditionModel::new(&vs.root(), config)?;
        Ok(Self {
            vs,
            model,
            config: config.clone(),
            raw_config: config.to_value(),
        })
    }

    /// Load `config.json` and `diffusion_pytorch_model*.safetensors` from a diffusers
    /// `unet/` folder; the variables have `kind` and require grad.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let raw = crate::models::config::read_json(&cfg_path)?;
        let config =
            UNetConfig::from_value(&raw).with_context(|| format!("{}", cfg_path.display()))?;
        let mut vs = nn::VarStore::new(device);
        vs.set_kind(kind);
        let model = UNet2DConditionModel::new(&vs.root(), &config)
            .with_context(|| format!("{}", cfg_path.display()))?;
        let files = component_weight_files(dir, kind)?;
        weights::load_into(&mut vs, &files, &weights::LoadOptions::default())?;
        Ok(Self {
            vs,
            model,
            config,
            raw_config: raw,
        })
    }

    /// Write `config.json` (the original JSON) and `diffusion_pytorch_model.safetensors`
    /// (every variable under its diffusers name, converted to `kind`) into `dir`.
    pub fn save_pretrained(&self, dir: &Path, kind: Kind) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut text = serde_json::to_string_pretty(&self.raw_config)?;
        text.push('\n');
        weights::atomic_write(&dir.join("config.json"), text.as_bytes())?;
        weights::save_varstore(
            &self.vs,
            &dir.join(format!("{WEIGHT_STEM}.safetensors")),
            Some(kind),
        )
    }
}

/// `adt forward unet`: inputs `sample`, `timestep`, `encoder_hidden_states` (and
/// `text_embeds`, `time_ids` for SDXL); output `sample`.
pub fn run_forward(
    component: &str,
    model_dir: &Path,
    inputs: &HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    if component != "unet" {
        bail!("unknown UNet component {component:?} (expected \"unet\")");
    }
    let device = Device::cuda_if_available();
    let unet = LoadedUNet::load(model_dir, device, Kind::Float)?;
    let sample = input(inputs, "sample", component)?.to_device(device);
    let timestep = input(inputs, "timestep", component)?;
    let ehs = input(inputs, "encoder_hidden_states", component)?.to_device(device);
    let added = if unet.config.needs_added_cond() {
        Some((
            input(inputs, "text_embeds", component)?,
            input(inputs, "time_ids", component)?,
        ))
    } else {
        None
    };
    let out = tch::no_grad(|| unet.model.forward(&sample, timestep, &ehs, added))?;
    Ok(HashMap::from([(
        "sample".to_string(),
        out.to_device(Device::Cpu),
    )]))
}
