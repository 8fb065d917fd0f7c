//! DINOv2 vision transformer (`transformers.Dinov2Model` layout and behaviour).
//!
//! Tensor names follow the transformers checkpoint (`embeddings.cls_token`,
//! `encoder.layer.{i}.attention.attention.query.weight`, `layernorm.weight`, ...), so a
//! `facebook/dinov2-*` folder (config.json + model.safetensors) loads directly. The
//! stored, unused `embeddings.mask_token` is ignored.
//!
//! Position embeddings are bicubically resized to the input's patch grid
//! (`align_corners = false`, no antialias), unless the input is square and has as
//! many patches as the stored grid, exactly as transformers 5.x does.

use crate::models::forward_input as input;
use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::Path;
use tch::{nn, nn::Module, Device, Kind, Tensor};

use crate::weights::{self, LoadOptions};

fn default_hidden_act() -> String {
    "gelu".into()
}
fn default_layer_norm_eps() -> f64 {
    1e-6
}
fn default_num_channels() -> i64 {
    3
}
fn default_true() -> bool {
    true
}
fn default_layerscale() -> f64 {
    1.0
}
fn default_mlp_ratio() -> f64 {
    4.0
}

/// The fields of a transformers `Dinov2Config` that shape the network.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Dinov2Config {
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    pub image_size: i64,
    pub patch_size: i64,
    #[serde(default = "default_num_channels")]
    pub num_channels: i64,
    #[serde(default = "default_true")]
    pub qkv_bias: bool,
    #[serde(default = "default_layerscale")]
    pub layerscale_value: f64,
    #[serde(default)]
    pub use_swiglu_ffn: bool,
    #[serde(default)]
    pub model_type: Option<String>,
    /// Present only in `Dinov2WithRegisters` configs; must be absent or 0 here.
    #[serde(default)]
    pub num_register_tokens: Option<i64>,
}

impl Dinov2Config {
    /// ViT-S/14 as released by DINOv2 (`facebook/dinov2-small`).
    pub fn vit_s14() -> Self {
        Self {
            hidden_size: 384,
            num_hidden_layers: 12,
            num_attention_heads: 6,
            mlp_ratio: 4.0,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-6,
            image_size: 518,
            patch_size: 14,
            num_channels: 3,
            qkv_bias: true,
            layerscale_value: 1.0,
            use_swiglu_ffn: false,
            model_type: Some("dinov2".into()),
            num_register_tokens: None,
        }
    }

    /// A tiny configuration for tests (hidden 32, 4 layers, 2 heads, 56 px = 4x4 patches).
    pub fn tiny() -> Self {
        Self {
            hidden_size: 32,
            num_hidden_layers: 4,
            num_attention_heads: 2,
            image_size: 56,
            ..Self::vit_s14()
        }
    }

    /// Number of patches per side of the stored position-embedding grid.
    pub fn grid(&self) -> i64 {
        self.image_size / self.patch_size
    }

    /// Width of the MLP's hidden layer (SwiGLU rounds 2/3 of it up to a multiple of 8).
    pub fn mlp_hidden(&self) -> i64 {
        let h = (self.hidden_size as f64 * self.mlp_ratio) as i64;
        if self.use_swiglu_ffn {
            ((h * 2 / 3) + 7) / 8 * 8
        } else {
            h
        }
    }

    /// Reject settings this implementation does not support.
    pub fn validate(&self) -> Result<()> {
        if let Some(mt) = &self.model_type {
            ensure!(mt == "dinov2", "model_type is {mt:?}, expected \"dinov2\"");
        }
        if let Some(r) = self.num_register_tokens {
            ensure!(
                r == 0,
                "num_register_tokens = {r} is not supported (Dinov2WithRegisters)"
            );
        }
        ensure!(
            self.hidden_size > 0
                && self.num_attention_heads > 0
                && self.hidden_size % self.num_attention_heads == 0,
            "hidden_size {} is not a positive multiple of num_attention_heads {}",
            self.hidden_size,
            self.num_attention_heads
        );
        ensure!(
            self.patch_size > 0,
            "patch_size must be positive, found {}",
            self.patch_size
        );
        ensure!(
            self.image_size >= self.patch_size,
            "image_size {} is smaller than patch_size {}",
            self.image_size,
            self.patch_size
        );
        ensure!(
            self.num_hidden_layers >= 0,
            "num_hidden_layers is negative: {}",
            self.num_hidden_layers
        );
        ensure!(
            self.mlp_ratio > 0.0,
            "mlp_ratio must be positive, found {}",
            self.mlp_ratio
        );
        Activation::parse(&self.hidden_act)?;
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum Activation {
    Gelu,
    GeluTanh,
    Relu,
    Silu,
}

impl Activation {
    fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            other => bail!("hidden_act {other:?} is not supported (gelu, gelu_new, gelu_pytorch_tanh, relu, silu)"),
        })
    }
    fn apply(self, x: &Tensor) -> Tensor {
        match self {
            Self::Gelu => x.gelu("none"),
            Self::GeluTanh => x.gelu("tanh"),
            Self::Relu => x.relu(),
            Self::Silu => x.silu(),
        }
    }
}

