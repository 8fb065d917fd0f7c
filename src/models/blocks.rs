//! Building blocks shared by the UNet and the VAE, with the diffusers tensor names:
//! group norm, `ResnetBlock2D` (with an optional time embedding), `Downsample2D`,
//! `Upsample2D`, the `Attention` module (`to_q` / `to_k` / `to_v` / `to_out.0`), the
//! GEGLU feed-forward, the VAE's spatial self-attention and the sinusoidal timestep
//! embedding.

use anyhow::{bail, Result};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use crate::models::lora::{lora_linear, LoraLinear};

/// A `torch.nn.GroupNorm` with affine parameters (`weight`, `bias`).
/// `x` ([B, C, H, W]) laid out channels-last (NHWC strides; same shape and values).
/// libtorch's CPU depthwise convolutions run about a third faster on it than on NCHW
/// (EfficientNet inputs in the discriminator and the evaluation); also the layout of
/// `train.channels_last`.
pub fn channels_last(x: &Tensor) -> Tensor {
    x.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

pub fn group_norm(p: &nn::Path, groups: i64, channels: i64, eps: f64) -> Result<nn::GroupNorm> {
    if groups <= 0 || channels % groups != 0 {
        bail!(
            "{}: group norm over {channels} channels needs a group count dividing it, found {groups}",
            p.components().collect::<Vec<_>>().join(".")
        );
    }
    Ok(nn::group_norm(
        p,
        groups,
        channels,
        nn::GroupNormConfig {
            eps,
            ..Default::default()
        },
    ))
}

/// A `torch.nn.LayerNorm` over the last dimension with affine parameters.
pub fn layer_norm(p: &nn::Path, dim: i64, eps: f64) -> nn::LayerNorm {
    nn::layer_norm(
        p,
        vec![dim],
        nn::LayerNormConfig {
            eps,
            ..Default::default()
        },
    )
}

/// A 2-D convolution with stride 1 and "same" padding for an odd kernel.
pub fn conv2d(p: &nn::Path, c_in: i64, c_out: i64, kernel: i64) -> nn::Conv2D {
    nn::conv2d(
        p,
        c_in,
        c_out,
        kernel,
        nn::ConvConfig {
            padding: (kernel - 1) / 2,
            ..Default::default()
        },
    )
}

/// A linear layer, with or without bias.
pub fn linear(p: &nn::Path, d_in: i64, d_out: i64, bias: bool) -> nn::Linear {
    nn::linear(
        p,
        d_in,
        d_out,
        nn::LinearConfig {
            bias,
            ..Default::default()
        },
    )
}

/// The sinusoidal embedding of diffusers' `get_timestep_embedding` (scale 1, max period
/// 10000): frequencies `exp(-ln(10000) * i / (half - shift))`, `[sin, cos]` (or
/// `[cos, sin]` with `flip_sin_to_cos`), zero-padded for an odd `dim`. `t` is a 1-D
/// tensor of any numeric kind; the result is float32 `[N, dim]` on `t`'s device.
pub fn timestep_embedding(t: &Tensor, dim: i64, flip_sin_to_cos: bool, shift: f64) -> Tensor {
    let half = dim / 2;
    let device = t.device();
    let exponent =
        Tensor::arange(half, (Kind::Float, device)) * (-(10000f64.ln())) / (half as f64 - shift);
    let freqs = exponent.exp();
    let args = t.to_kind(Kind::Float).unsqueeze(1) * freqs.unsqueeze(0);
    let (sin, cos) = (args.sin(), args.cos());
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], -1)
    } else {
        Tensor::cat(&[sin, cos], -1)
    };
    if dim % 2 == 1 {
        emb.constant_pad_nd([0, 1])
    } else {
        emb
    }
}

/// diffusers' `TimestepEmbedding`: `linear_1`, SiLU, `linear_2`.
#[derive(Debug)]
pub struct TimestepEmbedding {
    linear_1: nn::Linear,
    linear_2: nn::Linear,
}

impl TimestepEmbedding {
    pub fn new(p: &nn::Path, in_dim: i64, out_dim: i64) -> Self {
        Self {
            linear_1: linear(&(p / "linear_1"), in_dim, out_dim, true),
            linear_2: linear(&(p / "linear_2"), out_dim, out_dim, true),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.linear_2.forward(&self.linear_1.forward(x).silu())
    }
}

/// diffusers' `ResnetBlock2D` with `time_embedding_norm = "default"`, SiLU, no dropout,
/// output scale factor 1 and a 1x1 `conv_shortcut` when the channel count changes.
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: nn::GroupNorm,
    conv1: nn::Conv2D,
    time_emb_proj: Option<nn::Linear>,
    norm2: nn::GroupNorm,
    conv2: nn::Conv2D,
    conv_shortcut: Option<nn::Conv2D>,
}

