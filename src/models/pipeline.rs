//! Stable Diffusion pipelines in the diffusers folder layout: `model_index.json`,
//! `unet/`, `vae/`, `text_encoder/` + `tokenizer/` (and `text_encoder_2/` +
//! `tokenizer_2/` for SDXL), `scheduler/`.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind, Tensor};

use crate::models::clip::{ClipTextConfig, ClipTextModel, LoadedClipText};
use crate::models::tokenizer::{ClipTokenizer, Pad};
use crate::models::unet::{LoadedUNet, UNetConfig};
use crate::models::vae::{AutoencoderKL, LoadedVae, VaeConfig};
use crate::schedule::ScheduleConfig;
use crate::train::path::Cond;

/// One CLIP text encoder with its tokenizer.
pub struct TextEncoder {
    pub tokenizer: ClipTokenizer,
    pub pad: Pad,
    pub encoder: LoadedClipText,
    /// Folder names in the pipeline (for saving).
    pub names: (String, String),
}

/// The family of a pipeline, which decides how the text conditioning is formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// SD 1.x / 2.x: last hidden state of one CLIP encoder.
    Sd,
    /// SDXL: penultimate states of two encoders concatenated, pooled projection of
    /// the second, micro-conditioning time ids.
    Sdxl,
}

/// A loaded pipeline. The UNet is trainable; the VAE and the text encoders are frozen.
pub struct Pipeline {
    /// Source folder (None for the built-in tiny random pipeline).
    pub dir: Option<PathBuf>,
    pub family: Family,
    pub unet: LoadedUNet,
    /// The autoencoder; None for a pixel-space model (latents are the images).
    pub vae: Option<LoadedVae>,
    pub text: Vec<TextEncoder>,
    pub schedule: ScheduleConfig,
    pub device: Device,
    /// dtype of the UNet weights on disk (kept when saving).
    pub unet_file_kind: Kind,
}

/// The tokenizer that ships in `tests/fixtures` (the real CLIP BPE vocabulary) is used
/// by the tiny random pipeline.
pub fn builtin_tokenizer_dir() -> PathBuf {
    crate::fixtures::dir("tokenizer_clip/tokenizer")
}

fn tiny_vae_config() -> Result<VaeConfig> {
    VaeConfig::from_value(&serde_json::json!({
        "_class_name": "AutoencoderKL",
        "block_out_channels": [8, 16],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "scaling_factor": 0.18215
    }))
}

/// What [`Pipeline::random`] builds.
#[derive(Debug, Clone)]
pub struct RandomSpec {
    pub unet: UNetConfig,
    pub clip: ClipTextConfig,
    /// None: a pixel-space model.
    pub vae: Option<VaeConfig>,
    pub schedule: ScheduleConfig,
}

impl RandomSpec {
    /// Tiny SD1.x-style models for smoke tests.
    pub fn tiny() -> Result<RandomSpec> {
        Ok(RandomSpec {
            unet: UNetConfig::tiny_sd15(),
            clip: ClipTextConfig::tiny(),
            vae: Some(tiny_vae_config()?),
            schedule: ScheduleConfig::sd15(),
        })
    }

    /// The demo's base model: a small UNet of the SD architecture working in pixel
    /// space on 32x32 RGB images, a small CLIP text encoder (frozen after random
    /// initialisation) and a v-prediction schedule with linear betas (at 32 px the
    /// scaled-linear schedule leaves too much signal at t = T).
    pub fn demo() -> Result<RandomSpec> {
        let mut unet = UNetConfig::tiny_sd15();
        unet.in_channels = 3;
        unet.out_channels = 3;
        unet.sample_size = Some(32);
        unet.block_out_channels = vec![32, 64, 64];
        // Attention at 16x16 and 8x8 only: at 32x32 (1024 tokens) it dominates the cost
        // on a CPU for little benefit at this size.
        unet.down_block_types =
            ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"].map(String::from).to_vec();
        unet.up_block_types = ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"].map(String::from).to_vec();
        unet.layers_per_block = crate::models::unet::PerBlock::One(1);
        unet.attention_head_dim = crate::models::unet::PerBlock::One(4);
        unet.norm_num_groups = Some(8);
        let mut clip = ClipTextConfig::tiny();
        clip.hidden_size = 64;
        clip.intermediate_size = 128;
        clip.num_attention_heads = 4;
        clip.num_hidden_layers = 2;
        let schedule = ScheduleConfig {
            beta_schedule: crate::schedule::BetaSchedule::Linear,
            beta_start: 1e-4,
            beta_end: 0.02,
            prediction_type: crate::schedule::Prediction::VPrediction,
            timestep_spacing: crate::schedule::Spacing::Trailing,
            steps_offset: 0,
            set_alpha_to_one: true,
            ..ScheduleConfig::sd15()
        };
        Ok(RandomSpec { unet, clip, vae: None, schedule })
    }

