//! CLIP vision tower in the transformers layout (`CLIPVisionModelWithProjection`, or
//! the vision half of a full `CLIPModel`), and CLIP's image preprocessing.
//!
//! Variables carry the `vision_model.` prefix (`vision_model.embeddings.class_embedding`,
//! `vision_model.encoder.layers.{i}.self_attn.q_proj.weight`, `vision_model.pre_layrnorm.*`,
//! `vision_model.post_layernorm.*`) plus `visual_projection.weight` (no bias); files
//! saved without the prefix load too. The network: a patch convolution (no bias), a
//! learned class token and position embeddings, `pre_layrnorm`, the pre-norm encoder
//! layers of [`crate::models::clip`] without a causal mask, `post_layernorm` on the
//! class token (the pooled output), then the projection. Inputs must be
//! `image_size` x `image_size` (no position-embedding interpolation).
//!
//! A full `CLIPModel` folder (config with `text_config` / `vision_config`; weights
//! with `text_model.*`, `text_projection.weight`, `logit_scale`) loads its vision part
//! here; the text keys are skipped, every vision key is checked. The projection width
//! of a `CLIPModel` is its top-level `projection_dim`.
//!
//! [`ClipImageProcessor`] reproduces transformers' PIL-backed `CLIPImageProcessor`:
//! RGB, shortest side resized to `size` with Pillow's 8-bit bicubic resampling
//! (separable, antialiased when shrinking, fixed-point coefficients, rounded to 8 bits
//! after the horizontal and after the vertical pass), centre crop, `x / 255`, then
//! `(x - mean) / std` in float32.

use crate::models::clip::{Activation, EncoderLayer};
use crate::weights;
use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use std::path::Path;
use tch::nn::{self, Module, VarStore};
use tch::{Device, Kind, Tensor};

/// OpenAI CLIP's normalisation mean (RGB).
pub const CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// OpenAI CLIP's normalisation standard deviation (RGB).
pub const CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

fn default_hidden_act() -> String {
    "quick_gelu".to_string()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_channels() -> i64 {
    3
}
fn default_projection_dim() -> i64 {
    512
}

/// `config.json` of a transformers `CLIPVisionModel[WithProjection]`, or the
/// `vision_config` of a full `CLIPModel`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ClipVisionConfig {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    #[serde(default = "default_channels")]
    pub num_channels: i64,
    pub image_size: i64,
    pub patch_size: i64,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_projection_dim")]
    pub projection_dim: i64,
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
}

fn parse_activation(name: &str) -> Result<Activation> {
    Ok(match name {
        "quick_gelu" => Activation::QuickGelu,
        "gelu" => Activation::Gelu,
        "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
        other => bail!(
            "CLIP vision config: hidden_act {other:?} is not supported \
             (expected quick_gelu, gelu, gelu_new or gelu_pytorch_tanh)"
        ),
    })
}

impl ClipVisionConfig {
    /// Check the fields that shape the network.
    pub fn validate(&self) -> Result<()> {
        parse_activation(&self.hidden_act)?;
        ensure!(
            self.hidden_size > 0
                && self.num_attention_heads > 0
                && self.hidden_size % self.num_attention_heads == 0,
            "CLIP vision config: hidden_size {} is not a positive multiple of num_attention_heads {}",
            self.hidden_size,
            self.num_attention_heads
        );
        ensure!(
            self.patch_size > 0 && self.image_size >= self.patch_size,
            "CLIP vision config: image_size {} / patch_size {} (need 0 < patch_size <= image_size)",
            self.image_size,
            self.patch_size
        );
        ensure!(
            self.num_hidden_layers >= 1 && self.intermediate_size > 0 && self.num_channels > 0,
            "CLIP vision config: num_hidden_layers {}, intermediate_size {}, num_channels {} must be positive",
            self.num_hidden_layers,
            self.intermediate_size,
            self.num_channels
        );
        ensure!(
            self.projection_dim > 0,
            "CLIP vision config: projection_dim {} must be positive",
            self.projection_dim
        );
        Ok(())
    }

    /// Patches per side.
    pub fn grid(&self) -> i64 {
        self.image_size / self.patch_size
    }

    /// Class token plus patches.
    pub fn num_positions(&self) -> i64 {
        self.grid() * self.grid() + 1
    }