impl ResnetBlock2D {
    /// `temb_channels`: the time-embedding width, or `None` for the VAE's blocks.
    pub fn new(
        p: &nn::Path,
        c_in: i64,
        c_out: i64,
        temb_channels: Option<i64>,
        groups: i64,
        eps: f64,
    ) -> Result<Self> {
        Ok(Self {
            norm1: group_norm(&(p / "norm1"), groups, c_in, eps)?,
            conv1: conv2d(&(p / "conv1"), c_in, c_out, 3),
            time_emb_proj: temb_channels.map(|t| linear(&(p / "time_emb_proj"), t, c_out, true)),
            norm2: group_norm(&(p / "norm2"), groups, c_out, eps)?,
            conv2: conv2d(&(p / "conv2"), c_out, c_out, 3),
            conv_shortcut: (c_in != c_out).then(|| conv2d(&(p / "conv_shortcut"), c_in, c_out, 1)),
        })
    }

    /// `x`: `[B, C_in, H, W]`; `temb`: `[B, T]` when the block has a time projection.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Tensor {
        let mut h = self.conv1.forward(&self.norm1.forward(x).silu());
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            h = &h + proj.forward(&temb.silu()).unsqueeze(-1).unsqueeze(-1);
        }
        let h = self.conv2.forward(&self.norm2.forward(&h).silu());
        match &self.conv_shortcut {
            Some(c) => c.forward(x) + h,
            None => x + h,
        }
    }
}

/// diffusers' `Downsample2D` with a 3x3 stride-2 convolution (`conv`). With padding 0
/// (the VAE) the input is first padded by one zero row / column at the bottom / right.
#[derive(Debug)]
pub struct Downsample2D {
    conv: nn::Conv2D,
    pad_right_bottom: bool,
}

impl Downsample2D {
    pub fn new(p: &nn::Path, channels: i64, padding: i64) -> Result<Self> {
        if padding != 0 && padding != 1 {
            bail!("Downsample2D: padding must be 0 or 1, found {padding}");
        }
        let conv = nn::conv2d(
            &(p / "conv"),
            channels,
            channels,
            3,
            nn::ConvConfig {
                stride: 2,
                padding,
                ..Default::default()
            },
        );
        Ok(Self {
            conv,
            pad_right_bottom: padding == 0,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        if self.pad_right_bottom {
            self.conv.forward(&x.constant_pad_nd([0, 1, 0, 1]))
        } else {
            self.conv.forward(x)
        }
    }
}

/// diffusers' `Upsample2D`: nearest-neighbour upsampling (x2 or to a given size),
/// then a 3x3 convolution (`conv`).
#[derive(Debug)]
pub struct Upsample2D {
    conv: nn::Conv2D,
}

impl Upsample2D {
    pub fn new(p: &nn::Path, channels: i64) -> Self {
        Self {
            conv: conv2d(&(p / "conv"), channels, channels, 3),
        }
    }

    /// `size`: the output spatial size; `None` doubles height and width.
    pub fn forward(&self, x: &Tensor, size: Option<(i64, i64)>) -> Tensor {
        let (h, w) = match size {
            Some(s) => s,
            None => {
                let d = x.size();
                (d[2] * 2, d[3] * 2)
            }
        };
        self.conv.forward(&x.upsample_nearest2d([h, w], None, None))
    }
}

/// diffusers' `Attention` (scaled dot-product processor) on token sequences:
/// `to_q`, `to_k`, `to_v`, `to_out.0`. Self-attention when no context is given.
#[derive(Debug)]
pub struct Attention {
    to_q: LoraLinear,
    to_k: LoraLinear,
    to_v: LoraLinear,
    to_out: LoraLinear,
    heads: i64,
    head_dim: i64,
    upcast: bool,
}

impl Attention {
    /// `context_dim`: width of the cross-attention context (`None`: self-attention).
    /// `upcast`: compute the attention in float32 when running in half precision
    /// (diffusers' `upcast_attention` / `upcast_softmax`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        p: &nn::Path,
        query_dim: i64,
        context_dim: Option<i64>,
        heads: i64,
        head_dim: i64,
        qkv_bias: bool,
        out_bias: bool,
        upcast: bool,
    ) -> Self {
        let inner = heads * head_dim;
        let kv_dim = context_dim.unwrap_or(query_dim);
        Self {
            to_q: lora_linear(&(p / "to_q"), query_dim, inner, qkv_bias),
            to_k: lora_linear(&(p / "to_k"), kv_dim, inner, qkv_bias),
            to_v: lora_linear(&(p / "to_v"), kv_dim, inner, qkv_bias),
            to_out: lora_linear(&(p / "to_out" / "0"), inner, query_dim, out_bias),
            heads,
            head_dim,
            upcast,
        }
    }

    fn split_heads(&self, x: &Tensor) -> Tensor {
        let (b, n) = (x.size()[0], x.size()[1]);
        x.view([b, n, self.heads, self.head_dim]).transpose(1, 2)
    }

    /// `x`: `[B, N, query_dim]`; `context`: `[B, M, context_dim]`. Returns `[B, N, query_dim]`.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Tensor {
        let ctx = context.unwrap_or(x);
        let (b, n) = (x.size()[0], x.size()[1]);
        let q = self.split_heads(&self.to_q.forward(x));
        let k = self.split_heads(&self.to_k.forward(ctx));
        let v = self.split_heads(&self.to_v.forward(ctx));
        let kind = q.kind();
        let low = matches!(kind, Kind::Half | Kind::BFloat16);
        let out = if self.upcast && low {
            Tensor::scaled_dot_product_attention::<Tensor>(
                &q.to_kind(Kind::Float),
                &k.to_kind(Kind::Float),
                &v.to_kind(Kind::Float),
                None,
                0.0,
                false,
                None,
                false,
            )
            .to_kind(kind)
        } else {
            Tensor::scaled_dot_product_attention::<Tensor>(
                &q, &k, &v, None, 0.0, false, None, false,
            )
        };
        let out = out
            .transpose(1, 2)
            .reshape([b, n, self.heads * self.head_dim]);
        self.to_out.forward(&out)
    }
}