fn layer_norm(p: nn::Path, dim: i64, eps: f64) -> nn::LayerNorm {
    nn::layer_norm(
        p,
        vec![dim],
        nn::LayerNormConfig {
            eps,
            ..Default::default()
        },
    )
}

fn linear(p: nn::Path, d_in: i64, d_out: i64, bias: bool) -> nn::Linear {
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

#[derive(Debug)]
enum Mlp {
    Plain {
        fc1: nn::Linear,
        fc2: nn::Linear,
        act: Activation,
    },
    SwiGlu {
        weights_in: nn::Linear,
        weights_out: nn::Linear,
    },
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Self::Plain { fc1, fc2, act } => fc2.forward(&act.apply(&fc1.forward(x))),
            Self::SwiGlu {
                weights_in,
                weights_out,
            } => {
                let h = weights_in.forward(x).chunk(2, -1);
                weights_out.forward(&(h[0].silu() * &h[1]))
            }
        }
    }
}

#[derive(Debug)]
struct Layer {
    norm1: nn::LayerNorm,
    query: nn::Linear,
    key: nn::Linear,
    value: nn::Linear,
    out: nn::Linear,
    lambda1: Tensor,
    norm2: nn::LayerNorm,
    mlp: Mlp,
    lambda2: Tensor,
    heads: i64,
}

