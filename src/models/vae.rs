//! `AutoencoderKL` (SD / SDXL / SD3 VAEs) in the diffusers layout.
//!
//! `encode` gives the posterior's mean and clamped log-variance, `decode` maps latents
//! to images (raw, no scaling). [`AutoencoderKL::latents_from_image`] and
//! [`AutoencoderKL::image_from_latents`] apply the checkpoint's `shift_factor` /
//! `scaling_factor` as the pipelines do.

use crate::models::blocks::{
    conv2d, group_norm, Downsample2D, ResnetBlock2D, SpatialSelfAttention, Upsample2D,
};
use crate::models::checkpoint::checkpoint1;
use crate::weights;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

fn d_three() -> i64 {
    3
}
fn d_four() -> i64 {
    4
}
fn d_one() -> i64 {
    1
}
fn d_groups() -> i64 {
    32
}
fn d_true() -> bool {
    true
}
fn d_silu() -> String {
    "silu".into()
}
fn d_scale() -> f64 {
    0.18215
}
fn d_down() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn d_up() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}
fn d_channels() -> Vec<i64> {
    vec![64]
}

/// The fields of diffusers' `AutoencoderKL` config (defaults as in diffusers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "d_three")]
    pub in_channels: i64,
    #[serde(default = "d_three")]
    pub out_channels: i64,
    #[serde(default = "d_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_up")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_channels")]
    pub block_out_channels: Vec<i64>,
    #[serde(default = "d_one")]
    pub layers_per_block: i64,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_four")]
    pub latent_channels: i64,
    #[serde(default = "d_groups")]
    pub norm_num_groups: i64,
    #[serde(default)]
    pub sample_size: Option<serde_json::Value>,
    #[serde(default = "d_scale")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default)]
    pub latents_mean: Option<serde_json::Value>,
    #[serde(default)]
    pub latents_std: Option<serde_json::Value>,
    #[serde(default = "d_true")]
    pub force_upcast: bool,
    #[serde(default = "d_true")]
    pub use_quant_conv: bool,
    #[serde(default = "d_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
}

impl VaeConfig {
    /// Parse a config JSON value and validate it.
    pub fn from_value(v: &serde_json::Value) -> Result<Self> {
        let cfg: Self =
            serde_json::from_value(v.clone()).context("invalid AutoencoderKL config")?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Check that the config describes an architecture this implementation builds.
    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        ensure!(n > 0, "VAE config field block_out_channels is empty");
        ensure!(
            self.down_block_types.len() == n && self.up_block_types.len() == n,
            "VAE config: down_block_types ({}) and up_block_types ({}) must have one entry per block_out_channels ({n})",
            self.down_block_types.len(),
            self.up_block_types.len()
        );
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            bail!("VAE config field down_block_types contains {t:?}, which is not supported (supported: DownEncoderBlock2D)");
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| *t != "UpDecoderBlock2D")
        {
            bail!("VAE config field up_block_types contains {t:?}, which is not supported (supported: UpDecoderBlock2D)");
        }
        ensure!(
            self.act_fn == "silu",
            "VAE config field act_fn = {:?} is not supported (supported: silu)",
            self.act_fn
        );
        for (name, v) in [
            ("latents_mean", &self.latents_mean),
            ("latents_std", &self.latents_std),
        ] {
            if v.as_ref().is_some_and(|v| !v.is_null()) {
                bail!("VAE config field {name} = {} is not supported (supported: null; latents are normalised with scaling_factor / shift_factor)", v.as_ref().unwrap_or(&serde_json::Value::Null));
            }
        }
        ensure!(
            self.layers_per_block > 0,
            "VAE config field layers_per_block = {} must be positive",
            self.layers_per_block
        );
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            ensure!(
                c > 0 && c % self.norm_num_groups == 0,
                "VAE config: block_out_channels[{i}] = {c} is not a multiple of norm_num_groups = {}",
                self.norm_num_groups
            );
        }
        ensure!(
            self.scaling_factor != 0.0,
            "VAE config field scaling_factor is 0"
        );
        Ok(())
    }
}

/// The encoder / decoder mid block: resnet, optional attention, resnet.
#[derive(Debug)]
struct VaeMidBlock {
    resnets: [ResnetBlock2D; 2],
    attention: Option<SpatialSelfAttention>,
}