/// diffusers' `FeedForward` with GEGLU: `net.0.proj` (to 2 x inner), `hidden * gelu(gate)`,
/// `net.2` (back to dim).
#[derive(Debug)]
pub struct GegluFeedForward {
    proj: LoraLinear,
    out: LoraLinear,
}

impl GegluFeedForward {
    pub fn new(p: &nn::Path, dim: i64, inner: i64) -> Self {
        Self {
            proj: lora_linear(&(p / "net" / "0" / "proj"), dim, inner * 2, true),
            out: lora_linear(&(p / "net" / "2"), inner, dim, true),
        }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.proj.forward(x);
        let parts = h.chunk(2, -1);
        self.out.forward(&(&parts[0] * parts[1].gelu("none")))
    }
}

/// The VAE mid block's attention: `group_norm`, then single-head self-attention over the
/// spatial positions (`to_q` / `to_k` / `to_v` / `to_out.0`, all with bias), plus the
/// residual.
#[derive(Debug)]
pub struct SpatialSelfAttention {
    group_norm: nn::GroupNorm,
    attn: Attention,
}

impl SpatialSelfAttention {
    pub fn new(p: &nn::Path, channels: i64, head_dim: i64, groups: i64, eps: f64) -> Result<Self> {
        if head_dim <= 0 || channels % head_dim != 0 {
            bail!("attention over {channels} channels: head size {head_dim} does not divide it");
        }
        Ok(Self {
            group_norm: group_norm(&(p / "group_norm"), groups, channels, eps)?,
            attn: Attention::new(
                p,
                channels,
                None,
                channels / head_dim,
                head_dim,
                true,
                true,
                true,
            ),
        })
    }

    /// `x`: `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let s = x.size();
        let (b, c, h, w) = (s[0], s[1], s[2], s[3]);
        let t = self
            .group_norm
            .forward(x)
            .view([b, c, h * w])
            .transpose(1, 2);
        let out = self.attn.forward(&t, None);
        out.transpose(1, 2).reshape([b, c, h, w]) + x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestep_embedding_matches_formula() {
        let t = Tensor::from_slice(&[0i64, 10, 999]);
        let e = timestep_embedding(&t, 6, true, 1.0);
        assert_eq!(e.size(), vec![3, 6]);
        // half = 3, shift 1: freqs exp(-ln(1e4) * i / 2) = 1, 1e-2, 1e-4; flip puts cos first.
        let freqs = [1.0f64, 1e-2, 1e-4];
        for (row, tv) in [0.0f64, 10.0, 999.0].iter().enumerate() {
            for (i, f) in freqs.iter().enumerate() {
                let c = e.double_value(&[row as i64, i as i64]);
                let s = e.double_value(&[row as i64, i as i64 + 3]);
                assert!((c - (tv * f).cos()).abs() < 1e-5, "cos t={tv} i={i}: {c}");
                assert!((s - (tv * f).sin()).abs() < 1e-5, "sin t={tv} i={i}: {s}");
            }
        }
        let odd = timestep_embedding(&t, 7, false, 0.0);
        assert_eq!(odd.size(), vec![3, 7]);
        assert_eq!(
            odd.select(1, 6).abs().sum(Kind::Double).double_value(&[]),
            0.0
        );
    }

    #[test]
    fn group_norm_rejects_bad_groups() {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let err = group_norm(&(vs.root() / "x" / "norm"), 3, 8, 1e-5)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("x.norm") && err.contains('3') && err.contains('8'),
            "{err}"
        );
    }
}