    pub fn by_name(name: &str) -> Result<RandomSpec> {
        match name {
            "tiny" => Self::tiny(),
            "demo" => Self::demo(),
            _ => bail!("unknown model preset {name:?}: expected tiny or demo"),
        }
    }
}

impl Pipeline {
    /// Load a diffusers pipeline folder. The UNet is loaded in `unet_kind` (float32 for
    /// training on CPU); the frozen parts in `frozen_kind`.
    pub fn load(
        dir: &Path,
        device: Device,
        unet_kind: Kind,
        frozen_kind: Kind,
    ) -> Result<Pipeline> {
        let index = dir.join("model_index.json");
        if !index.is_file() {
            bail!(
                "{}: not a diffusers pipeline folder (model_index.json is missing)",
                dir.display()
            );
        }
        let mi = crate::models::config::read_json(&index)?;
        let class = mi["_class_name"].as_str().unwrap_or("");
        if class.contains("StableDiffusion3") {
            bail!(
                "{}: {class} pipelines (SD3) are not supported yet",
                dir.display()
            );
        }
        let family = if mi
            .get("text_encoder_2")
            .map(|v| !v.is_null() && v[0].is_string())
            .unwrap_or(false)
        {
            Family::Sdxl
        } else {
            Family::Sd
        };
        let unet_dir = dir.join("unet");
        let weights =
            crate::weights::find_weight_files(&unet_dir, &["diffusion_pytorch_model"], None)
                .or_else(|_| {
                    crate::weights::find_weight_files(
                        &unet_dir,
                        &["diffusion_pytorch_model"],
                        Some("fp16"),
                    )
                })?;
        let unet_file_kind = crate::weights::file_float_kind(&weights[0])?;
        let unet = LoadedUNet::load(&unet_dir, device, unet_kind).context("loading unet/")?;
        let has_vae = mi.get("vae").map(|v| v[0].is_string()).unwrap_or(false);
        let vae = if has_vae {
            Some(LoadedVae::load(&dir.join("vae"), device, frozen_kind).context("loading vae/")?)
        } else {
            None
        };
        let mut text = Vec::new();
        let pairs: &[(&str, &str)] = match family {
            Family::Sd => &[("text_encoder", "tokenizer")],
            Family::Sdxl => &[
                ("text_encoder", "tokenizer"),
                ("text_encoder_2", "tokenizer_2"),
            ],
        };
        for (enc, tok) in pairs {
            let tokenizer = ClipTokenizer::from_dir(&dir.join(tok))
                .with_context(|| format!("loading {tok}/"))?;
            let mut encoder = ClipTextModel::load(&dir.join(enc), device, frozen_kind)
                .with_context(|| format!("loading {enc}/"))?;
            encoder.vs.freeze();
            text.push(TextEncoder {
                tokenizer,
                pad: Pad::Config,
                encoder,
                names: (enc.to_string(), tok.to_string()),
            });
        }
        let sched_file = dir.join("scheduler").join("scheduler_config.json");
        let schedule = if sched_file.is_file() {
            ScheduleConfig::from_file(&sched_file)?
        } else {
            tracing::warn!(
                "{}: no scheduler config, using the SD1.5 schedule",
                dir.display()
            );
            ScheduleConfig::sd15()
        };
        Ok(Pipeline {
            dir: Some(dir.to_path_buf()),
            family,
            unet,
            vae,
            text,
            schedule,
            device,
            unet_file_kind,
        })
    }