    /// Read `config.json`: a vision config, or a full `CLIPModel` config (its
    /// `vision_config`, with the model's top-level `projection_dim`). The flag says
    /// whether it was a full `CLIPModel` config.
    pub fn from_file(path: &Path) -> Result<(Self, bool)> {
        let v = crate::models::config::read_json(path)?;
        let (sub, full) = match v.get("vision_config") {
            Some(vc) if v.get("hidden_size").is_none() => {
                ensure!(
                    vc.is_object(),
                    "{}: vision_config is not an object",
                    path.display()
                );
                let mut vc = vc.clone();
                if let Some(p) = v.get("projection_dim") {
                    vc["projection_dim"] = p.clone();
                }
                (vc, true)
            }
            _ => (v, false),
        };
        let cfg: ClipVisionConfig = serde_path_to_error::deserialize(sub)
            .map_err(|e| anyhow::anyhow!("{}: invalid CLIP vision config: {e}", path.display()))?;
        cfg.validate()
            .with_context(|| format!("{}: unsupported CLIP vision config", path.display()))?;
        Ok((cfg, full))
    }

    fn declares_projection(&self) -> bool {
        self.architectures.as_ref().is_some_and(|a| {
            a.iter()
                .any(|s| s == "CLIPVisionModelWithProjection" || s == "CLIPModel")
        })
    }
}

/// Outputs of [`ClipVisionModel::forward`].
pub struct ClipVisionOutput {
    /// Encoder output, [B, 1 + patches, H] (no final norm, as transformers returns it).
    pub last_hidden_state: Tensor,
    /// `post_layernorm` of the class token, [B, H].
    pub pooler_output: Tensor,
    /// `visual_projection(pooler_output)`, [B, projection_dim], when the model has
    /// the projection.
    pub image_embeds: Option<Tensor>,
}

/// CLIP vision transformer, with or without the visual projection.
pub struct ClipVisionModel {
    class_embedding: Tensor,
    patch_embedding: nn::Conv2D,
    position_embedding: nn::Embedding,
    pre_layrnorm: nn::LayerNorm,
    layers: Vec<EncoderLayer>,
    post_layernorm: nn::LayerNorm,
    visual_projection: Option<nn::Linear>,
    act: Activation,
    heads: i64,
    hidden: i64,
    channels: i64,
    image_size: i64,
}

impl ClipVisionModel {
    /// Build the variables under `p` (the checkpoint root: `p / "vision_model"` holds
    /// the transformer). `with_projection` adds `visual_projection.weight`.
    pub fn new(p: &nn::Path, cfg: &ClipVisionConfig, with_projection: bool) -> Result<Self> {
        cfg.validate()?;
        let vm = p / "vision_model";
        let emb = &vm / "embeddings";
        let h = cfg.hidden_size;
        let class_embedding = emb.zeros("class_embedding", &[h]);
        let patch_embedding = nn::conv2d(
            &emb / "patch_embedding",
            cfg.num_channels,
            h,
            cfg.patch_size,
            nn::ConvConfig {
                stride: cfg.patch_size,
                bias: false,
                ..Default::default()
            },
        );
        let position_embedding = nn::embedding(
            &emb / "position_embedding",
            cfg.num_positions(),
            h,
            Default::default(),
        );
        let ln = nn::LayerNormConfig {
            eps: cfg.layer_norm_eps,
            ..Default::default()
        };
        let pre_layrnorm = nn::layer_norm(&vm / "pre_layrnorm", vec![h], ln);
        let enc = &vm / "encoder" / "layers";
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(&(&enc / i), h, cfg.intermediate_size, cfg.layer_norm_eps))
            .collect();
        let post_layernorm = nn::layer_norm(&vm / "post_layernorm", vec![h], ln);
        let visual_projection = with_projection.then(|| {
            nn::linear(
                p / "visual_projection",
                h,
                cfg.projection_dim,
                nn::LinearConfig {
                    bias: false,
                    ..Default::default()
                },
            )
        });
        Ok(ClipVisionModel {
            class_embedding,
            patch_embedding,
            position_embedding,
            pre_layrnorm,
            layers,
            post_layernorm,
            visual_projection,
            act: parse_activation(&cfg.hidden_act)?,
            heads: cfg.num_attention_heads,
            hidden: h,
            channels: cfg.num_channels,
            image_size: cfg.image_size,
        })
    }

    pub fn has_projection(&self) -> bool {
        self.visual_projection.is_some()
    }

    /// Side of the square input.
    pub fn image_size(&self) -> i64 {
        self.image_size
    }

    /// Run the tower on normalised `pixel_values` [B, C, S, S] with S = `image_size`.
    pub fn forward(&self, pixel_values: &Tensor) -> Result<ClipVisionOutput> {
        let s = pixel_values.size();
        ensure!(
            s.len() == 4
                && s[1] == self.channels
                && s[2] == self.image_size
                && s[3] == self.image_size,
            "CLIP vision pixel_values must be [B, {}, {}, {}], got {s:?}",
            self.channels,
            self.image_size,
            self.image_size
        );
        let b = s[0];
        let h = self.hidden;
        let w = &self.position_embedding.ws;
        let x = pixel_values.to_device(w.device()).to_kind(w.kind());
        let patches = self
            .patch_embedding
            .forward(&x)
            .flatten(2, -1)
            .transpose(1, 2);
        let cls = self
            .class_embedding
            .view([1, 1, h])
            .expand([b, 1, h], false);
        let emb = Tensor::cat(&[cls, patches], 1) + w.unsqueeze(0);
        let mut x = self.pre_layrnorm.forward(&emb);
        for layer in &self.layers {
            x = layer.forward(&x, self.heads, self.act, None, false);
        }
        let pooler_output = self.post_layernorm.forward(&x.select(1, 0));
        let image_embeds = self
            .visual_projection
            .as_ref()
            .map(|p| p.forward(&pooler_output));
        Ok(ClipVisionOutput {
            last_hidden_state: x,
            pooler_output,
            image_embeds,
        })
    }
}