impl Layer {
    fn new(p: nn::Path, cfg: &Dinov2Config) -> Result<Self> {
        let d = cfg.hidden_size;
        let att = &p / "attention";
        let sa = &att / "attention";
        let mlp_p = &p / "mlp";
        let hidden = cfg.mlp_hidden();
        let mlp = if cfg.use_swiglu_ffn {
            Mlp::SwiGlu {
                weights_in: linear(&mlp_p / "weights_in", d, 2 * hidden, true),
                weights_out: linear(&mlp_p / "weights_out", hidden, d, true),
            }
        } else {
            Mlp::Plain {
                fc1: linear(&mlp_p / "fc1", d, hidden, true),
                fc2: linear(&mlp_p / "fc2", hidden, d, true),
                act: Activation::parse(&cfg.hidden_act)?,
            }
        };
        let ls = nn::Init::Const(cfg.layerscale_value);
        Ok(Self {
            norm1: layer_norm(&p / "norm1", d, cfg.layer_norm_eps),
            query: linear(&sa / "query", d, d, cfg.qkv_bias),
            key: linear(&sa / "key", d, d, cfg.qkv_bias),
            value: linear(&sa / "value", d, d, cfg.qkv_bias),
            out: linear(&att / "output" / "dense", d, d, true),
            lambda1: (&p / "layer_scale1").var("lambda1", &[d], ls),
            norm2: layer_norm(&p / "norm2", d, cfg.layer_norm_eps),
            mlp,
            lambda2: (&p / "layer_scale2").var("lambda1", &[d], ls),
            heads: cfg.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let (b, n, d) = x.size3().expect("DINOv2 layer input must be [B, N, D]");
        let hd = d / self.heads;
        let h = self.norm1.forward(x);
        let split = |t: Tensor| t.view([b, n, self.heads, hd]).transpose(1, 2);
        let q = split(self.query.forward(&h));
        let k = split(self.key.forward(&h));
        let v = split(self.value.forward(&h));
        let a = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            false,
            None,
            false,
        );
        let a = a.transpose(1, 2).reshape([b, n, d]);
        let x = x + self.out.forward(&a) * &self.lambda1;
        let m = self.mlp.forward(&self.norm2.forward(&x));
        &x + m * &self.lambda2
    }
}

/// The outputs of [`Dinov2Model::forward`].
#[derive(Debug)]
pub struct Dinov2Output {
    /// [B, 1 + N, D], after the final layernorm.
    pub last_hidden_state: Tensor,
    /// [B, D]: the CLS token of `last_hidden_state`.
    pub pooler_output: Tensor,
    /// `num_hidden_layers + 1` tensors [B, 1 + N, D]: 0 = embeddings, i = after layer i
    /// (before the final layernorm).
    pub hidden_states: Vec<Tensor>,
}

/// `Dinov2Model` without the pooler head (DINOv2 has none).
#[derive(Debug)]
pub struct Dinov2Model {
    pub config: Dinov2Config,
    patch: nn::Conv2D,
    cls_token: Tensor,
    position_embeddings: Tensor,
    layers: Vec<Layer>,
    layernorm: nn::LayerNorm,
}

/// A loaded DINOv2 checkpoint: its variables (frozen), the model and its config.
pub struct LoadedDinov2 {
    pub vs: nn::VarStore,
    pub model: Dinov2Model,
    pub config: Dinov2Config,
}

impl Dinov2Model {
    pub fn new(p: &nn::Path, cfg: &Dinov2Config) -> Result<Self> {
        cfg.validate().context("DINOv2 config")?;
        let d = cfg.hidden_size;
        let emb = p / "embeddings";
        let patch = nn::conv2d(
            &emb / "patch_embeddings" / "projection",
            cfg.num_channels,
            d,
            cfg.patch_size,
            nn::ConvConfig {
                stride: cfg.patch_size,
                ..Default::default()
            },
        );
        let n_pos = cfg.grid() * cfg.grid() + 1;
        let cls_token = emb.var(
            "cls_token",
            &[1, 1, d],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        );
        let position_embeddings = emb.var(
            "position_embeddings",
            &[1, n_pos, d],
            nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        );
        let enc = p / "encoder" / "layer";
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(&enc / i, cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config: cfg.clone(),
            patch,
            cls_token,
            position_embeddings,
            layers,
            layernorm: layer_norm(p / "layernorm", d, cfg.layer_norm_eps),
        })
    }

