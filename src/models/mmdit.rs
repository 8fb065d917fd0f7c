//! The SD3 / SD3.5 MMDiT, diffusers' `SD3Transformer2DModel`, with the diffusers
//! tensor names.
//!
//! * `pos_embed`: a patch-size-stride convolution (`pos_embed.proj`) plus a stored 2-D
//!   sin-cos grid (`pos_embed.pos_embed`, `[1, M*M, D]` for `pos_embed_max_size` M),
//!   centre-cropped to the input's patch grid.
//! * `time_text_embed`: sinusoidal projection of the timestep (256 channels, cos
//!   first, no frequency shift) through `timestep_embedder`, plus the pooled text
//!   embedding through `text_embedder` (both linear, SiLU, linear).
//! * `context_embedder`: linear from `joint_attention_dim` to the model width.
//! * `transformer_blocks.i`: joint blocks. The image stream and the text stream have
//!   their own AdaLayerNormZero modulation (`norm1`, `norm1_context`), projections
//!   and feed-forwards (tanh GELU), and attend jointly over the concatenated
//!   `[image; text]` tokens. The last block is "context pre-only": its text stream
//!   gets the continuous AdaLayerNorm (`norm1_context`, scale then shift) and only
//!   provides keys and values; its text output is dropped.
//! * `norm_out` (continuous AdaLayerNorm) and `proj_out`, then unpatchify.
//!
//! `qk_norm = "rms_norm"` (SD3.5) adds RMSNorm per head on the queries and keys of
//! both streams (`attn.norm_q`, `norm_k`, `norm_added_q`, `norm_added_k`).
//!
//! SD3.5's MMDiT-X blocks (the indices in `dual_attention_layers`): `norm1` is
//! diffusers' `SD35AdaLayerNormZeroX`, nine modulation chunks (shift / scale / gate
//! of the joint attention, of the feed-forward, and of a second attention), and the
//! block has `attn2`, a self-attention over the image tokens only (same `qk_norm`,
//! `attn2.norm_q` / `norm_k`). Its input is the same layer-normed image stream as
//! the joint attention's, modulated with the second shift / scale; its output is
//! added with the second gate right after the joint attention's, before the
//! feed-forward.
//!
//! The timestep is a float `[B]` tensor of `sigma * 1000` (flow matching).

use crate::models::blocks::{linear, timestep_embedding, TimestepEmbedding};
use crate::models::checkpoint::checkpoint;
use crate::models::denoiser::{Cond, Denoiser};
use crate::models::forward_input as input;
use crate::models::lora::{lora_linear, LoraLinear};
use crate::models::master_copy::MasterCopy;
use crate::weights;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

fn d_sample() -> i64 {
    128
}
fn d_patch() -> i64 {
    2
}
fn d_sixteen() -> i64 {
    16
}
fn d_layers() -> i64 {
    18
}
fn d_head_dim() -> i64 {
    64
}
fn d_heads() -> i64 {
    18
}
fn d_joint() -> i64 {
    4096
}
fn d_caption() -> i64 {
    1152
}
fn d_pooled() -> i64 {
    2048
}
fn d_out() -> Option<i64> {
    Some(16)
}
fn d_max_size() -> Option<i64> {
    Some(96)
}

/// `config.json` of diffusers' `SD3Transformer2DModel` (defaults as in diffusers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sd3Config {
    #[serde(default = "d_sample")]
    pub sample_size: i64,
    #[serde(default = "d_patch")]
    pub patch_size: i64,
    #[serde(default = "d_sixteen")]
    pub in_channels: i64,
    #[serde(default = "d_layers")]
    pub num_layers: i64,
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: i64,
    #[serde(default = "d_heads")]
    pub num_attention_heads: i64,
    #[serde(default = "d_joint")]
    pub joint_attention_dim: i64,
    #[serde(default = "d_caption")]
    pub caption_projection_dim: i64,
    #[serde(default = "d_pooled")]
    pub pooled_projection_dim: i64,
    /// `null` means `in_channels`.
    #[serde(default = "d_out")]
    pub out_channels: Option<i64>,
    #[serde(default = "d_max_size")]
    pub pos_embed_max_size: Option<i64>,
    #[serde(default)]
    pub dual_attention_layers: Vec<i64>,
    #[serde(default)]
    pub qk_norm: Option<String>,
}

impl Sd3Config {
    /// Stable Diffusion 3 medium.
    pub fn medium() -> Self {
        Sd3Config {
            sample_size: 128,
            patch_size: 2,
            in_channels: 16,
            num_layers: 24,
            attention_head_dim: 64,
            num_attention_heads: 24,
            joint_attention_dim: 4096,
            caption_projection_dim: 1536,
            pooled_projection_dim: 2048,
            out_channels: Some(16),
            pos_embed_max_size: Some(192),
            dual_attention_layers: Vec::new(),
            qk_norm: None,
        }
    }

