//! Stable Diffusion pipelines in the diffusers folder layout.
//!
//! * SD 1.x / 2.x: `model_index.json`, `unet/`, `vae/`, `text_encoder/` +
//!   `tokenizer/`, `scheduler/`; SDXL adds `text_encoder_2/` + `tokenizer_2/`.
//! * SD3 (`StableDiffusion3Pipeline`): `transformer/` (the MMDiT) instead of `unet/`,
//!   `text_encoder{,_2,_3}/` + `tokenizer{,_2,_3}/` (CLIP-L and CLIP-G with
//!   projection, T5; T5 may be absent or left out), a 16-channel `vae/` and a
//!   `FlowMatchEulerDiscreteScheduler` in `scheduler/`.
//!
//! The denoising backbone (UNet or MMDiT) is trainable; the VAE and the text
//! encoders are frozen.

use anyhow::{bail, ensure, Context, Result};
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind, Tensor};

use crate::models::clip::{ClipTextConfig, ClipTextModel, LoadedClipText};
use crate::models::denoiser::{Cond, Denoiser, UNetDenoiser};
use crate::models::mmdit::{LoadedSd3Transformer, Sd3Config};
use crate::models::sd3_text::{Sd3TextEncoders, Sd3TextOptions};
pub use crate::models::tokenizer::builtin_tokenizer_dir;
use crate::models::tokenizer::{ClipTokenizer, Pad};
use crate::models::unet::{LoadedUNet, UNetConfig};
use crate::models::vae::{AutoencoderKL, LoadedVae, VaeConfig};
use crate::schedule::{BetaSchedule, ScheduleConfig};

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
    /// SD3: MMDiT on flow matching; CLIP-L + CLIP-G (+ T5) context and pooled
    /// projections (see `sd3_text`).
    Sd3,
}

/// The trainable denoising network.
pub enum Backbone {
    /// `UNet2DConditionModel` in `unet/` (SD 1.x / 2.x / XL).
    Unet(Box<LoadedUNet>),
    /// `SD3Transformer2DModel` in `transformer/` (SD3).
    Sd3(Box<LoadedSd3Transformer>),
}

impl Backbone {
    /// The variables (trainable, apart from the MMDiT's stored position grid).
    pub fn vs(&self) -> &nn::VarStore {
        match self {
            Backbone::Unet(u) => &u.vs,
            Backbone::Sd3(t) => &t.vs,
        }
    }

    pub fn vs_mut(&mut self) -> &mut nn::VarStore {
        match self {
            Backbone::Unet(u) => &mut u.vs,
            Backbone::Sd3(t) => &mut t.vs,
        }
    }

    /// The component folder in a diffusers pipeline (and in checkpoints).
    pub fn folder(&self) -> &'static str {
        match self {
            Backbone::Unet(_) => "unet",
            Backbone::Sd3(_) => "transformer",
        }
    }

    /// Channels of the latents the backbone denoises.
    pub fn latent_channels(&self) -> i64 {
        match self {
            Backbone::Unet(u) => u.config.in_channels,
            Backbone::Sd3(t) => t.config.in_channels,
        }
    }

    /// The configured latent size (`sample_size`), if any.
    pub fn sample_size(&self) -> Option<i64> {
        match self {
            Backbone::Unet(u) => u.config.sample_size,
            Backbone::Sd3(t) => Some(t.config.sample_size),
        }
    }

    /// Write `config.json` and the weights (in `kind`) into `dir`.
    pub fn save_pretrained(&self, dir: &Path, kind: Kind) -> Result<()> {
        match self {
            Backbone::Unet(u) => u.save_pretrained(dir, kind),
            Backbone::Sd3(t) => t.save_pretrained(dir, kind),
        }
    }

    /// The UNet, if this is one.
    pub fn as_unet(&self) -> Option<&LoadedUNet> {
        match self {
            Backbone::Unet(u) => Some(u),
            Backbone::Sd3(_) => None,
        }
    }
}

impl Backbone {
    /// The dtype of the base weights, which the network computes in (LoRA adapters
    /// may be float32 on a bfloat16 base: `train.base_dtype`).
    pub fn weight_kind(&self) -> Kind {
        match self {
            Backbone::Unet(u) => u.model.weight_kind(),
            Backbone::Sd3(t) => t.model.weight_kind(),
        }
    }
}

/// The network runs in the dtype of its base weights; the output comes back in the
/// dtype of `x` (differentiably), so a bfloat16 base serves a float32 trainer.
impl Denoiser for Backbone {
    fn predict(&self, x: &Tensor, t: &Tensor, cond: &Cond) -> Result<Tensor> {
        let kind = self.weight_kind();
        let xk = x.to_kind(kind);
        let out = match self {
            Backbone::Unet(u) => UNetDenoiser(&u.model).predict(&xk, t, cond),
            Backbone::Sd3(m) => m.model.predict(&xk, t, cond),
        }?;
        Ok(out.to_kind(x.kind()))
    }
}

