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
    pub vae: LoadedVae,
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
        let vae = LoadedVae::load(&dir.join("vae"), device, frozen_kind).context("loading vae/")?;
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
        tch::manual_seed(seed);
        let clip_cfg = ClipTextConfig::tiny();
        let mut ucfg = UNetConfig::tiny_sd15();
        ucfg.cross_attention_dim = crate::models::unet::PerBlock::One(clip_cfg.hidden_size);
        let unet = LoadedUNet::from_config(&ucfg, device, Kind::Float)?;
        let vcfg = tiny_vae_config()?;
        let mut vs = nn::VarStore::new(device);
        let model = AutoencoderKL::new(&vs.root(), &vcfg)?;
        vs.freeze();
        let vae = LoadedVae {
            vs,
            model,
            config: vcfg,
        };
        let mut tvs = nn::VarStore::new(device);
        let model = ClipTextModel::new(&tvs.root(), &clip_cfg, false)?;
        tvs.freeze();
        let encoder = LoadedClipText {
            vs: tvs,
            model,
            config: clip_cfg,
        };
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
            schedule: ScheduleConfig::sd15(),
            device,
            unet_file_kind: Kind::Float,
        })
    }

    /// Pixel size of one latent cell.
    pub fn vae_scale(&self) -> i64 {
        self.vae.model.downscale()
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
                let v = serde_json::json!({
                    "_class_name": "StableDiffusionPipeline",
                    "_diffusers_version": "0.42.1",
                    "unet": ["diffusers", "UNet2DConditionModel"],
                    "vae": ["diffusers", "AutoencoderKL"],
                    "text_encoder": ["transformers", "CLIPTextModel"],
                    "tokenizer": ["transformers", "CLIPTokenizer"],
                    "scheduler": ["diffusers", "DDIMScheduler"],
                    "safety_checker": [null, null],
                    "feature_extractor": [null, null],
                    "requires_safety_checker": false
                });
                crate::weights::atomic_write(
                    &out.join("model_index.json"),
                    serde_json::to_string_pretty(&v)?.as_bytes(),
                )?;
                let vae_dir = out.join("vae");
                std::fs::create_dir_all(&vae_dir)?;
                let mut vcfg = serde_json::to_value(&self.vae.config)?;
                vcfg["_class_name"] = "AutoencoderKL".into();
                crate::weights::atomic_write(
                    &vae_dir.join("config.json"),
                    serde_json::to_string_pretty(&vcfg)?.as_bytes(),
                )?;
                crate::weights::save_varstore(
                    &self.vae.vs,
                    &vae_dir.join("diffusion_pytorch_model.safetensors"),
                    None,
                )?;
                let te = &self.text[0];
                let te_dir = out.join("text_encoder");
                std::fs::create_dir_all(&te_dir)?;
                let mut tcfg = serde_json::to_value(&te.encoder.config)?;
                tcfg["architectures"] = serde_json::json!(["CLIPTextModel"]);
                tcfg["model_type"] = "clip_text_model".into();
                crate::weights::atomic_write(
                    &te_dir.join("config.json"),
                    serde_json::to_string_pretty(&tcfg)?.as_bytes(),
                )?;
                let named: Vec<(String, Tensor)> = te
                    .encoder
                    .vs
                    .variables()
                    .into_iter()
                    .map(|(k, v)| (format!("text_model.{k}"), v))
                    .collect();
                crate::weights::save_safetensors(
                    &named,
                    &te_dir.join("model.safetensors"),
                    None,
                    None,
                )?;
                copy_recursive(&builtin_tokenizer_dir(), &out.join("tokenizer"))?;
                let sched_dir = out.join("scheduler");
                std::fs::create_dir_all(&sched_dir)?;
                let mut s = serde_json::to_value(&self.schedule)?;
                s["_class_name"] = "DDIMScheduler".into();
                crate::weights::atomic_write(
                    &sched_dir.join("scheduler_config.json"),
                    serde_json::to_string_pretty(&s)?.as_bytes(),
                )?;
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