/// A CLIP vision tower loaded from a checkpoint folder.
pub struct LoadedClipVision {
    pub vs: VarStore,
    pub model: ClipVisionModel,
    pub config: ClipVisionConfig,
    /// True when the folder is a full `CLIPModel` (text tower skipped).
    pub full_clip_model: bool,
}

/// Load options for the vision variables of `names` (the tensor names of the
/// checkpoint): position-id buffers ignored, unprefixed names renamed, and, for a
/// full `CLIPModel`, the text tower and `logit_scale` skipped when `skip_text`.
pub(crate) fn vision_load_options(names: &[String], skip_text: bool) -> weights::LoadOptions {
    let mut opts = weights::LoadOptions {
        ignore: vec![
            "vision_model.embeddings.position_ids".into(),
            "embeddings.position_ids".into(),
        ],
        rename: Vec::new(),
    };
    if skip_text {
        opts.ignore.extend([
            "text_model.".to_string(),
            "text_projection.weight".to_string(),
            "logit_scale".to_string(),
        ]);
    }
    if !names.iter().any(|n| n.starts_with("vision_model.")) {
        for p in [
            "embeddings.",
            "encoder.",
            "pre_layrnorm.",
            "post_layernorm.",
        ] {
            opts.rename
                .push((p.to_string(), format!("vision_model.{p}")));
        }
    }
    opts
}

impl ClipVisionModel {
    /// Load `config.json` + `model[.fp16].safetensors` from `dir`: a
    /// `CLIPVisionModel[WithProjection]` folder or a full `CLIPModel` folder. The
    /// projection is built when the config names `CLIPVisionModelWithProjection` or
    /// `CLIPModel`, or the weights hold `visual_projection.weight`. Weights are
    /// converted to `kind`.
    pub fn load(dir: &Path, device: Device, kind: Kind) -> Result<LoadedClipVision> {
        let (config, full) = ClipVisionConfig::from_file(&dir.join("config.json"))?;
        let files = weights::find_weight_files(dir, &["model"], Some("fp16"))?;
        let mut names = Vec::new();
        for f in &files {
            names.extend(weights::tensor_names(f)?);
        }
        let with_projection = full
            || config.declares_projection()
            || names.iter().any(|n| n == "visual_projection.weight");
        let mut vs = VarStore::new(device);
        let model = ClipVisionModel::new(&vs.root(), &config, with_projection)
            .with_context(|| format!("building the CLIP vision tower of {}", dir.display()))?;
        if kind != Kind::Float {
            vs.set_kind(kind);
        }
        let opts = vision_load_options(&names, full);
        weights::load_into(&mut vs, &files, &opts)?;
        vs.freeze();
        Ok(LoadedClipVision {
            vs,
            model,
            config,
            full_clip_model: full,
        })
    }
}

// ---------------------------------------------------------------------------------
// Image preprocessing.

/// How the image is resized before the crop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTo {
    /// Shortest side to this many pixels, keeping the aspect ratio (the long side
    /// is truncated to an integer, as transformers does).
    ShortestEdge(u32),
    /// Exactly this height and width.
    Exact { height: u32, width: u32 },
}