    /// Randomly initialised tiny models of the real SD1.x architectures (UNet, VAE,
    /// CLIP text encoder) with the real CLIP tokenizer: for smoke tests.
    pub fn tiny_random(device: Device, seed: i64) -> Result<Pipeline> {
        Self::random(&RandomSpec::tiny()?, device, seed)
    }

    /// A pipeline with randomly initialised weights for `spec` (the starting point of
    /// pretraining from scratch) and the real CLIP tokenizer.
    pub fn random(spec: &RandomSpec, device: Device, seed: i64) -> Result<Pipeline> {
        tch::manual_seed(seed);
        let mut ucfg = spec.unet.clone();
        ucfg.cross_attention_dim = crate::models::unet::PerBlock::One(spec.clip.hidden_size);
        let unet = LoadedUNet::from_config(&ucfg, device, Kind::Float)?;
        let vae = match &spec.vae {
            Some(vcfg) => {
                let mut vs = nn::VarStore::new(device);
                let model = AutoencoderKL::new(&vs.root(), vcfg)?;
                vs.freeze();
                Some(LoadedVae { vs, model, config: vcfg.clone() })
            }
            None => None,
        };
        let mut tvs = nn::VarStore::new(device);
        let model = ClipTextModel::new(&tvs.root(), &spec.clip, false)?;
        tvs.freeze();
        let encoder = LoadedClipText { vs: tvs, model, config: spec.clip.clone() };
        let tokenizer = ClipTokenizer::from_dir(&builtin_tokenizer_dir())?;
        let text = vec![TextEncoder {
            tokenizer,
            pad: Pad::Eos,
            encoder,
            names: ("text_encoder".into(), "tokenizer".into()),
        }];
        Ok(Pipeline {
            dir: None,
            family: Family::Sd,
            unet,
            vae,
            text,
            schedule: spec.schedule.clone(),
            device,
            unet_file_kind: Kind::Float,
        })
    }

    /// Pixel size of one latent cell.
    pub fn vae_scale(&self) -> i64 {
        self.vae.as_ref().map(|v| v.model.downscale()).unwrap_or(1)
    }

    /// Images in [-1, 1] to the (scaled) latents the UNet works on; identity for a
    /// pixel-space model. Differentiable.
    pub fn to_latents(&self, images: &Tensor) -> Result<Tensor> {
        match &self.vae {
            Some(v) => v.model.latents_from_image(images, false),
            None => Ok(images.shallow_clone()),
        }
    }

    /// Latents back to images in [-1, 1] (not clamped). Differentiable.
    pub fn to_images(&self, latents: &Tensor) -> Result<Tensor> {
        match &self.vae {
            Some(v) => v.model.image_from_latents(latents),
            None => Ok(latents.shallow_clone()),
        }
    }

    /// Encode captions into the UNet conditioning (no gradient: the encoders are
    /// frozen). `time_ids` [B, 6] is used by SDXL only. Returns the conditioning and
    /// the number of captions truncated to the tokenizer window.
    pub fn encode_text(
        &self,
        captions: &[String],
        time_ids: Option<&Tensor>,
    ) -> Result<(Cond, usize)> {
        tch::no_grad(|| {
            let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
            let mut states = Vec::new();
            let mut pooled = None;
            let mut truncated = 0;
            for te in &self.text {
                let (ids, n) = te.tokenizer.encode_padded(&refs, te.pad)?;
                truncated = truncated.max(n);
                let out = te
                    .encoder
                    .model
                    .forward(&ids.to_device(self.device), None)?;
                match self.family {
                    Family::Sd => states.push(out.last_hidden_state.shallow_clone()),
                    Family::Sdxl => {
                        states.push(out.penultimate().shallow_clone());
                        if let Some(p) = &out.text_embeds {
                            pooled = Some(p.shallow_clone());
                        }
                    }
                }
            }
            let context = Tensor::cat(&states, 2).to_kind(Kind::Float);
            let mut cond = Cond::new(context);
            if self.family == Family::Sdxl {
                let b = captions.len() as i64;
                cond.pooled = Some(
                    pooled
                        .context("SDXL: text_encoder_2 has no projection")?
                        .to_kind(Kind::Float),
                );
                cond.time_ids = Some(match time_ids {
                    Some(t) => t.to_device(self.device).to_kind(Kind::Float),
                    None => bail!("SDXL conditioning needs time ids"),
                });
                let _ = b;
            }
            Ok((cond, truncated))
        })
    }