    /// A tiny model of the same architecture, for tests: width 32 (2 heads of 16),
    /// 2 blocks, 16 latent channels, an 8x8 stored position grid.
    pub fn tiny() -> Self {
        Sd3Config {
            sample_size: 8,
            patch_size: 2,
            in_channels: 16,
            num_layers: 2,
            attention_head_dim: 16,
            num_attention_heads: 2,
            joint_attention_dim: 32,
            caption_projection_dim: 32,
            pooled_projection_dim: 24,
            out_channels: Some(16),
            pos_embed_max_size: Some(8),
            dual_attention_layers: Vec::new(),
            qk_norm: None,
        }
    }

    /// The model width (`num_attention_heads * attention_head_dim`).
    pub fn inner_dim(&self) -> i64 {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> i64 {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// Parse a config JSON value and validate it.
    pub fn from_value(v: &serde_json::Value) -> Result<Self> {
        let cfg: Self = serde_path_to_error::deserialize(v.clone())
            .context("invalid SD3Transformer2DModel config")?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The config as diffusers writes it (with `_class_name`).
    pub fn to_value(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("Sd3Config serializes");
        v["_class_name"] = serde_json::Value::from("SD3Transformer2DModel");
        v["_diffusers_version"] = crate::models::config::DIFFUSERS_VERSION.into();
        v
    }

    /// Check that the config describes an architecture this implementation builds;
    /// errors name the field and the value.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("sample_size", self.sample_size),
            ("patch_size", self.patch_size),
            ("in_channels", self.in_channels),
            ("num_layers", self.num_layers),
            ("attention_head_dim", self.attention_head_dim),
            ("num_attention_heads", self.num_attention_heads),
            ("joint_attention_dim", self.joint_attention_dim),
            ("caption_projection_dim", self.caption_projection_dim),
            ("pooled_projection_dim", self.pooled_projection_dim),
            ("out_channels", self.out_channels()),
        ] {
            ensure!(
                v > 0,
                "SD3 transformer config field {name} = {v} must be positive"
            );
        }
        if let Some(bad) = self
            .dual_attention_layers
            .iter()
            .find(|&&i| i < 0 || i >= self.num_layers)
        {
            bail!(
                "SD3 transformer config field dual_attention_layers = {:?}: {bad} is not a block \
                 index (num_layers = {}, indices 0..{})",
                self.dual_attention_layers,
                self.num_layers,
                self.num_layers - 1
            );
        }
        match self.qk_norm.as_deref() {
            None | Some("rms_norm") => {}
            Some(other) => bail!(
                "SD3 transformer config field qk_norm = {other:?} is not supported \
                 (supported: null, \"rms_norm\")"
            ),
        }
        let max = match self.pos_embed_max_size {
            Some(m) => m,
            None => bail!(
                "SD3 transformer config field pos_embed_max_size = null is not supported \
                 (the stored, centre-cropped position grid is required)"
            ),
        };
        ensure!(
            max > 0,
            "SD3 transformer config field pos_embed_max_size = {max} must be positive"
        );
        let inner = self.inner_dim();
        ensure!(
            self.caption_projection_dim == inner,
            "SD3 transformer config: caption_projection_dim = {} must equal num_attention_heads * \
             attention_head_dim = {inner} (the text stream runs at the model width)",
            self.caption_projection_dim
        );
        ensure!(
            inner % 4 == 0,
            "SD3 transformer config: the model width {inner} must be divisible by 4 \
             (2-D sin-cos position embedding)"
        );
        Ok(())
    }
}

/// diffusers' `get_2d_sincos_pos_embed(dim, grid, base_size, interpolation_scale=1)`:
/// `[grid*grid, dim]`, row-major over (row, column); the first half of the channels
/// encodes the column coordinate, the second half the row coordinate, each as
/// `[sin, cos]` over frequencies `10000^(-i / (dim/4))`. Coordinates are
/// `index / (grid / base_size)` in float32, the embedding is computed in float64.
pub fn sincos_pos_embed_2d(dim: i64, grid: i64, base_size: i64) -> Tensor {
    let coords = (Tensor::arange(grid, (Kind::Float, Device::Cpu))
        / (grid as f64 / base_size as f64))
        .to_kind(Kind::Double);
    let quarter = dim / 4;
    let omega = Tensor::arange(quarter, (Kind::Double, Device::Cpu)) / (dim as f64 / 4.0);
    let omega = Tensor::from(10000.0f64).pow(&omega).reciprocal();
    let one_d = |pos: &Tensor| {
        let out = pos.reshape([-1]).outer(&omega);
        Tensor::cat(&[out.sin(), out.cos()], 1)
    };
    // Column coordinate of every (row, column) cell, then the row coordinate.
    let cols = coords.unsqueeze(0).expand([grid, grid], false);
    let rows = coords.unsqueeze(1).expand([grid, grid], false);
    Tensor::cat(&[one_d(&cols), one_d(&rows)], 1).to_kind(Kind::Float)
}

/// diffusers' `RMSNorm` with a weight: statistics in float32, the normalised values
/// are cast to the weight's kind when that is half / bfloat16.
#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(p: &nn::Path, dim: i64, eps: f64) -> Self {
        RmsNorm {
            weight: p.ones("weight", &[dim]),
            eps,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let var = x
            .to_kind(Kind::Float)
            .square()
            .mean_dim(-1, true, Kind::Float);
        let mut y = x * (var + self.eps).rsqrt();
        if matches!(self.weight.kind(), Kind::Half | Kind::BFloat16) {
            y = y.to_kind(self.weight.kind());
        }
        (y * &self.weight).to_kind(x.kind())
    }
}