    /// Read `config.json` and `model.safetensors` (or a sharded / fp16 variant) from
    /// `dir`, convert to `kind` on `device`, and freeze the weights.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<LoadedDinov2> {
        let config: Dinov2Config = crate::models::config::read_config(&dir.join("config.json"))?;
        config
            .validate()
            .with_context(|| format!("{}", dir.join("config.json").display()))?;
        let mut vs = nn::VarStore::new(device);
        let model = Self::new(&vs.root(), &config)?;
        if kind != Kind::Float {
            vs.set_kind(kind);
        }
        let files = weights::find_weight_files(dir, &["model"], None)?;
        let opts = LoadOptions {
            ignore: vec!["embeddings.mask_token".into()],
            rename: vec![],
        };
        weights::load_into(&mut vs, &files, &opts)?;
        vs.freeze();
        Ok(LoadedDinov2 { vs, model, config })
    }

    /// Position embeddings for an input of `height` x `width` pixels with `num_patches` patches.
    fn position_embeddings_for(&self, num_patches: i64, height: i64, width: i64) -> Tensor {
        let stored = &self.position_embeddings;
        let num_positions = stored.size()[1] - 1;
        if num_patches == num_positions && height == width {
            return stored.shallow_clone();
        }
        let d = stored.size()[2];
        let g = (num_positions as f64).sqrt().round() as i64;
        let kind = stored.kind();
        let cls = stored.narrow(1, 0, 1);
        let grid = stored
            .narrow(1, 1, num_positions)
            .reshape([1, g, g, d])
            .permute([0, 3, 1, 2])
            .to_kind(Kind::Float);
        let (nh, nw) = (
            height / self.config.patch_size,
            width / self.config.patch_size,
        );
        let grid = grid
            .upsample_bicubic2d([nh, nw], false, None, None)
            .to_kind(kind);
        let grid = grid.permute([0, 2, 3, 1]).reshape([1, nh * nw, d]);
        Tensor::cat(&[cls, grid], 1)
    }

    /// The embedding output [B, 1 + N, D] (CLS token + patch tokens, position-embedded).
    pub fn embeddings(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let size = pixel_values.size();
        ensure!(
            size.len() == 4 && size[1] == self.config.num_channels,
            "DINOv2 pixel_values must be [B, {}, H, W], found {:?}",
            self.config.num_channels,
            size
        );
        let (b, h, w) = (size[0], size[2], size[3]);
        let p = self.config.patch_size;
        ensure!(
            h >= p && w >= p,
            "DINOv2 input {h}x{w} is smaller than one {p}x{p} patch"
        );
        let x = pixel_values.to_kind(self.position_embeddings.kind());
        let x = self.patch.forward(&x).flatten(2, 3).transpose(1, 2);
        let n = x.size()[1];
        let cls = self.cls_token.expand([b, 1, self.config.hidden_size], true);
        let x = Tensor::cat(&[cls, x], 1);
        Ok(x + self.position_embeddings_for(n, h, w))
    }

    /// Run the embeddings and the first `layers` transformer layers, returning the
    /// embedding output followed by each layer's output (no final layernorm).
    pub fn hidden_states(&self, pixel_values: &Tensor, layers: usize) -> Result<Vec<Tensor>> {
        ensure!(
            layers <= self.layers.len(),
            "asked for {layers} DINOv2 layers, the model has {}",
            self.layers.len()
        );
        let mut out = vec![self.embeddings(pixel_values)?];
        for layer in &self.layers[..layers] {
            let next = layer.forward(out.last().expect("non-empty"));
            out.push(next);
        }
        Ok(out)
    }

    pub fn forward(&self, pixel_values: &Tensor) -> Result<Dinov2Output> {
        let hidden_states = self.hidden_states(pixel_values, self.layers.len())?;
        let last_hidden_state = self
            .layernorm
            .forward(hidden_states.last().expect("non-empty"));
        let pooler_output = last_hidden_state.select(1, 0);
        Ok(Dinov2Output {
            last_hidden_state,
            pooler_output,
            hidden_states,
        })
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }
}

/// Developer entry point of `adt forward`.
///
/// * `dinov2`: input `pixel_values`; outputs `last_hidden_state`, `pooler_output`,
///   `hidden_states_0` .. `hidden_states_<L>`.
/// * `dinov2-grad`: inputs `pixel_values`, `R` and optionally `hidden_state_index`
///   (a scalar tensor, default 2); outputs `loss = sum(hidden_states[i] * R)` and
///   `grad_pixel_values = d loss / d pixel_values`.
pub fn run_forward(
    component: &str,
    model_dir: &Path,
    inputs: &HashMap<String, Tensor>,
) -> Result<HashMap<String, Tensor>> {
    let loaded = Dinov2Model::load(model_dir, Device::Cpu, Kind::Float)?;
    let model = &loaded.model;
    let pixel_values = input(inputs, "pixel_values", component)?.to_kind(Kind::Float);
    let mut out = HashMap::new();
    match component {
        "dinov2" => {
            let o = tch::no_grad(|| model.forward(&pixel_values))?;
            out.insert("last_hidden_state".to_string(), o.last_hidden_state);
            out.insert("pooler_output".to_string(), o.pooler_output);
            for (i, h) in o.hidden_states.into_iter().enumerate() {
                out.insert(format!("hidden_states_{i}"), h);
            }
        }
        "dinov2-grad" => {
            let r = input(inputs, "R", component)?.to_kind(Kind::Float);
            let index = match inputs.get("hidden_state_index") {
                Some(t) => t.int64_value(&[]) as usize,
                None => 2,
            };
            let px = pixel_values.detach().set_requires_grad(true);
            let hs = model.hidden_states(&px, index)?;
            let h = &hs[index];
            ensure!(
                h.size() == r.size(),
                "{component}: R has shape {:?}, hidden_states[{index}] has {:?}",
                r.size(),
                h.size()
            );
            let loss = (h * &r).sum(Kind::Float);
            let grad = Tensor::run_backward(&[&loss], &[&px], false, false);
            out.insert("grad_pixel_values".to_string(), grad[0].shallow_clone());
            out.insert("loss".to_string(), loss.detach());
        }
        other => bail!("unknown DINOv2 component {other:?} (expected dinov2 or dinov2-grad)"),
    }
    Ok(out)
}