    /// Write the pipeline to `out` in the diffusers layout: the (tuned) UNet in the
    /// dtype it was read in, every other component copied unchanged from the source
    /// folder (or, for the tiny random pipeline, written from memory).
    pub fn save(&self, out: &Path) -> Result<()> {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        match &self.dir {
            Some(src) => {
                for entry in
                    std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))?
                {
                    let entry = entry?;
                    let name = entry.file_name();
                    if name == "unet" {
                        continue;
                    }
                    copy_recursive(&entry.path(), &out.join(&name))?;
                }
            }
            None => {
                let mut v = serde_json::json!({
                    "_class_name": "StableDiffusionPipeline",
                    "_diffusers_version": "0.42.1",
                    "unet": ["diffusers", "UNet2DConditionModel"],
                    "vae": [null, null],
                    "text_encoder": ["transformers", "CLIPTextModel"],
                    "tokenizer": ["transformers", "CLIPTokenizer"],
                    "scheduler": ["diffusers", "DDIMScheduler"],
                    "safety_checker": [null, null],
                    "feature_extractor": [null, null],
                    "requires_safety_checker": false
                });
                if let Some(vae) = &self.vae {
                    v["vae"] = serde_json::json!(["diffusers", "AutoencoderKL"]);
                    let vae_dir = out.join("vae");
                    std::fs::create_dir_all(&vae_dir)?;
                    let mut vcfg = serde_json::to_value(&vae.config)?;
                    vcfg["_class_name"] = "AutoencoderKL".into();
                    crate::weights::atomic_write(&vae_dir.join("config.json"), serde_json::to_string_pretty(&vcfg)?.as_bytes())?;
                    crate::weights::save_varstore(&vae.vs, &vae_dir.join("diffusion_pytorch_model.safetensors"), None)?;
                }
                crate::weights::atomic_write(&out.join("model_index.json"), serde_json::to_string_pretty(&v)?.as_bytes())?;
                let te = &self.text[0];
                let te_dir = out.join("text_encoder");
                std::fs::create_dir_all(&te_dir)?;
                let mut tcfg = serde_json::to_value(&te.encoder.config)?;
                tcfg["architectures"] = serde_json::json!(["CLIPTextModel"]);
                tcfg["model_type"] = "clip_text_model".into();
                crate::weights::atomic_write(&te_dir.join("config.json"), serde_json::to_string_pretty(&tcfg)?.as_bytes())?;
                let mut named: Vec<(String, Tensor)> =
                    te.encoder.vs.variables().into_iter().collect();
                named.sort_by(|a, b| a.0.cmp(&b.0));
                crate::weights::save_safetensors(&named, &te_dir.join("model.safetensors"), None, None)?;
                copy_recursive(&builtin_tokenizer_dir(), &out.join("tokenizer"))?;
                let sched_dir = out.join("scheduler");
                std::fs::create_dir_all(&sched_dir)?;
                let mut sc = serde_json::to_value(&self.schedule)?;
                sc["_class_name"] = "DDIMScheduler".into();
                crate::weights::atomic_write(&sched_dir.join("scheduler_config.json"), serde_json::to_string_pretty(&sc)?.as_bytes())?;
            }
        }
        self.unet
            .save_pretrained(&out.join("unet"), self.unet_file_kind)
    }
}

fn copy_recursive(src: &Path, dst: &Path) -> Result<()> {
    if src.is_dir() {
        std::fs::create_dir_all(dst).with_context(|| format!("creating {}", dst.display()))?;
        for e in std::fs::read_dir(src)? {
            let e = e?;
            copy_recursive(&e.path(), &dst.join(e.file_name()))?;
        }
    } else {
        std::fs::copy(src, dst)
            .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
    }
    Ok(())
}