/// A layer norm without affine parameters (eps 1e-6), as the MMDiT uses everywhere.
fn plain_norm(x: &Tensor, dim: i64) -> Tensor {
    x.layer_norm([dim], None::<Tensor>, None::<Tensor>, 1e-6, true)
}

/// `x * (1 + scale) + shift` with per-sample `[B, D]` modulation.
fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Tensor {
    x * (scale.unsqueeze(1) + 1.0) + shift.unsqueeze(1)
}

/// diffusers' `AdaLayerNormZero`: `linear(silu(temb))` split into shift / scale /
/// gate for attention and for the feed-forward. With `dual` it is SD3.5's
/// `SD35AdaLayerNormZeroX`: three more chunks (shift / scale / gate of the second
/// attention), the second shift / scale applied to the same layer-normed input.
#[derive(Debug)]
struct AdaNormZero {
    linear: nn::Linear,
    dim: i64,
    dual: bool,
}

struct Modulation {
    gate_msa: Tensor,
    shift_mlp: Tensor,
    scale_mlp: Tensor,
    gate_mlp: Tensor,
    /// `SD35AdaLayerNormZeroX` only: the input of the second attention and its gate.
    second: Option<(Tensor, Tensor)>,
}

impl AdaNormZero {
    fn new(p: &nn::Path, dim: i64, dual: bool) -> Self {
        let chunks = if dual { 9 } else { 6 };
        AdaNormZero {
            linear: linear(&(p / "linear"), dim, chunks * dim, true),
            dim,
            dual,
        }
    }

    fn forward(&self, x: &Tensor, temb: &Tensor) -> (Tensor, Modulation) {
        let chunks = if self.dual { 9 } else { 6 };
        let e = self.linear.forward(&temb.silu()).chunk(chunks, 1);
        let base = plain_norm(x, self.dim);
        let normed = modulate(&base, &e[0], &e[1]);
        let second = self
            .dual
            .then(|| (modulate(&base, &e[6], &e[7]), e[8].shallow_clone()));
        (
            normed,
            Modulation {
                gate_msa: e[2].shallow_clone(),
                shift_mlp: e[3].shallow_clone(),
                scale_mlp: e[4].shallow_clone(),
                gate_mlp: e[5].shallow_clone(),
                second,
            },
        )
    }
}

/// diffusers' `AdaLayerNormContinuous` (layer norm, no affine): `linear(silu(temb))`
/// split into scale, then shift.
#[derive(Debug)]
struct AdaNormContinuous {
    linear: nn::Linear,
    dim: i64,
}

impl AdaNormContinuous {
    fn new(p: &nn::Path, dim: i64, cond_dim: i64) -> Self {
        AdaNormContinuous {
            linear: linear(&(p / "linear"), cond_dim, 2 * dim, true),
            dim,
        }
    }

    fn forward(&self, x: &Tensor, temb: &Tensor) -> Tensor {
        let e = self
            .linear
            .forward(&temb.silu().to_kind(x.kind()))
            .chunk(2, 1);
        modulate(&plain_norm(x, self.dim), &e[1], &e[0])
    }
}

/// diffusers' `FeedForward` with `gelu-approximate`: `net.0.proj`, tanh GELU, `net.2`.
#[derive(Debug)]
struct FeedForward {
    proj: LoraLinear,
    out: LoraLinear,
}