/// The frozen text side.
pub enum TextStack {
    /// One (SD) or two (SDXL) CLIP encoders.
    Clip(Vec<TextEncoder>),
    /// The SD3 stack: CLIP-L, CLIP-G and optionally T5.
    Sd3(Box<Sd3TextEncoders>),
}

impl TextStack {
    /// The variables of every text encoder (for parameter counts).
    pub fn varstores(&self) -> Vec<&nn::VarStore> {
        match self {
            TextStack::Clip(v) => v.iter().map(|t| &t.encoder.vs).collect(),
            TextStack::Sd3(s) => {
                let mut v = vec![&s.clip_l.encoder.vs, &s.clip_g.encoder.vs];
                if let Some(t5) = &s.t5 {
                    v.push(&t5.encoder.vs);
                }
                v
            }
        }
    }
}

/// A loaded pipeline. The backbone is trainable; the VAE and the text encoders are
/// frozen.
pub struct Pipeline {
    /// Source folder (None for a pipeline built in memory).
    pub dir: Option<PathBuf>,
    pub family: Family,
    pub backbone: Backbone,
    /// The autoencoder; None for a pixel-space model (latents are the images).
    pub vae: Option<LoadedVae>,
    pub text: TextStack,
    pub schedule: ScheduleConfig,
    pub device: Device,
    /// dtype of the backbone weights on disk (kept when saving).
    pub backbone_file_kind: Kind,
}

/// Options of [`Pipeline::load_with`].
#[derive(Debug, Clone, Default)]
pub struct PipelineOptions {
    /// SD3: whether to run T5 (`text_encoder_3`) and its sequence length.
    pub sd3_text: Sd3TextOptions,
    /// Where the text encoders are loaded and run (None: the pipeline's device).
    /// Their outputs are moved to the pipeline's device.
    pub text_device: Option<Device>,
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
        "sample_size": 32,
        "scaling_factor": 0.18215
    }))
}

/// A tiny VAE of the SD3 kind: 16 latent channels, no quant convs, SD3's
/// `scaling_factor` and `shift_factor`; downscale 2.
fn tiny_sd3_vae_config() -> Result<VaeConfig> {
    VaeConfig::from_value(&serde_json::json!({
        "_class_name": "AutoencoderKL",
        "block_out_channels": [8, 16],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "latent_channels": 16,
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "sample_size": 32,
        "scaling_factor": 1.5305,
        "shift_factor": 0.0609,
        "use_quant_conv": false,
        "use_post_quant_conv": false
    }))
}

/// A UNet pipeline built by [`Pipeline::random`].
#[derive(Debug, Clone)]
pub struct UnetSpec {
    pub unet: UNetConfig,
    pub clip: ClipTextConfig,
    /// None: a pixel-space model.
    pub vae: Option<VaeConfig>,
    pub schedule: ScheduleConfig,
}

/// An SD3 pipeline built by [`Pipeline::random`]: the MMDiT of `transformer`, the
/// tiny SD3 text stack ([`Sd3TextEncoders::tiny_random`]; its widths fit
/// [`Sd3Config::tiny`]), a 16-channel VAE and the flow-matching schedule.
#[derive(Debug, Clone)]
pub struct Sd3Spec {
    pub transformer: Sd3Config,
    pub vae: VaeConfig,
    pub schedule: ScheduleConfig,
    /// Include a (tiny) T5 encoder.
    pub with_t5: bool,
    /// T5 tokens per prompt.
    pub max_sequence_length: usize,
}

/// What [`Pipeline::random`] builds.
// A preset value built once per pipeline: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum RandomSpec {
    Unet(UnetSpec),
    Sd3(Sd3Spec),
}

impl RandomSpec {
    /// Tiny SD1.x-style models for smoke tests.
    pub fn tiny() -> Result<RandomSpec> {
        Ok(RandomSpec::Unet(UnetSpec {
            unet: UNetConfig::tiny_sd15(),
            clip: ClipTextConfig::tiny(),
            vae: Some(tiny_vae_config()?),
            schedule: ScheduleConfig::sd15(),
        }))
    }

    /// Tiny SD3 models for smoke tests: `Sd3Config::tiny()` (2 joint blocks, width
    /// 32), the tiny CLIP-L / CLIP-G / T5 stack with 32 T5 tokens, a 16-channel VAE
    /// with downscale 2 (so 32 px images give the 16x16 latents that fill the 8x8
    /// stored position grid), and SD3's flow-matching schedule (shift 3).
    pub fn tiny_sd3() -> Result<RandomSpec> {
        Ok(RandomSpec::Sd3(Sd3Spec {
            transformer: Sd3Config::tiny(),
            vae: tiny_sd3_vae_config()?,
            schedule: ScheduleConfig::sd3(),
            with_t5: true,
            max_sequence_length: 32,
        }))
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
        unet.down_block_types = [
            "DownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
        ]
        .map(String::from)
        .to_vec();
        unet.up_block_types = ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
            .map(String::from)
            .to_vec();
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
        Ok(RandomSpec::Unet(UnetSpec {
            unet,
            clip,
            vae: None,
            schedule,
        }))
    }