/// transformers' `CLIPImageProcessor` (PIL backend) settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipImageProcessor {
    pub resize: ResizeTo,
    /// Centre crop (height, width); None when `do_center_crop` is false.
    pub crop: Option<(u32, u32)>,
    pub rescale_factor: f64,
    pub mean: [f64; 3],
    pub std: [f64; 3],
}

impl ClipImageProcessor {
    /// The OpenAI CLIP recipe for a square input of `image_size`.
    pub fn new(image_size: u32) -> Self {
        ClipImageProcessor {
            resize: ResizeTo::ShortestEdge(image_size),
            crop: Some((image_size, image_size)),
            rescale_factor: 1.0 / 255.0,
            mean: CLIP_MEAN,
            std: CLIP_STD,
        }
    }

    /// `preprocessor_config.json` of `dir` when present, else [`Self::new`].
    pub fn from_dir(dir: &Path, image_size: u32) -> Result<Self> {
        let p = dir.join("preprocessor_config.json");
        if p.is_file() {
            Self::from_file(&p, image_size)
        } else {
            Ok(Self::new(image_size))
        }
    }

    /// Read a `preprocessor_config.json`; fields it lacks take the CLIP defaults.
    /// Settings this port does not implement are errors naming the field.
    pub fn from_file(path: &Path, image_size: u32) -> Result<Self> {
        let v = crate::models::config::read_json(path)?;
        let mut out = Self::new(image_size);
        let bad = |field: &str, why: &str| anyhow::anyhow!("{}: {field}: {why}", path.display());
        let as_u32 = |x: &serde_json::Value, field: &str| -> Result<u32> {
            x.as_u64()
                .filter(|&n| n > 0 && n <= u32::MAX as u64)
                .map(|n| n as u32)
                .ok_or_else(|| bad(field, &format!("expected a positive integer, found {x}")))
        };
        for flag in ["do_resize", "do_rescale", "do_normalize", "do_convert_rgb"] {
            if let Some(f) = v.get(flag) {
                ensure!(
                    f.as_bool() != Some(false),
                    bad(
                        flag,
                        "false is not supported (CLIP preprocessing always does this step)"
                    )
                );
            }
        }
        if let Some(r) = v.get("resample") {
            ensure!(
                r.as_u64() == Some(3),
                bad(
                    "resample",
                    &format!("{r} is not supported (only 3, bicubic, as CLIP uses)")
                )
            );
        }
        if let Some(s) = v.get("size") {
            out.resize = if let Some(n) = s.get("shortest_edge") {
                ensure!(
                    s.get("longest_edge").is_none(),
                    bad("size", "longest_edge is not supported")
                );
                ResizeTo::ShortestEdge(as_u32(n, "size.shortest_edge")?)
            } else if let (Some(h), Some(w)) = (s.get("height"), s.get("width")) {
                ResizeTo::Exact {
                    height: as_u32(h, "size.height")?,
                    width: as_u32(w, "size.width")?,
                }
            } else if s.is_u64() {
                ResizeTo::ShortestEdge(as_u32(s, "size")?)
            } else {
                bail!(bad(
                    "size",
                    &format!("expected {{\"shortest_edge\": N}}, {{\"height\", \"width\"}} or N, found {s}")
                ));
            };
        }
        let crop_on = v
            .get("do_center_crop")
            .map(|f| f.as_bool() != Some(false))
            .unwrap_or(true);
        out.crop = if !crop_on {
            None
        } else if let Some(c) = v.get("crop_size") {
            if let (Some(h), Some(w)) = (c.get("height"), c.get("width")) {
                Some((
                    as_u32(h, "crop_size.height")?,
                    as_u32(w, "crop_size.width")?,
                ))
            } else if c.is_u64() {
                let n = as_u32(c, "crop_size")?;
                Some((n, n))
            } else {
                bail!(bad(
                    "crop_size",
                    &format!("expected {{\"height\", \"width\"}} or N, found {c}")
                ));
            }
        } else {
            Some((image_size, image_size))
        };
        if let Some(f) = v.get("rescale_factor") {
            out.rescale_factor = f.as_f64().filter(|x| *x > 0.0).ok_or_else(|| {
                bad(
                    "rescale_factor",
                    &format!("expected a positive number, found {f}"),
                )
            })?;
        }
        for (field, dst) in [("image_mean", &mut out.mean), ("image_std", &mut out.std)] {
            if let Some(m) = v.get(field) {
                let vals: Vec<f64> = m
                    .as_array()
                    .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
                    .unwrap_or_default();
                ensure!(
                    vals.len() == 3,
                    bad(field, &format!("expected 3 numbers, found {m}"))
                );
                dst.copy_from_slice(&vals);
            }
        }
        ensure!(
            out.std.iter().all(|s| *s != 0.0),
            bad("image_std", "a standard deviation is 0")
        );
        Ok(out)
    }