impl FeedForward {
    fn new(p: &nn::Path, dim: i64) -> Self {
        FeedForward {
            proj: lora_linear(&(p / "net" / "0" / "proj"), dim, 4 * dim, true),
            out: lora_linear(&(p / "net" / "2"), 4 * dim, dim, true),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        self.out.forward(&self.proj.forward(x).gelu("tanh"))
    }
}

/// The optional per-head RMSNorms of `qk_norm = "rms_norm"`.
#[derive(Debug)]
struct QkNorms {
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    norm_added_q: RmsNorm,
    norm_added_k: RmsNorm,
}

/// diffusers' `Attention` with `added_kv_proj_dim` and the joint processor.
#[derive(Debug)]
struct JointAttention {
    to_q: LoraLinear,
    to_k: LoraLinear,
    to_v: LoraLinear,
    add_q_proj: LoraLinear,
    add_k_proj: LoraLinear,
    add_v_proj: LoraLinear,
    to_out: LoraLinear,
    /// Absent in the context-pre-only block.
    to_add_out: Option<LoraLinear>,
    norms: Option<QkNorms>,
    heads: i64,
    head_dim: i64,
}

impl JointAttention {
    fn new(
        p: &nn::Path,
        dim: i64,
        heads: i64,
        head_dim: i64,
        pre_only: bool,
        qk_norm: bool,
    ) -> Self {
        let inner = heads * head_dim;
        let norms = qk_norm.then(|| QkNorms {
            norm_q: RmsNorm::new(&(p / "norm_q"), head_dim, 1e-6),
            norm_k: RmsNorm::new(&(p / "norm_k"), head_dim, 1e-6),
            norm_added_q: RmsNorm::new(&(p / "norm_added_q"), head_dim, 1e-6),
            norm_added_k: RmsNorm::new(&(p / "norm_added_k"), head_dim, 1e-6),
        });
        JointAttention {
            to_q: lora_linear(&(p / "to_q"), dim, inner, true),
            to_k: lora_linear(&(p / "to_k"), dim, inner, true),
            to_v: lora_linear(&(p / "to_v"), dim, inner, true),
            add_q_proj: lora_linear(&(p / "add_q_proj"), dim, inner, true),
            add_k_proj: lora_linear(&(p / "add_k_proj"), dim, inner, true),
            add_v_proj: lora_linear(&(p / "add_v_proj"), dim, inner, true),
            to_out: lora_linear(&(p / "to_out" / "0"), inner, dim, true),
            to_add_out: (!pre_only).then(|| lora_linear(&(p / "to_add_out"), inner, dim, true)),
            norms,
            heads,
            head_dim,
        }
    }

    fn heads(&self, t: Tensor) -> Tensor {
        let (b, n, _) = t.size3().expect("token states are [B, N, D]");
        t.view([b, n, self.heads, self.head_dim]).transpose(1, 2)
    }