    pub fn by_name(name: &str) -> Result<RandomSpec> {
        match name {
            "tiny" => Self::tiny(),
            "tiny-sd3" => Self::tiny_sd3(),
            "demo" => Self::demo(),
            _ => bail!("unknown model preset {name:?}: expected tiny, tiny-sd3 or demo"),
        }
    }
}

/// Whether `model_index.json` lists a component (a non-null `[library, class]`).
fn index_has(mi: &serde_json::Value, name: &str) -> bool {
    mi.get(name)
        .and_then(|v| v.as_array())
        .is_some_and(|a| a.first().is_some_and(|x| x.is_string()))
}

/// dtype of a diffusers component's weights on disk.
fn component_file_kind(dir: &Path) -> Result<Kind> {
    let stem = ["diffusion_pytorch_model"];
    let weights = crate::weights::find_weight_files(dir, &stem, None)
        .or_else(|_| crate::weights::find_weight_files(dir, &stem, Some("fp16")))?;
    crate::weights::file_float_kind(&weights[0])
}

impl Pipeline {
    /// Load a diffusers pipeline folder. The backbone is loaded in `unet_kind`
    /// (float32 for training on CPU); the frozen parts in `frozen_kind`.
    pub fn load(
        dir: &Path,
        device: Device,
        unet_kind: Kind,
        frozen_kind: Kind,
    ) -> Result<Pipeline> {
        Self::load_with(
            dir,
            device,
            unet_kind,
            frozen_kind,
            &PipelineOptions::default(),
        )
    }