    /// (width, height) after the resize of an image of `width` x `height`.
    pub fn resized_size(&self, width: u32, height: u32) -> (u32, u32) {
        match self.resize {
            ResizeTo::Exact { height, width } => (width, height),
            ResizeTo::ShortestEdge(s) => {
                let (short, long) = if width <= height {
                    (width, height)
                } else {
                    (height, width)
                };
                let new_long = (s as f64 * long as f64 / short as f64) as u32;
                if width <= height {
                    (s, new_long)
                } else {
                    (new_long, s)
                }
            }
        }
    }

    /// Resized and cropped 8-bit image (before rescaling and normalisation).
    pub fn resize_and_crop(&self, img: &image::RgbImage) -> Result<image::RgbImage> {
        let (w, h) = img.dimensions();
        ensure!(w > 0 && h > 0, "CLIP preprocessing: the image is empty");
        let (nw, nh) = self.resized_size(w, h);
        ensure!(
            nw > 0 && nh > 0,
            "CLIP preprocessing: a {w}x{h} image resizes to {nw}x{nh}"
        );
        let resized = resize_bicubic_pil(img, nw, nh);
        let Some((ch, cw)) = self.crop else {
            return Ok(resized);
        };
        ensure!(
            ch <= nh && cw <= nw,
            "CLIP preprocessing: crop {cw}x{ch} is larger than the resized image {nw}x{nh} (padding is not supported)"
        );
        let top = (nh - ch) / 2;
        let left = (nw - cw) / 2;
        Ok(image::imageops::crop_imm(&resized, left, top, cw, ch).to_image())
    }

    /// `pixel_values` [3, H, W] float32 of one RGB image.
    pub fn preprocess(&self, img: &image::RgbImage) -> Result<Tensor> {
        let out = self.resize_and_crop(img)?;
        let (w, h) = out.dimensions();
        let n = (w * h) as usize;
        let mut planes = vec![0f32; 3 * n];
        let mean = self.mean.map(|m| m as f32);
        let std = self.std.map(|s| s as f32);
        for (i, px) in out.pixels().enumerate() {
            for c in 0..3 {
                // As numpy does it: rescale in float64, cast to float32, then
                // normalise in float32.
                let x = (px[c] as f64 * self.rescale_factor) as f32;
                planes[c * n + i] = (x - mean[c]) / std[c];
            }
        }
        Ok(Tensor::from_slice(&planes).view([3, h as i64, w as i64]))
    }
}

/// Read an image file as 8-bit RGB; an alpha channel is composited on white.
pub fn load_rgb8(path: &Path) -> Result<image::RgbImage> {
    let img = image::open(path).with_context(|| format!("cannot read image {}", path.display()))?;
    if !img.color().has_alpha() {
        return Ok(img.to_rgb8());
    }
    let rgba = img.to_rgba8();
    let (w, h) = rgba.dimensions();
    Ok(image::RgbImage::from_fn(w, h, |x, y| {
        let p = rgba.get_pixel(x, y);
        let a = p[3] as u32;
        let mix = |c: u8| ((c as u32 * a + 255 * (255 - a) + 127) / 255) as u8;
        image::Rgb([mix(p[0]), mix(p[1]), mix(p[2])])
    }))
}

// ---------------------------------------------------------------------------------
// Pillow's bicubic resampling of 8-bit images.