    /// Joint attention of image tokens `x` `[B, N, D]` and text tokens `c` `[B, L, D]`.
    /// Returns the image output and, unless context-pre-only, the text output. In the
    /// pre-only block the text tokens only give keys and values: their queries would
    /// produce the text output that diffusers computes and discards, so they are
    /// skipped (`add_q_proj` / `norm_added_q` of that block get no gradient, as in
    /// diffusers).
    fn forward(&self, x: &Tensor, c: &Tensor) -> (Tensor, Option<Tensor>) {
        let (b, n, _) = x.size3().expect("image tokens are [B, N, D]");
        let mut q = self.heads(self.to_q.forward(x));
        let mut k = self.heads(self.to_k.forward(x));
        let v = self.heads(self.to_v.forward(x));
        let mut ck = self.heads(self.add_k_proj.forward(c));
        let cv = self.heads(self.add_v_proj.forward(c));
        let pre_only = self.to_add_out.is_none();
        let mut cq = (!pre_only).then(|| self.heads(self.add_q_proj.forward(c)));
        if let Some(nrm) = &self.norms {
            q = nrm.norm_q.forward(&q);
            k = nrm.norm_k.forward(&k);
            ck = nrm.norm_added_k.forward(&ck);
            cq = cq.map(|t| nrm.norm_added_q.forward(&t));
        }
        let query = match &cq {
            Some(cq) => Tensor::cat(&[&q, cq], 2),
            None => q,
        };
        let key = Tensor::cat(&[k, ck], 2);
        let value = Tensor::cat(&[v, cv], 2);
        let out = Tensor::scaled_dot_product_attention::<Tensor>(
            &query, &key, &value, None, 0.0, false, None, false,
        );
        let nq = out.size()[2];
        let out = out
            .transpose(1, 2)
            .reshape([b, nq, self.heads * self.head_dim]);
        let x_out = self.to_out.forward(&out.narrow(1, 0, n));
        let c_out = self
            .to_add_out
            .as_ref()
            .map(|proj| proj.forward(&out.narrow(1, n, nq - n)));
        (x_out, c_out)
    }
}

/// diffusers' `Attention` without added projections (the MMDiT-X block's `attn2`):
/// self-attention over the image tokens, with the per-head RMSNorms of
/// `qk_norm = "rms_norm"` (`norm_q`, `norm_k`).
#[derive(Debug)]
struct SelfAttention {
    to_q: LoraLinear,
    to_k: LoraLinear,
    to_v: LoraLinear,
    to_out: LoraLinear,
    norms: Option<(RmsNorm, RmsNorm)>,
    heads: i64,
    head_dim: i64,
}

impl SelfAttention {
    fn new(p: &nn::Path, dim: i64, heads: i64, head_dim: i64, qk_norm: bool) -> Self {
        let inner = heads * head_dim;
        SelfAttention {
            to_q: lora_linear(&(p / "to_q"), dim, inner, true),
            to_k: lora_linear(&(p / "to_k"), dim, inner, true),
            to_v: lora_linear(&(p / "to_v"), dim, inner, true),
            to_out: lora_linear(&(p / "to_out" / "0"), inner, dim, true),
            norms: qk_norm.then(|| {
                (
                    RmsNorm::new(&(p / "norm_q"), head_dim, 1e-6),
                    RmsNorm::new(&(p / "norm_k"), head_dim, 1e-6),
                )
            }),
            heads,
            head_dim,
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, n, _) = x.size3().expect("image tokens are [B, N, D]");
        let split = |t: Tensor| t.view([b, n, self.heads, self.head_dim]).transpose(1, 2);
        let mut q = split(self.to_q.forward(x));
        let mut k = split(self.to_k.forward(x));
        let v = split(self.to_v.forward(x));
        if let Some((nq, nk)) = &self.norms {
            q = nq.forward(&q);
            k = nk.forward(&k);
        }
        let out = Tensor::scaled_dot_product_attention::<Tensor>(
            &q, &k, &v, None, 0.0, false, None, false,
        );
        self.to_out.forward(
            &out.transpose(1, 2)
                .reshape([b, n, self.heads * self.head_dim]),
        )
    }
}

/// The text stream's modulation: AdaLayerNormZero, or continuous in the last block.
#[derive(Debug)]
enum ContextNorm {
    Zero(AdaNormZero),
    Continuous(AdaNormContinuous),
}

/// diffusers' `JointTransformerBlock` (with `use_dual_attention`: the MMDiT-X
/// block, `norm1` with nine chunks and `attn2`).
#[derive(Debug)]
struct JointBlock {
    norm1: AdaNormZero,
    norm1_context: ContextNorm,
    attn: JointAttention,
    /// The image-only second attention of an MMDiT-X block.
    attn2: Option<SelfAttention>,
    ff: FeedForward,
    /// Absent in the context-pre-only block.
    ff_context: Option<FeedForward>,
    dim: i64,
}

impl JointBlock {
    fn new(p: &nn::Path, cfg: &Sd3Config, pre_only: bool, dual: bool) -> Self {
        let dim = cfg.inner_dim();
        let norm1_context = if pre_only {
            ContextNorm::Continuous(AdaNormContinuous::new(&(p / "norm1_context"), dim, dim))
        } else {
            ContextNorm::Zero(AdaNormZero::new(&(p / "norm1_context"), dim, false))
        };
        JointBlock {
            norm1: AdaNormZero::new(&(p / "norm1"), dim, dual),
            norm1_context,
            attn: JointAttention::new(
                &(p / "attn"),
                dim,
                cfg.num_attention_heads,
                cfg.attention_head_dim,
                pre_only,
                cfg.qk_norm.is_some(),
            ),
            attn2: dual.then(|| {
                SelfAttention::new(
                    &(p / "attn2"),
                    dim,
                    cfg.num_attention_heads,
                    cfg.attention_head_dim,
                    cfg.qk_norm.is_some(),
                )
            }),
            ff: FeedForward::new(&(p / "ff"), dim),
            ff_context: (!pre_only).then(|| FeedForward::new(&(p / "ff_context"), dim)),
            dim,
        }
    }

    /// Returns the new `(context, x)`; the context is `None` after the pre-only block.
    fn forward(&self, x: &Tensor, c: &Tensor, temb: &Tensor) -> (Option<Tensor>, Tensor) {
        let (nx, m) = self.norm1.forward(x, temb);
        let (nc, cm) = match &self.norm1_context {
            ContextNorm::Zero(z) => {
                let (nc, cm) = z.forward(c, temb);
                (nc, Some(cm))
            }
            ContextNorm::Continuous(a) => (a.forward(c, temb), None),
        };
        let (attn_x, attn_c) = self.attn.forward(&nx, &nc);
        let mut x = x + m.gate_msa.unsqueeze(1) * attn_x;
        if let (Some(attn2), Some((nx2, gate2))) = (&self.attn2, &m.second) {
            x += gate2.unsqueeze(1) * attn2.forward(nx2);
        }
        let h = modulate(&plain_norm(&x, self.dim), &m.shift_mlp, &m.scale_mlp);
        let x = &x + m.gate_mlp.unsqueeze(1) * self.ff.forward(&h);
        let c = match (cm, attn_c, &self.ff_context) {
            (Some(cm), Some(attn_c), Some(ff_c)) => {
                let c = c + cm.gate_msa.unsqueeze(1) * attn_c;
                let h = modulate(&plain_norm(&c, self.dim), &cm.shift_mlp, &cm.scale_mlp);
                Some(&c + cm.gate_mlp.unsqueeze(1) * ff_c.forward(&h))
            }
            _ => None,
        };
        (c, x)
    }
}

/// diffusers' `SD3Transformer2DModel`.
#[derive(Debug)]
pub struct SD3Transformer2DModel {
    proj: nn::Conv2D,
    /// `[1, M*M, D]`, not trainable (a buffer in diffusers, stored in the checkpoint).
    pos_embed: Tensor,
    timestep_embedder: TimestepEmbedding,
    text_embedder: TimestepEmbedding,
    context_embedder: nn::Linear,
    blocks: Vec<JointBlock>,
    norm_out: AdaNormContinuous,
    proj_out: nn::Linear,
    config: Sd3Config,
    /// The linear layers that can carry a LoRA adapter.
    pub lora: crate::models::lora::LoraSlots,
}

impl SD3Transformer2DModel {
    /// The dtype of the (base) weights, which the forward pass computes in.
    pub fn weight_kind(&self) -> Kind {
        self.proj_out.ws.kind()
    }