    /// [`Pipeline::load`] with options (SD3: T5 or not, T5 sequence length).
    pub fn load_with(
        dir: &Path,
        device: Device,
        unet_kind: Kind,
        frozen_kind: Kind,
        opts: &PipelineOptions,
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
        if class.contains("StableDiffusion3") || index_has(&mi, "transformer") {
            return Self::load_sd3(dir, &mi, device, unet_kind, frozen_kind, opts);
        }
        let family = if index_has(&mi, "text_encoder_2") {
            Family::Sdxl
        } else {
            Family::Sd
        };
        let text_device = opts.text_device.unwrap_or(device);
        let unet_dir = dir.join("unet");
        let backbone_file_kind = component_file_kind(&unet_dir).context("unet/")?;
        let unet = LoadedUNet::load(&unet_dir, device, unet_kind).context("loading unet/")?;
        let vae = if index_has(&mi, "vae") {
            Some(LoadedVae::load(&dir.join("vae"), device, frozen_kind).context("loading vae/")?)
        } else {
            None
        };
        let mut text = Vec::new();
        let pairs: &[(&str, &str)] = match family {
            Family::Sdxl => &[
                ("text_encoder", "tokenizer"),
                ("text_encoder_2", "tokenizer_2"),
            ],
            _ => &[("text_encoder", "tokenizer")],
        };
        for (enc, tok) in pairs {
            let tokenizer = ClipTokenizer::from_dir(&dir.join(tok))
                .with_context(|| format!("loading {tok}/"))?;
            let mut encoder = ClipTextModel::load(&dir.join(enc), text_device, frozen_kind)
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
        if schedule.beta_schedule == BetaSchedule::FlowMatching {
            bail!(
                "{}: a flow-matching scheduler with a UNet is not supported \
                 (flow matching is supported for SD3 transformer pipelines)",
                sched_file.display()
            );
        }
        Ok(Pipeline {
            dir: Some(dir.to_path_buf()),
            family,
            backbone: Backbone::Unet(Box::new(unet)),
            vae,
            text: TextStack::Clip(text),
            schedule,
            device,
            backbone_file_kind,
        })
    }

    fn load_sd3(
        dir: &Path,
        mi: &serde_json::Value,
        device: Device,
        kind: Kind,
        frozen_kind: Kind,
        opts: &PipelineOptions,
    ) -> Result<Pipeline> {
        for name in [
            "transformer",
            "vae",
            "text_encoder",
            "text_encoder_2",
            "tokenizer",
            "tokenizer_2",
        ] {
            ensure!(
                index_has(mi, name),
                "{}: an SD3 pipeline needs {name} in model_index.json",
                dir.display()
            );
        }
        let tdir = dir.join("transformer");
        let backbone_file_kind = component_file_kind(&tdir).context("transformer/")?;
        let transformer =
            LoadedSd3Transformer::load(&tdir, device, kind).context("loading transformer/")?;
        let vae = LoadedVae::load(&dir.join("vae"), device, frozen_kind).context("loading vae/")?;
        let text_device = opts.text_device.unwrap_or(device);
        let text = Sd3TextEncoders::load(dir, text_device, frozen_kind, &opts.sd3_text)?;
        if !opts.sd3_text.use_t5 {
            tracing::info!("{}: running without T5 (text_encoder_3)", dir.display());
        } else if text.t5.is_none() {
            tracing::info!(
                "{}: no text_encoder_3 in the pipeline, running without T5",
                dir.display()
            );
        }
        let sched_file = dir.join("scheduler").join("scheduler_config.json");
        ensure!(
            sched_file.is_file(),
            "{}: an SD3 pipeline needs a FlowMatchEulerDiscreteScheduler config",
            sched_file.display()
        );
        let sv = crate::models::config::read_json(&sched_file)?;
        let sclass = sv["_class_name"].as_str().unwrap_or("");
        ensure!(
            sclass.starts_with("FlowMatch"),
            "{}: _class_name = {sclass:?}; an SD3 pipeline needs FlowMatchEulerDiscreteScheduler",
            sched_file.display()
        );
        let schedule = ScheduleConfig::from_json(&sv)
            .with_context(|| format!("{}: unsupported scheduler config", sched_file.display()))?;
        let pipe = Pipeline {
            dir: Some(dir.to_path_buf()),
            family: Family::Sd3,
            backbone: Backbone::Sd3(Box::new(transformer)),
            vae: Some(vae),
            text: TextStack::Sd3(Box::new(text)),
            schedule,
            device,
            backbone_file_kind,
        };
        pipe.check_sd3_widths()
            .with_context(|| format!("{}: components do not fit", dir.display()))?;
        Ok(pipe)
    }

    /// The SD3 components must agree: VAE latent channels = transformer input
    /// channels, text context width = `joint_attention_dim`, pooled CLIP projections
    /// = `pooled_projection_dim`.
    fn check_sd3_widths(&self) -> Result<()> {
        let (Backbone::Sd3(t), TextStack::Sd3(text)) = (&self.backbone, &self.text) else {
            return Ok(());
        };
        let c = &t.config;
        if let Some(v) = &self.vae {
            ensure!(
                v.config.latent_channels == c.in_channels,
                "vae latent_channels = {} but transformer in_channels = {}",
                v.config.latent_channels,
                c.in_channels
            );
        }
        ensure!(
            text.context_dim == c.joint_attention_dim,
            "text context width {} (T5 d_model, or 4096 without T5) but transformer \
             joint_attention_dim = {}",
            text.context_dim,
            c.joint_attention_dim
        );
        let pooled =
            text.clip_l.encoder.config.projection_dim + text.clip_g.encoder.config.projection_dim;
        ensure!(
            pooled == c.pooled_projection_dim,
            "text_encoder + text_encoder_2 projection_dim = {pooled} but transformer \
             pooled_projection_dim = {}",
            c.pooled_projection_dim
        );
        Ok(())
    }

    /// Randomly initialised tiny models of the real SD1.x architectures (UNet, VAE,
    /// CLIP text encoder) with the real CLIP tokenizer: for smoke tests.
    pub fn tiny_random(device: Device, seed: i64) -> Result<Pipeline> {
        Self::random(&RandomSpec::tiny()?, device, seed)
    }

    /// Randomly initialised tiny SD3 models (see [`RandomSpec::tiny_sd3`]).
    pub fn tiny_random_sd3(device: Device, seed: i64) -> Result<Pipeline> {
        Self::random(&RandomSpec::tiny_sd3()?, device, seed)
    }

    /// A pipeline with randomly initialised weights for `spec` (the starting point of
    /// pretraining from scratch) and the real CLIP tokenizer.
    pub fn random(spec: &RandomSpec, device: Device, seed: i64) -> Result<Pipeline> {
        match spec {
            RandomSpec::Unet(s) => Self::random_unet(s, device, seed),
            RandomSpec::Sd3(s) => Self::random_sd3(s, device, seed),
        }
    }

    fn random_vae(cfg: &VaeConfig, device: Device) -> Result<LoadedVae> {
        let mut vs = nn::VarStore::new(device);
        let model = AutoencoderKL::new(&vs.root(), cfg)?;
        vs.freeze();
        Ok(LoadedVae {
            vs,
            model,
            config: cfg.clone(),
        })
    }

    fn random_unet(spec: &UnetSpec, device: Device, seed: i64) -> Result<Pipeline> {
        tch::manual_seed(seed);
        let mut ucfg = spec.unet.clone();
        ucfg.cross_attention_dim = crate::models::unet::PerBlock::One(spec.clip.hidden_size);
        let unet = LoadedUNet::from_config(&ucfg, device, Kind::Float)?;
        let vae = match &spec.vae {
            Some(vcfg) => Some(Self::random_vae(vcfg, device)?),
            None => None,
        };
        let mut tvs = nn::VarStore::new(device);
        let model = ClipTextModel::new(&tvs.root(), &spec.clip, false)?;
        tvs.freeze();
        let encoder = LoadedClipText {
            vs: tvs,
            model,
            config: spec.clip.clone(),
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
            backbone: Backbone::Unet(Box::new(unet)),
            vae,
            text: TextStack::Clip(text),
            schedule: spec.schedule.clone(),
            device,
            backbone_file_kind: Kind::Float,
        })
    }