impl VaeMidBlock {
    fn new(p: &nn::Path, c: i64, groups: i64, attention: bool) -> Result<Self> {
        Ok(Self {
            resnets: [
                ResnetBlock2D::new(&(p / "resnets" / 0), c, c, None, groups, 1e-6)?,
                ResnetBlock2D::new(&(p / "resnets" / 1), c, c, None, groups, 1e-6)?,
            ],
            attention: if attention {
                Some(SpatialSelfAttention::new(
                    &(p / "attentions" / 0),
                    c,
                    c,
                    groups,
                    1e-6,
                )?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = self.resnets[0].forward(x, None);
        if let Some(a) = &self.attention {
            h = a.forward(&h);
        }
        self.resnets[1].forward(&h, None)
    }
}

#[derive(Debug)]
struct Encoder {
    conv_in: nn::Conv2D,
    down: Vec<(Vec<ResnetBlock2D>, Option<Downsample2D>)>,
    mid: VaeMidBlock,
    norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

impl Encoder {
    fn new(p: &nn::Path, cfg: &VaeConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let g = cfg.norm_num_groups;
        let mut down = Vec::with_capacity(n);
        let mut out_c = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let bp = p / "down_blocks" / i;
            let in_c = out_c;
            out_c = c;
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    ResnetBlock2D::new(
                        &(&bp / "resnets" / j),
                        if j == 0 { in_c } else { out_c },
                        out_c,
                        None,
                        g,
                        1e-6,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let ds = if i + 1 < n {
                Some(Downsample2D::new(&(&bp / "downsamplers" / 0), out_c, 0)?)
            } else {
                None
            };
            down.push((resnets, ds));
        }
        let last = ch[n - 1];
        Ok(Self {
            conv_in: conv2d(&(p / "conv_in"), cfg.in_channels, ch[0], 3),
            down,
            mid: VaeMidBlock::new(&(p / "mid_block"), last, g, cfg.mid_block_add_attention)?,
            norm_out: group_norm(&(p / "conv_norm_out"), g, last, 1e-6)?,
            conv_out: conv2d(&(p / "conv_out"), last, 2 * cfg.latent_channels, 3),
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = self.conv_in.forward(x);
        for (resnets, ds) in &self.down {
            for r in resnets {
                h = r.forward(&h, None);
            }
            if let Some(d) = ds {
                h = d.forward(&h);
            }
        }
        let h = self.mid.forward(&h);
        self.conv_out.forward(&self.norm_out.forward(&h).silu())
    }
}

#[derive(Debug)]
struct Decoder {
    conv_in: nn::Conv2D,
    mid: VaeMidBlock,
    up: Vec<(Vec<ResnetBlock2D>, Option<Upsample2D>)>,
    norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

impl Decoder {
    fn new(p: &nn::Path, cfg: &VaeConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let g = cfg.norm_num_groups;
        let last = ch[n - 1];
        let mut up = Vec::with_capacity(n);
        let mut out_c = last;
        for i in 0..n {
            let bp = p / "up_blocks" / i;
            let in_c = out_c;
            out_c = ch[n - 1 - i];
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    ResnetBlock2D::new(
                        &(&bp / "resnets" / j),
                        if j == 0 { in_c } else { out_c },
                        out_c,
                        None,
                        g,
                        1e-6,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let us = (i + 1 < n).then(|| Upsample2D::new(&(&bp / "upsamplers" / 0), out_c));
            up.push((resnets, us));
        }
        Ok(Self {
            conv_in: conv2d(&(p / "conv_in"), cfg.latent_channels, last, 3),
            mid: VaeMidBlock::new(&(p / "mid_block"), last, g, cfg.mid_block_add_attention)?,
            up,
            norm_out: group_norm(&(p / "conv_norm_out"), g, ch[0], 1e-6)?,
            conv_out: conv2d(&(p / "conv_out"), ch[0], cfg.out_channels, 3),
        })
    }

    /// The decoder; its mid block and each resnet of the up blocks are checkpointed
    /// inside a checkpointing scope (`models::checkpoint`).
    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mid = &self.mid;
        // SAFETY (both segments): they borrow only the decoder's weights, which
        // outlive the scope; the activations are inputs.
        let mut h =
            unsafe { checkpoint1(&[&self.conv_in.forward(z)], move |xs| mid.forward(&xs[0]))? };
        for (resnets, us) in &self.up {
            for r in resnets {
                h = unsafe { checkpoint1(&[&h], move |xs| r.forward(&xs[0], None))? };
            }
            if let Some(u) = us {
                h = u.forward(&h, None);
            }
        }
        Ok(self.conv_out.forward(&self.norm_out.forward(&h).silu()))
    }
}

/// diffusers' `AutoencoderKL`.
#[derive(Debug)]
pub struct AutoencoderKL {
    config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<nn::Conv2D>,
    post_quant_conv: Option<nn::Conv2D>,
}

impl AutoencoderKL {
    /// Build the variables under `p` with the diffusers tensor names.
    pub fn new(p: &nn::Path, cfg: &VaeConfig) -> Result<Self> {
        cfg.validate()?;
        let lc = cfg.latent_channels;
        Ok(Self {
            config: cfg.clone(),
            encoder: Encoder::new(&(p / "encoder"), cfg)?,
            decoder: Decoder::new(&(p / "decoder"), cfg)?,
            quant_conv: cfg
                .use_quant_conv
                .then(|| conv2d(&(p / "quant_conv"), 2 * lc, 2 * lc, 1)),
            post_quant_conv: cfg
                .use_post_quant_conv
                .then(|| conv2d(&(p / "post_quant_conv"), lc, lc, 1)),
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The latent-space downsampling factor (8 for SD).
    pub fn downscale(&self) -> i64 {
        1 << (self.config.block_out_channels.len() - 1)
    }

    /// Encode images `[B, in_channels, H, W]` in [-1, 1] into the posterior's
    /// `(mean, logvar)`, each `[B, latent_channels, H/f, W/f]`, logvar clamped to [-30, 20].
    pub fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let s = x.size();
        ensure!(
            s.len() == 4 && s[1] == self.config.in_channels,
            "VAE encode: input must be [B, {}, H, W], found {s:?}",
            self.config.in_channels
        );
        let mut h = self.encoder.forward(x);
        if let Some(q) = &self.quant_conv {
            h = q.forward(&h);
        }
        let parts = h.chunk(2, 1);
        Ok((parts[0].shallow_clone(), parts[1].clamp(-30.0, 20.0)))
    }

    /// A posterior sample `mean + exp(logvar / 2) * noise` (noise drawn like `mean`).
    pub fn sample(mean: &Tensor, logvar: &Tensor) -> Tensor {
        mean + (logvar * 0.5).exp() * mean.randn_like()
    }

    /// Decode raw latents `[B, latent_channels, h, w]` (no scaling) into images.
    /// Differentiable with respect to `z`.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let s = z.size();
        ensure!(
            s.len() == 4 && s[1] == self.config.latent_channels,
            "VAE decode: latents must be [B, {}, h, w], found {s:?}",
            self.config.latent_channels
        );
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(z),
            None => z.shallow_clone(),
        };
        self.decoder.forward(&z)
    }

    /// Raw latents to the diffusion model's latent space: `(z - shift) * scaling`.
    pub fn scale_latents(&self, z: &Tensor) -> Tensor {
        (z - self.config.shift_factor.unwrap_or(0.0)) * self.config.scaling_factor
    }

    /// The inverse of [`AutoencoderKL::scale_latents`]: `z / scaling + shift`.
    pub fn unscale_latents(&self, latents: &Tensor) -> Tensor {
        latents / self.config.scaling_factor + self.config.shift_factor.unwrap_or(0.0)
    }

    /// Images in [-1, 1] to diffusion latents: the posterior mean (or a sample when
    /// `sample` is true), shifted and scaled.
    pub fn latents_from_image(&self, x: &Tensor, sample: bool) -> Result<Tensor> {
        let (mean, logvar) = self.encode(x)?;
        let z = if sample {
            Self::sample(&mean, &logvar)
        } else {
            mean
        };
        Ok(self.scale_latents(&z))
    }

    /// Diffusion latents to images (about [-1, 1], not clamped): unscale, then decode.
    pub fn image_from_latents(&self, latents: &Tensor) -> Result<Tensor> {
        self.decode(&self.unscale_latents(latents))
    }
}

/// A frozen VAE with its variables and config.
pub struct LoadedVae {
    pub vs: nn::VarStore,
    pub model: AutoencoderKL,
    pub config: VaeConfig,
}

impl LoadedVae {
    /// Load `config.json` and `diffusion_pytorch_model*.safetensors` from a diffusers
    /// `vae/` folder. The variables have `kind` and are frozen (no gradients for the
    /// weights; gradients still flow to the inputs).
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let raw = crate::models::config::read_json(&cfg_path)?;
        let config =
            VaeConfig::from_value(&raw).with_context(|| format!("{}", cfg_path.display()))?;
        let mut vs = nn::VarStore::new(device);
        vs.set_kind(kind);
        let model = AutoencoderKL::new(&vs.root(), &config)
            .with_context(|| format!("{}", cfg_path.display()))?;
        let files = crate::models::unet::component_weight_files(dir, kind)?;
        weights::load_into(&mut vs, &files, &weights::LoadOptions::default())?;
        vs.freeze();
        Ok(Self { vs, model, config })
    }
}

/// `adt forward vae-encode` (input `x`; outputs `mean`, `logvar`) and
/// `adt forward vae-decode` (input `z`; output `sample`).
pub fn run_forward(
    component: &str,
    model_dir: &Path,
    inputs: &HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    let name = match component {
        "vae-encode" => "x",
        "vae-decode" => "z",
        other => {
            bail!("unknown VAE component {other:?} (expected \"vae-encode\" or \"vae-decode\")")
        }
    };
    let x = inputs
        .get(name)
        .with_context(|| format!("{component}: missing input {name}"))?;
    let device = Device::cuda_if_available();
    let vae = LoadedVae::load(model_dir, device, Kind::Float)?;
    let x = x.to_device(device).to_kind(Kind::Float);
    tch::no_grad(|| {
        Ok(if component == "vae-encode" {
            let (mean, logvar) = vae.model.encode(&x)?;
            HashMap::from([
                ("mean".to_string(), mean.to_device(Device::Cpu)),
                ("logvar".to_string(), logvar.to_device(Device::Cpu)),
            ])
        } else {
            HashMap::from([(
                "sample".to_string(),
                vae.model.decode(&x)?.to_device(Device::Cpu),
            )])
        })
    })
}