    /// Build the variables under `p` with diffusers' names. The position grid is
    /// initialised to diffusers' sin-cos values (the checkpoint's copy replaces it on
    /// loading) and is not trainable.
    pub fn new(p: &nn::Path, cfg: &Sd3Config) -> Result<Self> {
        let (model, slots) = crate::models::lora::collect(|| Self::build(p, cfg));
        let mut model = model?;
        model.lora = slots;
        Ok(model)
    }

    fn build(p: &nn::Path, cfg: &Sd3Config) -> Result<Self> {
        cfg.validate()?;
        let dim = cfg.inner_dim();
        let max = cfg.pos_embed_max_size.expect("validated");
        let pe = p / "pos_embed";
        let proj = nn::conv2d(
            &pe / "proj",
            cfg.in_channels,
            dim,
            cfg.patch_size,
            nn::ConvConfig {
                stride: cfg.patch_size,
                ..Default::default()
            },
        );
        let pos_embed = pe.zeros_no_train("pos_embed", &[1, max * max, dim]);
        tch::no_grad(|| {
            let grid = sincos_pos_embed_2d(dim, max, cfg.sample_size / cfg.patch_size);
            pos_embed.shallow_clone().copy_(
                &grid
                    .unsqueeze(0)
                    .to_kind(pos_embed.kind())
                    .to_device(pos_embed.device()),
            );
        });
        let tt = p / "time_text_embed";
        let blocks = (0..cfg.num_layers)
            .map(|i| {
                JointBlock::new(
                    &(p / "transformer_blocks" / i),
                    cfg,
                    i == cfg.num_layers - 1,
                    cfg.dual_attention_layers.contains(&i),
                )
            })
            .collect();
        Ok(SD3Transformer2DModel {
            proj,
            pos_embed,
            timestep_embedder: TimestepEmbedding::new(&(&tt / "timestep_embedder"), 256, dim),
            text_embedder: TimestepEmbedding::new(
                &(&tt / "text_embedder"),
                cfg.pooled_projection_dim,
                dim,
            ),
            context_embedder: linear(
                &(p / "context_embedder"),
                cfg.joint_attention_dim,
                dim,
                true,
            ),
            blocks,
            norm_out: AdaNormContinuous::new(&(p / "norm_out"), dim, dim),
            proj_out: linear(
                &(p / "proj_out"),
                dim,
                cfg.patch_size * cfg.patch_size * cfg.out_channels(),
                true,
            ),
            config: cfg.clone(),
            lora: Default::default(),
        })
    }

    pub fn config(&self) -> &Sd3Config {
        &self.config
    }

    /// The stored position grid centre-cropped to `h x w` patches: `[1, h*w, D]`.
    fn cropped_pos_embed(&self, h: i64, w: i64) -> Result<Tensor> {
        let max = self.config.pos_embed_max_size.expect("validated");
        ensure!(
            h <= max && w <= max,
            "SD3 transformer: the latent's patch grid {h}x{w} exceeds pos_embed_max_size {max} \
             (latent at most {} x {})",
            max * self.config.patch_size,
            max * self.config.patch_size
        );
        let (top, left) = ((max - h) / 2, (max - w) / 2);
        let dim = self.config.inner_dim();
        Ok(self
            .pos_embed
            .view([1, max, max, dim])
            .narrow(1, top, h)
            .narrow(2, left, w)
            .reshape([1, h * w, dim]))
    }