    fn random_sd3(spec: &Sd3Spec, device: Device, seed: i64) -> Result<Pipeline> {
        ensure!(
            spec.schedule.beta_schedule == BetaSchedule::FlowMatching,
            "an SD3 pipeline needs a flow-matching schedule, got {:?}",
            spec.schedule.beta_schedule
        );
        tch::manual_seed(seed);
        let transformer =
            LoadedSd3Transformer::from_config(&spec.transformer, device, Kind::Float)?;
        let vae = Self::random_vae(&spec.vae, device)?;
        let text = Sd3TextEncoders::tiny_random(
            device,
            seed.wrapping_add(1),
            spec.with_t5,
            spec.max_sequence_length,
        )?;
        let pipe = Pipeline {
            dir: None,
            family: Family::Sd3,
            backbone: Backbone::Sd3(Box::new(transformer)),
            vae: Some(vae),
            text: TextStack::Sd3(Box::new(text)),
            schedule: spec.schedule.clone(),
            device,
            backbone_file_kind: Kind::Float,
        };
        pipe.check_sd3_widths()
            .context("the SD3 spec's transformer does not fit the tiny text stack")?;
        Ok(pipe)
    }

    /// The backbone's linear layers that can carry LoRA adapters.
    pub fn lora_slots(&self) -> &crate::models::lora::LoraSlots {
        match &self.backbone {
            Backbone::Unet(u) => &u.model.lora,
            Backbone::Sd3(t) => &t.model.lora,
        }
    }