/// Fixed-point precision of Pillow's 8-bit resampling coefficients.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Keys' cubic convolution kernel with a = -0.5 (Pillow's BICUBIC), support 2.
fn bicubic_kernel(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// The taps of one output sample: first input index, and fixed-point weights.
struct Taps {
    first: Vec<usize>,
    weights: Vec<Vec<i32>>,
}

/// Resampling taps from `in_size` to `out_size` samples. The kernel is stretched
/// by the scale when shrinking (antialiasing); the weights of each output are
/// normalised to sum 1, then rounded (half away from zero) to `PRECISION_BITS`.
fn taps(in_size: usize, out_size: usize) -> Taps {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = 2.0 * filter_scale;
    let inv = 1.0 / filter_scale;
    let one = (1u32 << PRECISION_BITS) as f64;
    let mut first = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for o in 0..out_size {
        let center = (o as f64 + 0.5) * scale;
        // Truncation toward zero, then clamping, as the C code does.
        let lo = ((center - support + 0.5) as i64).max(0) as usize;
        let hi = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let w: Vec<f64> = (lo..hi)
            .map(|i| bicubic_kernel((i as f64 - center + 0.5) * inv))
            .collect();
        let total: f64 = w.iter().sum();
        let fixed = w
            .iter()
            .map(|&x| {
                let x = if total != 0.0 { x / total } else { x };
                if x < 0.0 {
                    (-0.5 + x * one) as i32
                } else {
                    (0.5 + x * one) as i32
                }
            })
            .collect();
        first.push(lo);
        weights.push(fixed);
    }
    Taps { first, weights }
}

/// Round a fixed-point accumulator to a byte, clamping to [0, 255].
fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One separable pass over 3-channel rows: `horizontal` resamples along x.
fn resample_pass(
    src: &[u8],
    (w, h): (usize, usize),
    taps: &Taps,
    horizontal: bool,
) -> (Vec<u8>, (usize, usize)) {
    let n = taps.first.len();
    let (ow, oh) = if horizontal { (n, h) } else { (w, n) };
    let mut out = vec![0u8; ow * oh * 3];
    let half = 1i64 << (PRECISION_BITS - 1);
    for y in 0..oh {
        for x in 0..ow {
            let o = if horizontal { x } else { y };
            let (lo, k) = (taps.first[o], &taps.weights[o]);
            let mut acc = [half; 3];
            for (t, &kw) in k.iter().enumerate() {
                let (sx, sy) = if horizontal { (lo + t, y) } else { (x, lo + t) };
                let base = (sy * w + sx) * 3;
                for c in 0..3 {
                    acc[c] += src[base + c] as i64 * kw as i64;
                }
            }
            let base = (y * ow + x) * 3;
            for c in 0..3 {
                out[base + c] = clip8(acc[c]);
            }
        }
    }
    (out, (ow, oh))
}

/// Resize like Pillow's `Image.resize((width, height), Image.BICUBIC)` on an RGB
/// image: a horizontal pass, then a vertical pass, each only when that side
/// changes, each rounded to 8 bits.
pub fn resize_bicubic_pil(img: &image::RgbImage, width: u32, height: u32) -> image::RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (nw, nh) = (width as usize, height as usize);
    let mut buf = img.as_raw().clone();
    let mut size = (w, h);
    if nw != w {
        (buf, size) = resample_pass(&buf, size, &taps(w, nw), true);
    }
    if nh != h {
        (buf, size) = resample_pass(&buf, size, &taps(h, nh), false);
    }
    image::RgbImage::from_raw(size.0 as u32, size.1 as u32, buf)
        .expect("resampled buffer matches its size")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_values() {
        assert_eq!(bicubic_kernel(0.0), 1.0);
        assert_eq!(bicubic_kernel(1.0), 0.0);
        assert_eq!(bicubic_kernel(2.0), 0.0);
        assert!((bicubic_kernel(0.5) - 0.5625).abs() < 1e-12);
        assert!((bicubic_kernel(1.5) + 0.0625).abs() < 1e-12);
    }

    #[test]
    fn taps_sum_to_one_in_fixed_point() {
        for (i, o) in [(52, 39), (14, 30), (224, 224), (512, 224), (7, 3)] {
            let t = taps(i, o);
            for k in &t.weights {
                let s: i64 = k.iter().map(|&x| x as i64).sum();
                assert!(
                    (s - (1i64 << PRECISION_BITS)).abs() <= k.len() as i64,
                    "{i}->{o}: {s}"
                );
            }
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = image::RgbImage::from_pixel(37, 23, image::Rgb([10, 128, 250]));
        let out = resize_bicubic_pil(&img, 11, 50);
        assert_eq!(out.dimensions(), (11, 50));
        assert!(out.pixels().all(|p| p.0 == [10, 128, 250]));
    }

    #[test]
    fn shortest_edge_sizes_like_transformers() {
        let p = ClipImageProcessor::new(224);
        assert_eq!(p.resized_size(512, 512), (224, 224));
        assert_eq!(p.resized_size(640, 480), (298, 224));
        assert_eq!(p.resized_size(480, 640), (224, 298));
        let p = ClipImageProcessor::new(30);
        assert_eq!(p.resized_size(40, 52), (30, 39));
        assert_eq!(p.resized_size(20, 14), (42, 30));
    }
}