    /// `hidden_states` `[B, C_in, H, W]` (H, W multiples of the patch size),
    /// `encoder_hidden_states` `[B, L, joint_attention_dim]`, `pooled_projections`
    /// `[B, pooled_projection_dim]`, `timestep` `[B]` or scalar (float, `sigma * 1000`).
    /// Returns `[B, out_channels, H, W]`.
    pub fn forward(
        &self,
        hidden_states: &Tensor,
        encoder_hidden_states: &Tensor,
        pooled_projections: &Tensor,
        timestep: &Tensor,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let device = self.pos_embed.device();
        let kind = self.proj_out.ws.kind();
        let dims = hidden_states.size();
        ensure!(
            dims.len() == 4 && dims[1] == cfg.in_channels,
            "SD3 transformer: hidden_states must be [B, {}, H, W], got {dims:?}",
            cfg.in_channels
        );
        let (b, hh, ww) = (dims[0], dims[2], dims[3]);
        let p = cfg.patch_size;
        ensure!(
            hh % p == 0 && ww % p == 0,
            "SD3 transformer: hidden_states height and width ({hh}x{ww}) must be multiples of \
             the patch size {p}"
        );
        let e = encoder_hidden_states.size();
        ensure!(
            e.len() == 3 && e[0] == b && e[2] == cfg.joint_attention_dim,
            "SD3 transformer: encoder_hidden_states must be [{b}, L, {}], got {e:?}",
            cfg.joint_attention_dim
        );
        ensure!(
            pooled_projections.size() == [b, cfg.pooled_projection_dim],
            "SD3 transformer: pooled_projections must be [{b}, {}], got {:?}",
            cfg.pooled_projection_dim,
            pooled_projections.size()
        );
        let t = match timestep.size().as_slice() {
            [] => timestep.reshape([1]).expand([b], false),
            [n] if *n == b => timestep.shallow_clone(),
            [1] => timestep.expand([b], false),
            other => bail!("SD3 transformer: timestep must be a scalar or [{b}], got {other:?}"),
        };
        let (h, w) = (hh / p, ww / p);
        let x = self
            .proj
            .forward(&hidden_states.to_device(device).to_kind(kind))
            .flatten(2, 3)
            .transpose(1, 2);
        let x = x + self.cropped_pos_embed(h, w)?.to_kind(kind);
        let pooled = pooled_projections.to_device(device).to_kind(kind);
        let t_proj = timestep_embedding(&t.to_device(device), 256, true, 0.0).to_kind(kind);
        let temb = self.timestep_embedder.forward(&t_proj) + self.text_embedder.forward(&pooled);
        let mut c = self
            .context_embedder
            .forward(&encoder_hidden_states.to_device(device).to_kind(kind));
        let mut x = x;
        for block in &self.blocks {
            // Checkpointed inside a checkpointing scope (`models::checkpoint`).
            // SAFETY: the segment borrows only the block's weights, which belong to
            // the model and outlive the scope; the activations are inputs.
            let mut out = unsafe {
                checkpoint(&[&x, &c, &temb], move |xs| {
                    let (nc, nx) = block.forward(&xs[0], &xs[1], &xs[2]);
                    Ok(match nc {
                        Some(nc) => vec![nx, nc],
                        None => vec![nx],
                    })
                })?
            };
            if out.len() == 2 {
                c = out.pop().context("MMDiT block: no context output")?;
            }
            x = out.pop().context("MMDiT block: no output")?;
        }
        let x = self.proj_out.forward(&self.norm_out.forward(&x, &temb));
        let co = cfg.out_channels();
        Ok(x.reshape([b, h, w, p, p, co])
            .permute([0, 5, 1, 3, 2, 4])
            .reshape([b, co, h * p, w * p]))
    }
}

/// The MMDiT as a flow-matching denoiser: context = `encoder_hidden_states`, pooled =
/// `pooled_projections` (required), `t` = `sigma * 1000`.
impl Denoiser for SD3Transformer2DModel {
    fn predict(&self, x: &Tensor, t: &Tensor, cond: &Cond) -> Result<Tensor> {
        let pooled = cond
            .pooled
            .as_ref()
            .context("SD3 transformer: the conditioning has no pooled text embedding")?;
        self.forward(x, &cond.context, pooled, t)
    }
}

/// A gradient-free copy of an SD3 transformer in a reduced precision (bfloat16), for
/// the sampled trajectory of ADT (`train.bf16_trajectory`): the float32 master
/// weights stay with the optimiser and the recomputed kept steps. The copy follows
/// the master weights through their version counters (an optimiser step marks it
/// stale; [`Sd3TrajectoryCopy::sync`] refreshes it). Inputs are cast to the copy's
/// dtype and outputs back to the input's dtype.
pub struct Sd3TrajectoryCopy {
    _vs: nn::VarStore,
    model: SD3Transformer2DModel,
    weights: MasterCopy,
}

impl Sd3TrajectoryCopy {
    /// A copy of `master` in `kind`, on the master's device, refreshed once.
    pub fn new(master: &LoadedSd3Transformer, kind: Kind) -> Result<Self> {
        let mut vs = nn::VarStore::new(master.vs.device());
        let model = SD3Transformer2DModel::new(&vs.root(), &master.config)?;
        model.lora.attach_like(&vs.root(), &master.model.lora)?;
        vs.set_kind(kind);
        vs.freeze();
        let copies = vs.variables();
        let mut pairs = Vec::new();
        for (name, m) in master.vs.variables() {
            let c = copies
                .get(&name)
                .with_context(|| format!("SD3 trajectory copy: no variable {name}"))?;
            pairs.push((name, m, c.shallow_clone()));
        }
        Ok(Sd3TrajectoryCopy {
            _vs: vs,
            model,
            weights: MasterCopy::new(pairs),
        })
    }