    /// The key prefix of the backbone in diffusers' LoRA files (`unet` / `transformer`).
    pub fn lora_prefix(&self) -> &'static str {
        match &self.backbone {
            Backbone::Unet(_) => "unet",
            Backbone::Sd3(_) => "transformer",
        }
    }

    /// Freeze the backbone and give the layers `spec` targets new trainable LoRA
    /// adapters (the only trainable backbone variables afterwards). Returns the adapted
    /// module names.
    pub fn attach_lora(&mut self, spec: &crate::models::lora::LoraSpec) -> Result<Vec<String>> {
        self.backbone.vs_mut().freeze();
        let (vs, slots) = match &self.backbone {
            Backbone::Unet(u) => (&u.vs, &u.model.lora),
            Backbone::Sd3(t) => (&t.vs, &t.model.lora),
        };
        slots.attach_new(&vs.root(), spec)
    }

    /// Merge LoRA files into the backbone's weights (`W += scale * alpha / r * B A`
    /// for each file and scale), as diffusers' `fuse_lora` does.
    pub fn merge_lora(&mut self, files: &[(std::path::PathBuf, f64)]) -> Result<()> {
        for (path, scale) in files {
            let f = crate::models::lora::LoraFile::load(path, self.lora_prefix())?;
            self.lora_slots()
                .merge_file(&f, *scale)
                .with_context(|| format!("merging {}", path.display()))?;
        }
        Ok(())
    }

    /// The trainable variables of the backbone.
    pub fn backbone_vs(&self) -> &nn::VarStore {
        self.backbone.vs()
    }

    pub fn backbone_vs_mut(&mut self) -> &mut nn::VarStore {
        self.backbone.vs_mut()
    }

    /// The backbone as a denoiser (UNet: epsilon / v; SD3: flow velocity at
    /// `sigma * 1000`).
    pub fn denoiser(&self) -> &dyn Denoiser {
        &self.backbone
    }

    /// The UNet; an error naming the backbone for other pipelines.
    pub fn unet(&self) -> Result<&LoadedUNet> {
        self.backbone.as_unet().with_context(|| {
            format!(
                "this {:?} pipeline has a {} backbone, not a UNet",
                self.family,
                self.backbone.folder()
            )
        })
    }

    /// The floating-point kind the trainer computes in: the most precise kind of the
    /// backbone's variables (float32 for training, also with float32 LoRA adapters on
    /// a bfloat16 base; float64 in gradient tests; the weights' kind for a
    /// half-precision inference pipeline).
    pub fn kind(&self) -> Kind {
        let kinds: Vec<Kind> = self
            .backbone_vs()
            .variables()
            .values()
            .map(|t| t.kind())
            .collect();
        [Kind::Double, Kind::Float, Kind::BFloat16, Kind::Half]
            .into_iter()
            .find(|k| kinds.contains(k))
            .unwrap_or(Kind::Float)
    }

    /// Keep the frozen base weights of the backbone in `kind` (`train.base_dtype`):
    /// every variable that does not require a gradient (after [`Pipeline::attach_lora`]:
    /// all but the adapters) is converted in place, so every handle on it (the layers,
    /// the LoRA slots) sees the new dtype. Returns the number of tensors converted.
    pub fn set_base_kind(&mut self, kind: Kind) -> usize {
        let mut n = 0;
        tch::no_grad(|| {
            for (_, mut t) in self.backbone.vs().variables() {
                if !t.requires_grad() && t.is_floating_point() && t.kind() != kind {
                    t.set_data(&t.to_kind(kind));
                    n += 1;
                }
            }
        });
        n
    }

    /// Put the frozen networks in `kind` (`model.frozen_dtype`; None: as they are) and
    /// the text encoders on `text_device` (`model.text_device`), in place.
    /// [`Pipeline::load_with`] does this while loading; this is for pipelines built in
    /// memory.
    pub fn place_frozen(&mut self, kind: Option<Kind>, text_device: Device) {
        if let (Some(v), Some(k)) = (&mut self.vae, kind) {
            v.vs.set_kind(k);
        }
        let stores: Vec<&mut nn::VarStore> = match &mut self.text {
            TextStack::Clip(v) => v.iter_mut().map(|t| &mut t.encoder.vs).collect(),
            TextStack::Sd3(s) => {
                s.device = text_device;
                let mut v = vec![&mut s.clip_l.encoder.vs, &mut s.clip_g.encoder.vs];
                if let Some(t5) = &mut s.t5 {
                    v.push(&mut t5.encoder.vs);
                }
                v
            }
        };
        for vs in stores {
            if let Some(k) = kind {
                vs.set_kind(k);
            }
            vs.set_device(text_device);
        }
    }

    /// The device the text encoders run on.
    pub fn text_device(&self) -> Device {
        match &self.text {
            TextStack::Clip(v) => v.first().map_or(self.device, |t| t.encoder.vs.device()),
            TextStack::Sd3(s) => s.device,
        }
    }

    /// The dtype of the VAE's weights (the pipeline's kind for a pixel-space model).
    pub fn vae_kind(&self) -> Kind {
        self.vae
            .as_ref()
            .and_then(|v| v.vs.variables().values().next().map(|t| t.kind()))
            .unwrap_or_else(|| self.kind())
    }

    /// Whether the model is trained with flow matching (SD3).
    pub fn is_flow(&self) -> bool {
        self.schedule.beta_schedule == BetaSchedule::FlowMatching
    }

    /// Channels of the latents.
    pub fn latent_channels(&self) -> i64 {
        self.backbone.latent_channels()
    }

    /// Pixel size of one latent cell.
    pub fn vae_scale(&self) -> i64 {
        self.vae.as_ref().map(|v| v.model.downscale()).unwrap_or(1)
    }

    /// The image size the model was configured for (`sample_size` latents; 64 when
    /// a UNet config has none).
    pub fn default_resolution(&self) -> i64 {
        self.backbone.sample_size().unwrap_or(64) * self.vae_scale()
    }

    /// Images in [-1, 1] to the (scaled) latents the backbone works on; identity for
    /// a pixel-space model. Differentiable.
    /// The VAE computes in its weights' dtype (`model.frozen_dtype`); the latents come
    /// back in the dtype of `images`.
    pub fn to_latents(&self, images: &Tensor) -> Result<Tensor> {
        match &self.vae {
            Some(v) => Ok(v
                .model
                .latents_from_image(&images.to_kind(self.vae_kind()), false)?
                .to_kind(images.kind())),
            None => Ok(images.shallow_clone()),
        }
    }

    /// Latents back to images in [-1, 1] (not clamped), in the dtype of `latents`.
    /// Differentiable.
    pub fn to_images(&self, latents: &Tensor) -> Result<Tensor> {
        match &self.vae {
            Some(v) => Ok(v
                .model
                .image_from_latents(&latents.to_kind(self.vae_kind()))?
                .to_kind(latents.kind())),
            None => Ok(latents.shallow_clone()),
        }
    }

    /// Encode captions into the backbone's conditioning (no gradient: the encoders
    /// are frozen). `time_ids` [B, 6] is used by SDXL only. Returns the conditioning
    /// and the number of captions truncated to a tokenizer window.
    pub fn encode_text(
        &self,
        captions: &[String],
        time_ids: Option<&Tensor>,
    ) -> Result<(Cond, usize)> {
        let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
        let encoders = match &self.text {
            TextStack::Sd3(s) => {
                let (c, n) = s.encode_with_truncation(&refs)?;
                return Ok((c.to_device(self.device), n));
            }
            TextStack::Clip(v) => v,
        };
        let text_device = self.text_device();
        tch::no_grad(|| {
            let mut states = Vec::new();
            let mut pooled = None;
            let mut truncated = 0;
            for te in encoders {
                let (ids, n) = te.tokenizer.encode_padded(&refs, te.pad)?;
                truncated = truncated.max(n);
                let out = te
                    .encoder
                    .model
                    .forward(&ids.to_device(text_device), None)?;
                if self.family == Family::Sdxl {
                    states.push(out.penultimate().shallow_clone());
                    if let Some(p) = &out.text_embeds {
                        pooled = Some(p.shallow_clone());
                    }
                } else {
                    states.push(out.last_hidden_state.shallow_clone());
                }
            }
            let context = Tensor::cat(&states, 2)
                .to_kind(Kind::Float)
                .to_device(self.device);
            let mut cond = Cond::new(context);
            if self.family == Family::Sdxl {
                cond.pooled = Some(
                    pooled
                        .context("SDXL: text_encoder_2 has no projection")?
                        .to_kind(Kind::Float)
                        .to_device(self.device),
                );
                cond.time_ids = Some(match time_ids {
                    Some(t) => t.to_device(self.device).to_kind(Kind::Float),
                    None => bail!("SDXL conditioning needs time ids"),
                });
            }
            Ok((cond, truncated))
        })
    }

    /// A pooled text embedding of each caption, [B, P] (no gradient): the last CLIP
    /// encoder's projected embedding (`text_embeds`), or its `pooler_output` when it
    /// has no projection (SD 1.x / 2.x); SD3: the pooled projections of CLIP-L and
    /// CLIP-G. Used to condition the StyleGAN-T discriminator.
    pub fn pooled_text(&self, captions: &[String]) -> Result<Tensor> {
        let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
        let encoders = match &self.text {
            TextStack::Sd3(s) => {
                let (cond, _) = s.encode_with_truncation(&refs)?;
                return Ok(cond
                    .pooled
                    .context("SD3 text encoders gave no pooled projections")?
                    .to_device(self.device));
            }
            TextStack::Clip(v) => v,
        };
        let te = encoders
            .last()
            .context("the pipeline has no text encoder")?;
        tch::no_grad(|| {
            let (ids, _) = te.tokenizer.encode_padded(&refs, te.pad)?;
            let out = te
                .encoder
                .model
                .forward(&ids.to_device(self.text_device()), None)?;
            Ok(out
                .text_embeds
                .unwrap_or(out.pooler_output)
                .to_kind(Kind::Float)
                .to_device(self.device))
        })
    }

    /// Write the pipeline to `out` in the diffusers layout: the (tuned) backbone in
    /// the dtype it was read in (under `unet/` or `transformer/`), every other
    /// component copied unchanged from the source folder (or, for a pipeline built
    /// in memory, written from memory).
    pub fn save(&self, out: &Path) -> Result<()> {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let folder = self.backbone.folder();
        match &self.dir {
            Some(src) => {
                for entry in
                    std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))?
                {
                    let entry = entry?;
                    let name = entry.file_name();
                    if name == folder {
                        continue;
                    }
                    copy_recursive(&entry.path(), &out.join(&name))?;
                }
            }
            None => match &self.text {
                TextStack::Clip(encoders) => self.write_unet_components(out, encoders)?,
                TextStack::Sd3(text) => self.write_sd3_components(out, text)?,
            },
        }
        self.backbone
            .save_pretrained(&out.join(folder), self.backbone_file_kind)
    }

    fn write_vae(&self, out: &Path) -> Result<()> {
        if let Some(vae) = &self.vae {
            let vae_dir = out.join("vae");
            std::fs::create_dir_all(&vae_dir)?;
            let mut vcfg = serde_json::to_value(&vae.config)?;
            vcfg["_class_name"] = "AutoencoderKL".into();
            vcfg["_diffusers_version"] = crate::models::config::DIFFUSERS_VERSION.into();
            write_json(&vae_dir.join("config.json"), &vcfg)?;
            crate::weights::save_varstore(
                &vae.vs,
                &vae_dir.join("diffusion_pytorch_model.safetensors"),
                None,
            )?;
        }
        Ok(())
    }

    fn write_scheduler(&self, out: &Path, class: &str) -> Result<()> {
        let sched_dir = out.join("scheduler");
        std::fs::create_dir_all(&sched_dir)?;
        let sc = self.schedule.to_diffusers_config(class)?;
        write_json(&sched_dir.join("scheduler_config.json"), &sc)
    }

    fn write_unet_components(&self, out: &Path, encoders: &[TextEncoder]) -> Result<()> {
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
            "image_encoder": [null, null],
            "requires_safety_checker": false
        });
        if self.vae.is_some() {
            v["vae"] = serde_json::json!(["diffusers", "AutoencoderKL"]);
            self.write_vae(out)?;
        }
        write_json(&out.join("model_index.json"), &v)?;
        let te = encoders
            .first()
            .context("the pipeline has no text encoder")?;
        write_clip(&te.encoder, &out.join("text_encoder"), "CLIPTextModel")?;
        copy_recursive(&builtin_tokenizer_dir(), &out.join("tokenizer"))?;
        self.write_scheduler(out, "DDIMScheduler")
    }

    fn write_sd3_components(&self, out: &Path, text: &Sd3TextEncoders) -> Result<()> {
        let mut v = serde_json::json!({
            "_class_name": "StableDiffusion3Pipeline",
            "_diffusers_version": "0.42.1",
            "transformer": ["diffusers", "SD3Transformer2DModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "text_encoder_3": [null, null],
            "tokenizer_3": [null, null],
            "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
            "image_encoder": [null, null],
            "feature_extractor": [null, null]
        });
        self.write_vae(out)?;
        let proj = "CLIPTextModelWithProjection";
        write_clip(&text.clip_l.encoder, &out.join("text_encoder"), proj)?;
        write_clip(&text.clip_g.encoder, &out.join("text_encoder_2"), proj)?;
        for (branch, name) in [(&text.clip_l, "tokenizer"), (&text.clip_g, "tokenizer_2")] {
            let dir = out.join(name);
            copy_recursive(&builtin_tokenizer_dir(), &dir)?;
            // The padding of each branch goes into its tokenizer config (SD3's
            // tokenizer pads with <|endoftext|>, tokenizer_2 with "!").
            let pad = match branch.pad {
                Pad::Zero => "!",
                _ => "<|endoftext|>",
            };
            for file in ["tokenizer_config.json", "special_tokens_map.json"] {
                let p = dir.join(file);
                if p.is_file() {
                    let mut c = crate::models::config::read_json(&p)?;
                    c["pad_token"] = pad.into();
                    write_json(&p, &c)?;
                }
            }
        }
        if let Some(t5) = &text.t5 {
            v["text_encoder_3"] = serde_json::json!(["transformers", "T5EncoderModel"]);
            v["tokenizer_3"] = serde_json::json!(["transformers", "T5TokenizerFast"]);
            let te_dir = out.join("text_encoder_3");
            std::fs::create_dir_all(&te_dir)?;
            let mut tcfg = serde_json::to_value(&t5.encoder.config)?;
            tcfg["architectures"] = serde_json::json!(["T5EncoderModel"]);
            tcfg["model_type"] = "t5".into();
            // What transformers' T5Config derives from these, written out.
            let ffp = t5.encoder.config.feed_forward_proj.as_str();
            let act = match ffp {
                "gated-gelu" => "gelu_new",
                _ => ffp.rsplit('-').next().unwrap_or(ffp),
            };
            tcfg["dense_act_fn"] = act.into();
            tcfg["is_gated_act"] = ffp.starts_with("gated-").into();
            tcfg["num_decoder_layers"] = tcfg["num_layers"].clone();
            write_json(&te_dir.join("config.json"), &tcfg)?;
            save_sorted(&t5.encoder.vs, &te_dir.join("model.safetensors"))?;
            let tok_dir = out.join("tokenizer_3");
            std::fs::create_dir_all(&tok_dir)?;
            let json = tok_dir.join("tokenizer.json");
            t5.tokenizer
                .inner()
                .save(&json, true)
                .map_err(|e| anyhow::anyhow!("writing {}: {e}", json.display()))?;
            write_json(
                &tok_dir.join("tokenizer_config.json"),
                &serde_json::json!({
                    "tokenizer_class": "T5Tokenizer",
                    "pad_token": "<pad>",
                    "eos_token": "</s>",
                    "unk_token": "<unk>",
                    "model_max_length": t5.tokenizer.max_length()
                }),
            )?;
        }
        write_json(&out.join("model_index.json"), &v)?;
        self.write_scheduler(out, "FlowMatchEulerDiscreteScheduler")
    }
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(v)?;
    text.push('\n');
    crate::weights::atomic_write(path, text.as_bytes())
}

fn save_sorted(vs: &nn::VarStore, path: &Path) -> Result<()> {
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    crate::weights::save_safetensors(&named, path, None, None)
}

/// A CLIP text encoder as transformers writes it (`architectures` = `arch`).
fn write_clip(enc: &LoadedClipText, dir: &Path, arch: &str) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut tcfg = serde_json::to_value(&enc.config)?;
    tcfg["architectures"] = serde_json::json!([arch]);
    tcfg["model_type"] = "clip_text_model".into();
    write_json(&dir.join("config.json"), &tcfg)?;
    save_sorted(&enc.vs, &dir.join("model.safetensors"))
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