    /// The dtype of the copy.
    pub fn kind(&self) -> Kind {
        self.model.proj_out.ws.kind()
    }

    /// The copied weights (which follow the master weights: see [`MasterCopy`]).
    pub fn weights(&self) -> &MasterCopy {
        &self.weights
    }

    pub fn weights_mut(&mut self) -> &mut MasterCopy {
        &mut self.weights
    }

    /// Refresh the copy if the master weights changed; returns whether it did.
    pub fn sync(&mut self) -> bool {
        self.weights.sync()
    }
}

/// Without gradient, in the copy's dtype; the output in the dtype of `x`.
impl Denoiser for Sd3TrajectoryCopy {
    fn predict(&self, x: &Tensor, t: &Tensor, cond: &Cond) -> Result<Tensor> {
        let pooled = cond
            .pooled
            .as_ref()
            .context("SD3 transformer: the conditioning has no pooled text embedding")?;
        let out = tch::no_grad(|| self.model.forward(x, &cond.context, pooled, t))?;
        Ok(out.to_kind(x.kind()))
    }
}

/// An SD3 transformer with its variables, config and the original config JSON.
pub struct LoadedSd3Transformer {
    pub vs: nn::VarStore,
    pub model: SD3Transformer2DModel,
    pub config: Sd3Config,
    /// The config JSON as read (written back unchanged by `save_pretrained`).
    pub raw_config: serde_json::Value,
}

const WEIGHT_STEM: &str = "diffusion_pytorch_model";

impl LoadedSd3Transformer {
    /// A randomly initialised model for `config` (trainable variables).
    pub fn from_config(config: &Sd3Config, device: Device, kind: Kind) -> Result<Self> {
        let mut vs = nn::VarStore::new(device);
        let model = SD3Transformer2DModel::new(&vs.root(), config)?;
        vs.set_kind(kind);
        Ok(Self {
            vs,
            model,
            config: config.clone(),
            raw_config: config.to_value(),
        })
    }

    /// Load `config.json` and `diffusion_pytorch_model*.safetensors` from a diffusers
    /// `transformer/` folder; the variables have `kind` and (except the position
    /// grid) require grad.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let raw = crate::models::config::read_json(&cfg_path)?;
        let config =
            Sd3Config::from_value(&raw).with_context(|| format!("{}", cfg_path.display()))?;
        let mut vs = nn::VarStore::new(device);
        let model = SD3Transformer2DModel::new(&vs.root(), &config)
            .with_context(|| format!("{}", cfg_path.display()))?;
        vs.set_kind(kind);
        let files = crate::models::unet::component_weight_files(dir, kind)?;
        weights::load_into(&mut vs, &files, &weights::LoadOptions::default())?;
        Ok(Self {
            vs,
            model,
            config,
            raw_config: raw,
        })
    }

    /// Write `config.json` (the original JSON) and `diffusion_pytorch_model.safetensors`
    /// (every variable, the position grid included, under its diffusers name,
    /// converted to `kind`) into `dir`, each atomically.
    pub fn save_pretrained(&self, dir: &Path, kind: Kind) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut text = serde_json::to_string_pretty(&self.raw_config)?;
        text.push('\n');
        weights::atomic_write(&dir.join("config.json"), text.as_bytes())?;
        let mut vars: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        weights::save_safetensors(
            &vars,
            &dir.join(format!("{WEIGHT_STEM}.safetensors")),
            Some(kind),
            Some(HashMap::from([("format".to_string(), "pt".to_string())])),
        )
    }
}

/// `adt forward sd3-transformer`: inputs `hidden_states`, `encoder_hidden_states`,
/// `pooled_projections`, `timestep`; output `sample`. Float32, on the GPU when there
/// is one.
pub fn run_forward(
    component: &str,
    model_dir: &Path,
    inputs: &HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    if component != "sd3-transformer" {
        bail!("unknown SD3 component {component:?} (expected \"sd3-transformer\")");
    }
    let hs = input(inputs, "hidden_states", component)?;
    let ehs = input(inputs, "encoder_hidden_states", component)?;
    let pooled = input(inputs, "pooled_projections", component)?;
    let t = input(inputs, "timestep", component)?;
    let device = Device::cuda_if_available();
    let loaded = LoadedSd3Transformer::load(model_dir, device, Kind::Float)?;
    let out = tch::no_grad(|| loaded.model.forward(hs, ehs, pooled, t))?;
    Ok(HashMap::from([(
        "sample".to_string(),
        out.to_device(Device::Cpu),
    )]))
}
