//! Adversarial Diffusion Tuning: Algorithm 1 of the paper, top to bottom, and the
//! plain fine-tuning (FT) baseline.
//!
//! One iteration (ADT mode):
//! 1. A batch of images x0 and captions; latents z0 = VAE(x0), text states (frozen).
//! 2. Start index s ~ U over the inference timestep list; x_{t_s} = alpha z0 + sigma eps
//!    (Eq. 7, Alg. 1 lines 3-4).
//! 3. Kept steps S: s plus up to K later ones (line 5).
//! 4. The inference sampler with CFG from t_s to the end (lines 6-14) under the path
//!    constraint of Eq. 11 (or DRTune's Eq. 4), run without a graph: see `path.rs`.
//! 5. Discriminator step (lines 16-18, [`Trainer::d_step`]): DiffAugment on fake and
//!    real, frozen features, hinge loss Eq. 9, AdamW, then the EMA update of the dual
//!    heads.
//! 6. Every H iterations the generator step (lines 19-21, [`Trainer::g_step`]): L^G of
//!    Eq. 8, -sum_i D_i(x_hat0) + lambda ||eps_theta(x_{t_s}, t_s) - eps||^2, whose
//!    gradient decomposes exactly over the kept steps (Eq. 12), so each kept step is
//!    recomputed and backpropagated on its own (peak memory: one UNet graph).
//!
//! Both steps score the same images: [`Trainer::disc_images`], the decoded x_hat0
//! without clamping (the G step's gradient reaches every pixel, and the D step sees
//! what the G step is scored on).

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use tch::{nn::VarStore, Device, Kind, Tensor};

use crate::data::{DataConfig, DataLoader};
use crate::disc::diffaug::{diff_augment_with_color, AugParams, Policy};
use crate::disc::features::{CastFeatures, DinoFeatures, EfficientNetFeatures};
use crate::disc::siamese::{DiscConfig, DiscVariant, Discriminator};
use crate::disc::FeatureNetwork;
use crate::models::denoiser::{Cond, Denoiser, Guidance};
use crate::models::dinov2::{Dinov2Config, Dinov2Model};
use crate::models::efficientnet::EfficientNet;
use crate::models::mmdit::Sd3TrajectoryCopy;
use crate::models::pipeline::{Backbone, Family, Pipeline, PipelineOptions, RandomSpec};
use crate::models::sd3_text::Sd3TextOptions;
use crate::schedule::Plan;
use crate::schedule::{SamplerKind, ScheduleConfig};
use crate::train::config::{
    Config, DiscKind, FeatureNet, FlowTimestep, Mode, TextDevice, WeightDtype,
};
use crate::train::fast::{FastDenoiser, FastOptions};
use crate::train::logging::{EventWriter, JsonlWriter};
use crate::train::optim::{warmup_lr, AdamW};
use crate::train::path::{backprop_kept, choose_kept, loss_kind, rollout, rollout_graph, KeptStep};

/// `model.path` of the built-in tiny random SD1.x-style pipeline.
pub const TINY_RANDOM: &str = "tiny-random";
/// `model.path` of the built-in tiny random SD3 pipeline.
pub const TINY_RANDOM_SD3: &str = "tiny-random-sd3";

/// Sigma of training timestep index `i` (0-based, of `num_train_timesteps` T) of a
/// flow-matching scheduler: diffusers' `FlowMatchEulerDiscreteScheduler` training
/// table, (i + 1) / T shifted by `shift`: `shift s / (1 + (shift - 1) s)`, in float32
/// as diffusers computes it.
pub fn flow_training_sigma(schedule: &ScheduleConfig, i: usize) -> f64 {
    let s = (i + 1) as f32 / schedule.num_train_timesteps as f32;
    let shift = schedule.shift as f32;
    (shift * s / (1.0 + (shift - 1.0) * s)) as f64
}

/// A logit-normal noise level of flow matching (SD3's training default): u =
/// sigmoid(n) with n ~ N(`mean`, `std`^2) (Box-Muller on `rng`), then the shift of
/// the training sigmas, `shift u / (1 + (shift - 1) u)` (as [`flow_training_sigma`]
/// applies it to (i + 1) / T). Continuous, in (0, 1). (diffusers' SD3 training
/// scripts quantise u to the 1000-entry training table and read that table from the
/// top, i.e. use 1 - u; for `mean` = 0 both give the same distribution.)
pub fn logit_normal_sigma(rng: &mut impl Rng, mean: f64, std: f64, shift: f64) -> f64 {
    // u1 in (0, 1] keeps the logarithm finite.
    let u1 = 1.0 - rng.gen::<f64>();
    let u2 = rng.gen::<f64>();
    let n = mean + std * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
    let u = 1.0 / (1.0 + (-n).exp());
    shift * u / (1.0 + (shift - 1.0) * u)
}

/// A conditioning sharing the tensors of `c`.
fn shallow(c: &Cond) -> Cond {
    Cond {
        context: c.context.shallow_clone(),
        pooled: c.pooled.as_ref().map(Tensor::shallow_clone),
        time_ids: c.time_ids.as_ref().map(Tensor::shallow_clone),
    }
}

/// The text embedding c of StyleGAN-T's conditional heads: the pipeline's pooled
/// text embedding ([`Pipeline::pooled_text`]; SDXL and SD3: the pooled conditioning
/// the backbone receives), L2-normalised as CLIP embeddings are compared.
fn disc_text_embedding(
    pipe: &Pipeline,
    captions: &[String],
    cond: Option<&Cond>,
) -> Result<Tensor> {
    let pooled = match cond.and_then(|c| c.pooled.as_ref()) {
        Some(p) => p.detach(),
        None => pipe.pooled_text(captions)?,
    };
    let norm = pooled
        .square()
        .sum_dim_intlist([1i64].as_slice(), true, pooled.kind())
        .sqrt()
        .clamp_min(1e-12);
    Ok(pooled / norm)
}

/// One micro-batch after line 3 of Alg. 1: images, latents, text conditioning.
struct Batch {
    x0: Tensor,
    z0: Tensor,
    cond: Cond,
    uncond: Cond,
    /// The discriminator's text embedding (conditional StyleGAN-T heads only).
    text: Option<Tensor>,
}

/// Lines 3-14 of Alg. 1 for one micro-batch, kept for the G step.
struct Trajectory {
    batch: Batch,
    eps: Tensor,
    /// Start step index s.
    s: usize,
    x_s: Tensor,
    /// Kept step indices S (with s).
    kept: Vec<usize>,
    /// x_hat0 (latents), without a graph.
    final_x: Tensor,
    kept_steps: Vec<KeptStep>,
    /// `train.flow_timestep = "logit_normal"`: the noise levels of the
    /// diffusion-loss term, one per sample.
    diff_sigmas: Option<Vec<f32>>,
}

/// What the D step reports (micro-batch means).
#[derive(Default)]
struct DStepLog {
    loss: f64,
    accuracy: f64,
    real_score: f64,
    fake_score: f64,
    lr: f64,
}

/// What the G step reports.
struct GStepLog {
    loss_adv: f64,
    loss_diff: f64,
    grad_norm: f64,
}

/// Per-iteration numbers (one JSON line of metrics.jsonl).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct StepLog {
    pub step: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_d: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub d_acc: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub real_score: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fake_score: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_g_adv: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_diff: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm_g: Option<f64>,
    pub lr_g: f64,
    pub lr_d: f64,
    /// Start step index s (ADT) or training timestep (FT).
    pub t_start: i64,
    pub kept: usize,
    pub seconds: f64,
    /// Milliseconds per phase of the iteration (`train.profile_phases`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phases_ms: Option<std::collections::BTreeMap<String, f64>>,
}

/// Wall time per phase of an iteration (`train.profile_phases`). The device is
/// synchronised at every phase boundary so that queued GPU work is charged to the
/// phase that launched it; off, it does nothing.
struct Phases {
    on: bool,
    device: Device,
    last: std::time::Instant,
    ms: std::collections::BTreeMap<String, f64>,
}

impl Phases {
    fn new(on: bool, device: Device) -> Phases {
        let p = Phases {
            on,
            device,
            last: std::time::Instant::now(),
            ms: Default::default(),
        };
        p.sync();
        p
    }

    fn sync(&self) {
        if let (true, Device::Cuda(i)) = (self.on, self.device) {
            tch::Cuda::synchronize(i as i64);
        }
    }

    /// Charge the time since the previous mark to `name`.
    fn mark(&mut self, name: &str) {
        if !self.on {
            return;
        }
        self.sync();
        let now = std::time::Instant::now();
        *self.ms.entry(name.to_string()).or_default() +=
            now.duration_since(self.last).as_secs_f64() * 1e3;
        self.last = now;
    }

    fn finish(self) -> Option<std::collections::BTreeMap<String, f64>> {
        self.on.then_some(self.ms)
    }
}

/// A NaN or infinite loss (or gradient norm) stops the run; `adt train` adds which
/// checkpoint is the last one with finite numbers.
#[derive(Debug)]
pub struct NonFiniteLoss {
    /// The iteration (0-based, as in metrics.jsonl).
    pub step: usize,
    pub name: String,
    pub value: f64,
}

impl std::fmt::Display for NonFiniteLoss {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "step {}: {} is {}; stopping (lower the learning rates or check the data)",
            self.step, self.name, self.value
        )
    }
}

impl std::error::Error for NonFiniteLoss {}

fn check_finite(step: usize, name: &str, v: f64) -> Result<()> {
    if !v.is_finite() {
        bail!(NonFiniteLoss {
            step,
            name: name.to_string(),
            value: v,
        });
    }
    Ok(())
}

/// A run id: time and process, unique enough to tell runs in one folder apart.
fn new_run_id() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{t:x}-{:x}", std::process::id())
}

/// The feature network F of the discriminator.
///
/// Its weights are in `model.frozen_dtype`; with a reduced precision the network is
/// wrapped in [`CastFeatures`] (float32 images in, float32 features out).
pub fn build_features(cfg: &Config, device: Device, tiny: bool) -> Result<Box<dyn FeatureNetwork>> {
    let kind = cfg.model.frozen_dtype.kind();
    let net = build_features_in(cfg, device, tiny, kind)?;
    Ok(if kind == Kind::Float {
        net
    } else {
        Box::new(CastFeatures::new(net, kind))
    })
}

fn build_features_in(
    cfg: &Config,
    device: Device,
    tiny: bool,
    kind: Kind,
) -> Result<Box<dyn FeatureNetwork>> {
    let d = &cfg.disc;
    match d.features {
        FeatureNet::Dinov2 => {
            if let Some(path) = &d.features_path {
                let loaded = Dinov2Model::load(path, device, kind)
                    .with_context(|| format!("loading DINOv2 from {}", path.display()))?;
                let mut vs = loaded.vs;
                vs.freeze();
                let blocks = d
                    .blocks
                    .clone()
                    .unwrap_or(DinoFeatures::DEFAULT_BLOCKS.to_vec());
                Ok(Box::new(DinoFeatures::new(
                    loaded.model,
                    Some(vs),
                    d.resolution,
                    &blocks,
                    d.levels,
                )?))
            } else if tiny {
                let mut vs = VarStore::new(device);
                let dcfg = Dinov2Config::tiny();
                let model = Dinov2Model::new(&vs.root(), &dcfg)?;
                vs.set_kind(kind);
                vs.freeze();
                let n = dcfg.num_hidden_layers;
                let blocks: Vec<usize> = d
                    .blocks
                    .as_deref()
                    .unwrap_or(&DinoFeatures::DEFAULT_BLOCKS)
                    .iter()
                    .map(|&b| b.min(n as usize - 1))
                    .collect();
                let res = (d.resolution / dcfg.patch_size).max(1) * dcfg.patch_size;
                Ok(Box::new(DinoFeatures::new(
                    model,
                    Some(vs),
                    res.min(56),
                    &blocks,
                    d.levels,
                )?))
            } else {
                bail!(
                    "disc.features = \"dinov2\" needs disc.features_path (a transformers Dinov2Model folder); \
                     for offline use set disc.features = \"efficientnet-lite0\""
                )
            }
        }
        FeatureNet::EfficientnetLite0 | FeatureNet::EfficientnetLite1 => {
            let name = if d.features == FeatureNet::EfficientnetLite0 {
                "lite0"
            } else {
                "lite1"
            };
            let dir = match &d.features_path {
                Some(p) => p.clone(),
                None => {
                    let p = PathBuf::from(format!(".cache/weights/efficientnet-{name}"));
                    if !p.join("config.json").is_file() {
                        bail!(
                            "disc.features = \"efficientnet-{name}\": no converted weights at {} \
                             (run scripts/setup_efficientnet.sh from the repository root, or set disc.features_path)",
                            p.display()
                        );
                    }
                    p
                }
            };
            let loaded = EfficientNet::load(&dir, device, kind)
                .with_context(|| format!("loading EfficientNet-{name} from {}", dir.display()))?;
            let mut vs = loaded.vs;
            vs.freeze();
            let taps = d
                .blocks
                .clone()
                .unwrap_or(EfficientNetFeatures::DEFAULT_TAPS.to_vec());
            Ok(Box::new(EfficientNetFeatures::new(
                loaded.model,
                Some(vs),
                d.resolution,
                &taps,
                d.levels,
            )?))
        }
    }
}

/// The trainer: models, optimisers, data and logs.
pub struct Trainer {
    pub cfg: Config,
    pub pipe: Pipeline,
    pub plan: Plan,
    features: Option<Box<dyn FeatureNetwork>>,
    pub disc: Option<Discriminator>,
    policy: Policy,
    pub opt_g: AdamW,
    pub opt_d: Option<AdamW>,
    /// EMA copy of the generator weights (name, tensor).
    pub ema: Option<Vec<(String, Tensor)>>,
    /// The data (None for a trainer fed batch by batch, e.g. by the benchmark).
    pub loader: Option<DataLoader>,
    /// Iterations completed.
    pub step: usize,
    /// Generator updates completed.
    pub g_steps: usize,
    pub out_dir: PathBuf,
    /// Identifies this run's checkpoints (inherited when a run is resumed).
    pub run_id: String,
    metrics: Option<JsonlWriter>,
    events: Option<EventWriter>,
    uncond_cache: Option<(usize, Cond)>,
    /// Start step index used instead of the random draw (benchmarks).
    pub force_start: Option<usize>,
    /// Gradient-free copy of the UNet for the trajectory (`train.bf16_trajectory`).
    pub fast: Option<FastDenoiser>,
    /// Gradient-free bfloat16 copy of the SD3 transformer for the trajectory
    /// (`train.bf16_trajectory` on an SD3 pipeline).
    pub fast_sd3: Option<Sd3TrajectoryCopy>,
    /// Data-parallel training (one rank of several): gradient averaging and state
    /// synchronisation, see [`crate::dist`].
    pub ddp: Option<crate::dist::Ddp>,
}

impl Trainer {
    pub fn new(mut cfg: Config) -> Result<Trainer> {
        let device = cfg.device();
        let seed = cfg.train.seed as i64;
        let (pipe, tiny) = match cfg.model.path.as_str() {
            TINY_RANDOM => (Pipeline::tiny_random(device, seed)?, true),
            TINY_RANDOM_SD3 => {
                let mut spec = RandomSpec::tiny_sd3()?;
                if let RandomSpec::Sd3(s) = &mut spec {
                    s.with_t5 = cfg.model.use_t5;
                }
                (Pipeline::random(&spec, device, seed)?, true)
            }
            path => {
                let opts = PipelineOptions {
                    sd3_text: Sd3TextOptions {
                        use_t5: cfg.model.use_t5,
                        max_sequence_length: cfg.model.max_sequence_length,
                    },
                    text_device: Some(cfg.text_device()),
                };
                // A bfloat16 LoRA base is read in bfloat16 directly (never whole in
                // float32 on the device); the frozen networks in their dtype.
                let base_kind = if cfg.train.lora.is_some() {
                    cfg.train.base_dtype.kind()
                } else {
                    Kind::Float
                };
                let frozen_kind = cfg.model.frozen_dtype.kind();
                let pipe =
                    Pipeline::load_with(Path::new(path), device, base_kind, frozen_kind, &opts)
                        .with_context(|| format!("model.path = {path:?}"))?;
                (pipe, false)
            }
        };
        for line in cfg.apply_model_defaults(pipe.family, pipe.default_resolution()) {
            tracing::info!("{line}");
        }
        let mut data_cfg: DataConfig = toml::Value::Table(cfg.data.clone())
            .try_into()
            .map_err(|e: toml::de::Error| anyhow::anyhow!("[data]: {}", e.message().trim()))?;
        if !cfg.data.contains_key("seed") {
            data_cfg.seed = cfg.train.seed;
        }
        data_cfg.resolution = crate::data::Resolution::Square(cfg.train.resolution() as u32);
        // Data-parallel: every rank reads the global batch order and keeps its rows
        // (see `iteration`), so positions and resume are those of one process.
        let loader = DataLoader::new(&data_cfg, cfg.train.batch_size * crate::dist::world_size())
            .context("opening the dataset ([data] section)")?;
        let features = if cfg.train.mode == Mode::Adt {
            Some(build_features(&cfg, device, tiny)?)
        } else {
            None
        };
        let mut tr = Trainer::with_parts(cfg, pipe, features)?;
        tr.loader = Some(loader);
        let out_dir = tr.out_dir.clone();
        std::fs::create_dir_all(&out_dir)
            .with_context(|| format!("creating {}", out_dir.display()))?;
        if !crate::dist::is_rank0() {
            // Logs, grids and checkpoints come from rank 0.
            return Ok(tr);
        }
        let cfg_path = out_dir.join("config.toml");
        std::fs::write(&cfg_path, tr.cfg.to_toml()?)
            .with_context(|| format!("writing {}", cfg_path.display()))?;
        tr.metrics = Some(JsonlWriter::open(&out_dir.join("metrics.jsonl"))?);
        tr.events = Some(EventWriter::create(&out_dir.join("tensorboard"))?);
        Ok(tr)
    }

    /// A trainer over given models, without data or logs: feed it with
    /// [`Trainer::iteration_on`] (used by the benchmark).
    pub fn with_parts(
        mut cfg: Config,
        mut pipe: Pipeline,
        features: Option<Box<dyn FeatureNetwork>>,
    ) -> Result<Trainer> {
        if let Some(l) = &cfg.train.lora {
            let n = pipe.attach_lora(&l.spec()).context("train.lora")?.len();
            tracing::info!("LoRA: {n} adapted layers, base weights frozen");
        }
        // With LoRA and `train.base_dtype = "bf16"`: the frozen base in bfloat16, the
        // adapters float32 (validated: no base_dtype without LoRA).
        let base_bf16 = cfg.train.lora.is_some() && cfg.train.base_dtype == WeightDtype::Bf16;
        if base_bf16 {
            pipe.set_base_kind(Kind::BFloat16);
            tracing::info!(
                "LoRA: base weights kept in bfloat16 (train.base_dtype); it also runs the \
                 trajectory, no separate trajectory copy"
            );
        }
        // The frozen networks' dtype and the text device (a no-op for a pipeline
        // loaded with them).
        let frozen =
            (cfg.model.frozen_dtype != WeightDtype::Fp32).then(|| cfg.model.frozen_dtype.kind());
        if frozen.is_some() || cfg.model.text_device != TextDevice::Train {
            pipe.place_frozen(frozen, cfg.text_device());
        }
        let device = pipe.device;
        // Per-model learning rates and resolution (section 5) where the user set none.
        for line in cfg.apply_model_defaults(pipe.family, pipe.default_resolution()) {
            tracing::info!("{line}");
        }
        let kind_name = serde_json::to_string(&cfg.sampler.kind).unwrap_or_default();
        let flow_sampler = cfg.sampler.kind == SamplerKind::FlowEuler;
        if flow_sampler != pipe.is_flow() {
            bail!(
                "sampler.kind = {kind_name} does not fit this {:?} model: {}",
                pipe.family,
                if pipe.is_flow() {
                    "it is trained with flow matching; set sampler.kind = \"flow\""
                } else {
                    "it has a DDPM noise schedule; set sampler.kind = \"ddim\" or \"dpmpp\""
                }
            );
        }
        let plan =
            Plan::new(&pipe.schedule, cfg.sampler.kind, cfg.sampler.steps).with_context(|| {
                format!(
                    "sampler.kind = {kind_name}, sampler.steps = {}: the sampler does not fit \
                     the model's schedule",
                    cfg.sampler.steps
                )
            })?;
        let (disc, opt_d) = match (&features, cfg.train.mode) {
            (Some(f), Mode::Adt) => {
                let variant = match cfg.disc.kind {
                    DiscKind::Siamese => DiscVariant::Siamese,
                    DiscKind::StyleganT => DiscVariant::StyleganT,
                };
                // StyleGAN-T's heads are conditioned on the pooled text embedding.
                let text_dim = match variant {
                    DiscVariant::StyleganT => {
                        disc_text_embedding(&pipe, &[String::new()], None)?.size()[1]
                    }
                    DiscVariant::Siamese => 0,
                };
                let dcfg = DiscConfig {
                    variant,
                    head_channels: cfg.disc.channels,
                    out_channels: cfg.disc.out_channels,
                    text_dim,
                    ..DiscConfig::default()
                };
                // The heads' initialisation is a function of the seed alone, not of
                // whatever drew from libtorch's generator before (pipeline loading, a
                // previous run in the same process).
                tch::manual_seed(
                    (cfg.train.seed as i64).wrapping_add(0x5eed_d15c) & 0x7fff_ffff_ffff,
                );
                let disc = Discriminator::new(device, &f.channels(), &dcfg)?;
                let t = &cfg.train;
                let opt_d = AdamW::new(
                    &disc.vs,
                    t.lr_d(),
                    t.adam_beta1,
                    t.adam_beta2,
                    t.weight_decay_d,
                );
                (Some(disc), Some(opt_d))
            }
            (None, Mode::Adt) => bail!("ADT needs a feature network for its discriminator"),
            _ => (None, None),
        };
        let t = &cfg.train;
        let opt_g = AdamW::with_moments(
            pipe.backbone_vs(),
            t.lr_g(),
            t.adam_beta1,
            t.adam_beta2,
            t.weight_decay_g,
            t.optimizer_state,
        );
        let ema = t.ema_decay.map(|_| {
            let mut v: Vec<(String, Tensor)> = pipe
                .backbone_vs()
                .variables()
                .into_iter()
                .filter(|(_, t)| t.requires_grad())
                .map(|(k, t)| (k, t.detach().copy()))
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        });
        let policy = Policy::parse(&cfg.disc.diffaug)?;
        let tt = &cfg.train;
        let on_cuda = pipe.device.is_cuda();
        if (tt.cuda_graph || tt.autocast_bf16) && !on_cuda {
            bail!("train.cuda_graph and train.autocast_bf16 need train.device = \"cuda\"");
        }
        if on_cuda {
            tch::Cuda::cudnn_set_benchmark(tt.cudnn_benchmark);
            if tt.tf32 {
                crate::train::fast::gpu::set_tf32(true).context("train.tf32")?;
            }
        } else if tt.tf32 || tt.cudnn_benchmark {
            tracing::warn!("train.tf32 / train.cudnn_benchmark have no effect on the CPU");
        }
        if tt.flow_timestep != FlowTimestep::Uniform && !pipe.is_flow() {
            bail!(
                "train.flow_timestep = \"logit_normal\" needs a flow-matching (SD3) model; this \
                 {:?} model has a DDPM noise schedule (use \"uniform\")",
                pipe.family
            );
        }
        // A bfloat16 base is its own trajectory model: no copy (cuda_graph and
        // channels_last are refused with it by the configuration check).
        let fast_sd3 = match &pipe.backbone {
            Backbone::Sd3(t)
                if tt.bf16_trajectory && !tt.cuda_graph && !tt.channels_last && !base_bf16 =>
            {
                Some(Sd3TrajectoryCopy::new(t, Kind::BFloat16)?)
            }
            _ => None,
        };
        let fast = if fast_sd3.is_none()
            && !base_bf16
            && (tt.bf16_trajectory || tt.cuda_graph || tt.channels_last)
        {
            let unet = pipe.unet().context(
                "train.bf16_trajectory / cuda_graph / channels_last are supported for UNet models only",
            )?;
            Some(FastDenoiser::with_lora(
                &unet.vs,
                &unet.config,
                FastOptions {
                    kind: if tt.bf16_trajectory {
                        Kind::BFloat16
                    } else {
                        Kind::Float
                    },
                    channels_last: tt.channels_last,
                    cuda_graph: tt.cuda_graph,
                },
                Some(&unet.model.lora),
            )?)
        } else {
            None
        };
        let out_dir = cfg.output.dir.clone();
        Ok(Trainer {
            cfg,
            pipe,
            plan,
            features,
            disc,
            policy,
            opt_g,
            opt_d,
            ema,
            loader: None,
            step: 0,
            g_steps: 0,
            out_dir,
            run_id: new_run_id(),
            metrics: None,
            events: None,
            uncond_cache: None,
            force_start: None,
            ddp: None,
            fast,
            fast_sd3,
        })
    }

    fn device(&self) -> Device {
        self.pipe.device
    }

    /// Empty-caption conditioning for CFG, cached per batch size (except for SDXL,
    /// whose time ids change with the batch).
    fn uncond(&mut self, b: usize, time_ids: Option<&Tensor>) -> Result<Cond> {
        if self.pipe.family == Family::Sdxl {
            return Ok(self.pipe.encode_text(&vec![String::new(); b], time_ids)?.0);
        }
        if let Some((n, c)) = &self.uncond_cache {
            if *n == b {
                return Ok(shallow(c));
            }
        }
        let (c, _) = self.pipe.encode_text(&vec![String::new(); b], None)?;
        self.uncond_cache = Some((b, shallow(&c)));
        Ok(c)
    }

    fn features(&self, images: &Tensor) -> Vec<Tensor> {
        self.features
            .as_ref()
            .expect("ADT mode has a feature network")
            .features(images)
    }

    /// Run one training iteration (Algorithm 1, lines 3-21, or one FT step).
    pub fn iteration(&mut self) -> Result<StepLog> {
        let accum = self.cfg.train.grad_accum.max(1);
        let loader = self
            .loader
            .as_mut()
            .context("this trainer has no data loader")?;
        let mut batches = Vec::with_capacity(accum);
        let (rank, world) = (crate::dist::rank(), crate::dist::world_size());
        for _ in 0..accum {
            let b = loader.next_batch()?;
            let ids = b.add_time_ids();
            if world > 1 {
                // This rank's rows of the global batch.
                let (lo, hi) = crate::dist::shard_range(b.len(), rank, world);
                if hi == lo {
                    bail!(
                        "a batch of {} samples cannot be split over {world} ranks",
                        b.len()
                    );
                }
                let n = (hi - lo) as i64;
                batches.push((
                    b.images.narrow(0, lo as i64, n),
                    b.captions[lo..hi].to_vec(),
                    ids.narrow(0, lo as i64, n),
                ));
                continue;
            }
            batches.push((b.images, b.captions, ids));
        }
        self.iteration_on_micro(&batches)
    }

    /// One iteration on given images ([B, 3, H, W] in [-1, 1]), captions and SDXL
    /// time ids ([B, 6]).
    pub fn iteration_on(
        &mut self,
        images: &Tensor,
        captions: &[String],
        time_ids: &Tensor,
    ) -> Result<StepLog> {
        self.iteration_on_micro(&[(
            images.shallow_clone(),
            captions.to_vec(),
            time_ids.shallow_clone(),
        )])
    }

    /// One iteration over micro-batches whose gradients are accumulated
    /// (`train.grad_accum`): one optimiser step for D (and G) on their union.
    pub fn iteration_on_micro(
        &mut self,
        micro: &[(Tensor, Vec<String>, Tensor)],
    ) -> Result<StepLog> {
        let started = std::time::Instant::now();
        let step = self.step;
        // Randomness is a function of (seed, rank, step): a resumed run is
        // bit-identical, and each rank of a data-parallel run has its own stream.
        let seed = crate::dist::rank_seed(self.cfg.train.seed, crate::dist::rank());
        if let Some(d) = &self.ddp {
            d.pg.set_progress(step);
        }
        tch::manual_seed(
            (seed.wrapping_mul(1_000_003).wrapping_add(step as u64) & 0x7fff_ffff_ffff) as i64,
        );
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ ((step as u64) << 20) ^ 0xad7);
        let mut prepared = Vec::with_capacity(micro.len());
        for (images, captions, time_ids) in micro {
            prepared.push(self.prepare(images, captions, time_ids, &mut rng)?);
        }
        let mode = self.cfg.train.mode;
        // Checkpointed segments registered in this iteration are released with it.
        let _checkpointing =
            crate::models::checkpoint::Scope::new(self.cfg.train.gradient_checkpointing)?;
        let body = |tr: &mut Trainer| match mode {
            Mode::Adt => tr.adt_iteration(step, prepared, &mut rng),
            Mode::Ft => tr.ft_iteration(step, prepared, &mut rng),
        };
        let mut log = if self.cfg.train.autocast_bf16 {
            crate::train::fast::gpu::autocast_bf16(|| body(self))??
        } else {
            body(self)?
        };
        log.seconds = started.elapsed().as_secs_f64();
        self.step += 1;
        Ok(log)
    }

    /// Line 3 of Alg. 1: a batch, its latents and text conditioning (frozen).
    fn prepare(
        &mut self,
        images: &Tensor,
        captions: &[String],
        time_ids: &Tensor,
        rng: &mut impl Rng,
    ) -> Result<Batch> {
        let dev = self.device();
        let x0 = images.to_device(dev).to_kind(self.pipe.kind());
        let z0 = tch::no_grad(|| self.pipe.to_latents(&x0))?;
        let p = self.cfg.train.caption_dropout;
        let captions: Vec<String> = captions
            .iter()
            .map(|c| {
                if p > 0.0 && rng.gen::<f64>() < p {
                    String::new()
                } else {
                    c.clone()
                }
            })
            .collect();
        let (cond, _) = self.pipe.encode_text(&captions, Some(time_ids))?;
        let uncond = self.uncond(captions.len(), Some(time_ids))?;
        let text = match &self.disc {
            Some(d) if d.needs_text() => {
                Some(disc_text_embedding(&self.pipe, &captions, Some(&cond))?)
            }
            _ => None,
        };
        Ok(Batch {
            x0,
            z0,
            cond,
            uncond,
            text,
        })
    }

    /// With `disc.paired_color` (and a colour op in the policy): one colour draw for
    /// the batch of images `x` `[B, C, H, W]`, shared by the reference view and the
    /// views scored against it.
    fn shared_color(&self, x: &Tensor) -> Option<AugParams> {
        (self.cfg.disc.paired_color && self.policy.color).then(|| {
            let s = x.size();
            AugParams::sample(&self.policy.color_only(), s[0], s[2], s[3])
        })
    }

    /// The images the discriminator scores for latents x_hat0, in both the D step
    /// and the G step: the decoded images, not clamped (so that the G step's
    /// gradient reaches every pixel, and the D step sees exactly what the G step
    /// is scored on). Differentiable.
    pub fn disc_images(&self, final_x: &Tensor) -> Result<Tensor> {
        self.pipe.to_images(final_x)
    }

    /// Lines 3-14 of Alg. 1 for one micro-batch: start index s, noised start
    /// x_{t_s}, kept steps S, and the sampler from t_s to the end under the path
    /// constraint (Eq. 11, or DRTune's Eq. 4), run without a graph (the constraint
    /// decides only the gradient, not values; see `path.rs`).
    fn sample_trajectory(&self, b: Batch, rng: &mut impl Rng) -> Result<Trajectory> {
        let t = &self.cfg.train;
        let n = self.plan.len();
        let s = match self.force_start {
            Some(s) if s >= n => bail!("force_start = {s}, but the sampler has {n} steps"),
            Some(s) => s,
            None => rng.gen_range(0..n),
        };
        let eps = b.z0.randn_like();
        let x_s = self.plan.add_noise(&b.z0, &eps, s);
        let kept = choose_kept(rng, s, n, t.k);
        let diff_sigmas = (t.flow_timestep == FlowTimestep::LogitNormal)
            .then(|| self.logit_normal_sigmas(rng, b.z0.size()[0]));
        let guidance = Guidance::new(&b.uncond, &b.cond, self.cfg.sampler.cfg);
        let traj: &dyn Denoiser = match (&self.fast, &self.fast_sd3) {
            (Some(f), _) => f,
            (None, Some(f)) => f,
            (None, None) => self.pipe.denoiser(),
        };
        let r = rollout(traj, &self.plan, s, &x_s, &kept, &guidance, t.grad_path)?;
        Ok(Trajectory {
            batch: b,
            eps,
            s,
            x_s,
            kept,
            final_x: r.final_x,
            kept_steps: r.kept,
            diff_sigmas,
        })
    }

    fn adt_iteration(
        &mut self,
        step: usize,
        micro: Vec<Batch>,
        rng: &mut impl Rng,
    ) -> Result<StepLog> {
        let t = self.cfg.train.clone();
        // The trajectory copy follows the master weights (refreshed after a G step).
        if let Some(f) = &mut self.fast_sd3 {
            f.sync();
        }
        if let Some(f) = &mut self.fast {
            f.sync();
        }
        let mut phases = Phases::new(t.profile_phases, self.device());
        // Lines 3-14: the sampled trajectories, one per micro-batch.
        let trajs = micro
            .into_iter()
            .map(|b| self.sample_trajectory(b, rng))
            .collect::<Result<Vec<_>>>()?;
        phases.mark("trajectory");
        // Lines 16-18: the discriminator step.
        let d = self.d_step(step, &trajs, &mut phases)?;
        let mut log = StepLog {
            step,
            loss_d: Some(d.loss),
            d_acc: Some(d.accuracy),
            real_score: Some(d.real_score),
            fake_score: Some(d.fake_score),
            lr_d: d.lr,
            lr_g: warmup_lr(t.lr_g(), self.g_steps, t.warmup_g),
            t_start: trajs[0].s as i64,
            kept: trajs[0].kept.len(),
            ..Default::default()
        };
        // Lines 19-21: the generator step, every H iterations.
        if (step + 1).is_multiple_of(t.h) && step >= t.d_only_iterations {
            let g = self.g_step(step, &trajs, &mut phases)?;
            log.loss_g_adv = Some(g.loss_adv);
            log.loss_diff = Some(g.loss_diff);
            log.grad_norm_g = Some(g.grad_norm);
        }
        phases.mark("other");
        log.phases_ms = phases.finish();
        Ok(log)
    }

    /// Lines 16-18 of Alg. 1: the discriminator loss of Eq. 9 on DiffAugment-ed real
    /// and generated images (frozen features, no gradient into the generator),
    /// AdamW on the heads and predictors [phi, eta], then the EMA of the dual heads
    /// (phi' <- tau phi' + (1 - tau) phi). Micro-batch losses are scaled by 1 / A so
    /// that their gradients add up to those of the whole batch.
    fn d_step(
        &mut self,
        step: usize,
        trajs: &[Trajectory],
        phases: &mut Phases,
    ) -> Result<DStepLog> {
        let t = &self.cfg.train;
        let a = trajs.len() as f64;
        let lr = warmup_lr(t.lr_d(), step, t.warmup_d);
        self.opt_d.as_mut().unwrap().zero_grad();
        let disc = self.disc.as_ref().unwrap();
        let mut out = DStepLog {
            lr,
            ..Default::default()
        };
        for (i, tr) in trajs.iter().enumerate() {
            let x0 = &tr.batch.x0;
            let (f_ref, f_real, f_fake) = tch::no_grad(|| -> Result<_> {
                let fake = self.disc_images(&tr.final_x)?;
                let color = self.shared_color(x0);
                let real_ref = diff_augment_with_color(x0, &self.policy, color.as_ref())?;
                let real = diff_augment_with_color(x0, &self.policy, color.as_ref())?;
                let fake = diff_augment_with_color(&fake, &self.policy, color.as_ref())?;
                Ok((
                    self.features(&real_ref),
                    self.features(&real),
                    self.features(&fake),
                ))
            })?;
            let (loss, stats) = disc.d_loss(&f_ref, tr.batch.text.as_ref(), &f_real, &f_fake)?;
            check_finite(step, "loss_d", stats.loss)?;
            if let (Some(r), true) = (
                self.ddp.as_ref().and_then(|d| d.d.as_ref()),
                i + 1 == trajs.len(),
            ) {
                // The gradient all-reduce starts during this last backward.
                r.arm(1);
            }
            (loss / a).backward();
            out.loss += stats.loss / a;
            out.accuracy += stats.accuracy / a;
            out.real_score += stats.real_score / a;
            out.fake_score += stats.fake_score / a;
        }
        phases.mark("d_loss");
        if let Some(d) = &self.ddp {
            if let Some(r) = &d.d {
                r.finish()?;
            }
            d.sync_d_buffers()?;
        }
        let opt = self.opt_d.as_mut().unwrap();
        opt.lr = lr;
        opt.step();
        crate::dist::testing::after_step("d", step, opt.params());
        self.disc.as_ref().unwrap().ema_update(t.tau)?;
        phases.mark("d_step");
        Ok(out)
    }

    /// Lines 19-21 of Alg. 1: the generator gradient of L^G (Eq. 8), then
    /// (optional) gradient clipping and AdamW on theta, and the generator EMA.
    fn g_step(
        &mut self,
        step: usize,
        trajs: &[Trajectory],
        phases: &mut Phases,
    ) -> Result<GStepLog> {
        self.opt_g.zero_grad();
        let (loss_adv, loss_diff) = self.generator_gradient(step, trajs, phases)?;
        // The discriminator's gradients from the generator loss are discarded.
        self.opt_d.as_mut().unwrap().zero_grad();
        if let Some(d) = &self.ddp {
            d.g.finish()?;
        }
        crate::dist::testing::g_grads(self.opt_g.params());
        let t = &self.cfg.train;
        let grad_norm = self.opt_g.clip_grad_norm(t.grad_clip);
        check_finite(step, "generator gradient norm", grad_norm)?;
        self.opt_g.lr = warmup_lr(t.lr_g(), self.g_steps, t.warmup_g);
        self.opt_g.step();
        crate::dist::testing::after_step("g", step, self.opt_g.params());
        self.g_steps += 1;
        self.update_ema();
        phases.mark("g_step");
        Ok(GStepLog {
            loss_adv,
            loss_diff,
            grad_norm,
        })
    }

    /// Line 20 of Alg. 1: accumulate the gradient of L^G (Eq. 8) into the generator
    /// parameters, `-sum_i D_i(x_hat0) + lambda ||eps_theta(x_{t_s}, t_s) - eps||^2`
    /// for every micro-batch (scaled by 1 / A). With `train.decompose` one kept step
    /// at a time (Eq. 12): the adversarial gradient g = dL_adv / dx_hat0 through
    /// the decoder, DiffAugment, F and the heads, then each kept step recomputed
    /// with grad and backpropagated against its weight times g; otherwise the whole
    /// trajectory in one graph. Returns the (adversarial, diffusion) loss values.
    fn generator_gradient(
        &self,
        step: usize,
        trajs: &[Trajectory],
        phases: &mut Phases,
    ) -> Result<(f64, f64)> {
        let t = &self.cfg.train;
        let a = trajs.len() as f64;
        let denoiser = self.pipe.denoiser();
        let disc = self.disc.as_ref().unwrap();
        let (mut adv, mut diff) = (0.0, 0.0);
        for (i, tr) in trajs.iter().enumerate() {
            if let (Some(d), true) = (&self.ddp, i + 1 == trajs.len()) {
                // Backward passes through the generator left in this step.
                let passes = if t.decompose {
                    tr.kept_steps.len() + usize::from(tr.diff_sigmas.is_some())
                } else {
                    1
                };
                d.g.arm(passes);
            }
            let b = &tr.batch;
            let guidance = Guidance::new(&b.uncond, &b.cond, self.cfg.sampler.cfg);
            let target = self.plan.target(&b.z0, &tr.eps, tr.s);
            let color = self.shared_color(&b.x0);
            let feats_ref = tch::no_grad(|| -> Result<Vec<Tensor>> {
                Ok(self.features(&diff_augment_with_color(
                    &b.x0,
                    &self.policy,
                    color.as_ref(),
                )?))
            })?;
            let adv_loss = |x_hat0: &Tensor| -> Result<Tensor> {
                let img = self.disc_images(x_hat0)?;
                let feats = self.features(&diff_augment_with_color(
                    &img,
                    &self.policy,
                    color.as_ref(),
                )?);
                Ok(disc.g_loss(&feats_ref, b.text.as_ref(), &feats)?.0)
            };
            let (av, dv) = if t.decompose {
                let leaf = tr.final_x.detach().set_requires_grad(true);
                let loss_adv = adv_loss(&leaf)?;
                let av = loss_adv.double_value(&[]);
                check_finite(step, "loss_g_adv", av)?;
                (loss_adv / a).backward();
                phases.mark("g_adversarial");
                // Eq. 12: one kept step at a time (with the diffusion loss at t_s,
                // unless it has noise levels of its own).
                let at_start = match &tr.diff_sigmas {
                    None => Some((tr.s, &target, t.lambda / a)),
                    Some(_) => None,
                };
                let dv = backprop_kept(
                    denoiser,
                    &self.plan,
                    &tr.kept_steps,
                    &leaf.grad(),
                    &guidance,
                    at_start,
                )?;
                phases.mark("g_kept_steps");
                let dv = match &tr.diff_sigmas {
                    None => dv.unwrap_or(0.0),
                    Some(sig) => {
                        let noise = b.z0.randn_like();
                        let d = self.flow_diffusion_loss(&b.z0, &noise, sig, &b.cond)?;
                        let v = d.double_value(&[]);
                        (d * (t.lambda / a)).backward();
                        v
                    }
                };
                (av, dv)
            } else {
                let (xf, start_cond) = rollout_graph(
                    denoiser,
                    &self.plan,
                    tr.s,
                    &tr.x_s,
                    &tr.kept,
                    &guidance,
                    t.grad_path,
                )?;
                let loss_adv = adv_loss(&xf)?;
                let d = match &tr.diff_sigmas {
                    None => {
                        let d = start_cond.unwrap() - &target;
                        d.square().mean(loss_kind(&d))
                    }
                    Some(sig) => {
                        let noise = b.z0.randn_like();
                        self.flow_diffusion_loss(&b.z0, &noise, sig, &b.cond)?
                    }
                };
                let (av, dv) = (loss_adv.double_value(&[]), d.double_value(&[]));
                check_finite(step, "loss_g_adv", av)?;
                ((loss_adv + d * t.lambda) / a).backward();
                (av, dv)
            };
            check_finite(step, "loss_diff", dv)?;
            adv += av / a;
            diff += dv / a;
        }
        Ok((adv, diff))
    }

    /// The FT baseline: the diffusion loss at a uniformly drawn training timestep.
    ///
    /// DDPM schedules: t ~ U{0..T-1}, x_t = sqrt(ac_t) z0 + sqrt(1 - ac_t) eps, target
    /// eps or v. Flow matching (SD3): sigma drawn uniformly from the scheduler's
    /// shifted training sigmas ([`flow_training_sigma`], i.e. the "uniform" timestep
    /// weighting of diffusers' SD3 training scripts, no loss weighting),
    /// x_t = (1 - sigma) z0 + sigma eps, model timestep sigma * T, target eps - z0.
    /// With `train.flow_timestep = "logit_normal"` sigma is [`logit_normal_sigma`]
    /// instead (the logged `t_start` is then round(sigma * T)).
    fn ft_iteration(
        &mut self,
        step: usize,
        micro: Vec<Batch>,
        rng: &mut impl Rng,
    ) -> Result<StepLog> {
        let t = self.cfg.train.clone();
        let a = micro.len() as f64;
        self.opt_g.zero_grad();
        let (mut lv, mut t0) = (0.0, 0);
        let n_micro = micro.len();
        let mut offset = 0;
        for (k, Batch { z0, cond, .. }) in micro.into_iter().enumerate() {
            let b = z0.size()[0];
            let n_train = self.pipe.schedule.num_train_timesteps;
            let dev = self.device();
            let (ts, eps) = if crate::dist::testing::pinned_noise() {
                // Test hook: per-sample draws keyed by the sample's global index.
                let first = crate::dist::rank() * b as usize * n_micro + offset;
                crate::dist::testing::pinned_ft_noise(t.seed, step, first, &z0, n_train)
            } else {
                let ts: Vec<usize> = (0..b).map(|_| rng.gen_range(0..n_train)).collect();
                (ts, z0.randn_like())
            };
            offset += b as usize;
            let col = |v: Vec<f32>| Tensor::from_slice(&v).to_device(dev).view([-1, 1, 1, 1]);
            let mut first_t = ts[0];
            let (x_t, target, model_t) = if self.pipe.is_flow() {
                let sig: Vec<f32> = match t.flow_timestep {
                    FlowTimestep::Uniform => ts
                        .iter()
                        .map(|&i| flow_training_sigma(&self.pipe.schedule, i) as f32)
                        .collect(),
                    FlowTimestep::LogitNormal => {
                        let sig = self.logit_normal_sigmas(rng, b);
                        first_t = (sig[0] * n_train as f32).round() as usize;
                        sig
                    }
                };
                let model_t: Vec<f32> = sig.iter().map(|s| s * n_train as f32).collect();
                let s = col(sig);
                let x_t = &z0 * (1.0 - &s) + &eps * &s;
                (x_t, &eps - &z0, model_t)
            } else {
                let ac = &self.plan.alphas_cumprod;
                let (sa, sb): (Vec<f32>, Vec<f32>) = ts
                    .iter()
                    .map(|&i| ((ac[i] as f32).sqrt(), (1.0 - ac[i] as f32).sqrt()))
                    .unzip();
                let (sa, sb) = (col(sa), col(sb));
                let x_t = &z0 * &sa + &eps * &sb;
                let target = match self.pipe.schedule.prediction_type {
                    crate::schedule::Prediction::Epsilon => eps.shallow_clone(),
                    crate::schedule::Prediction::VPrediction => &eps * &sa - &z0 * &sb,
                    crate::schedule::Prediction::Flow => {
                        bail!("prediction_type flow needs a flow-matching schedule")
                    }
                };
                (x_t, target, ts.iter().map(|&i| i as f32).collect())
            };
            let tt = Tensor::from_slice(&model_t).to_device(dev);
            let out = self.pipe.denoiser().predict(&x_t, &tt, &cond)?;
            let loss = (out - target).square().mean(Kind::Float);
            let v = loss.double_value(&[]);
            check_finite(step, "loss_diff", v)?;
            if let (Some(d), true) = (&self.ddp, k + 1 == n_micro) {
                d.g.arm(1);
            }
            (loss / a).backward();
            lv += v / a;
            if k == 0 {
                t0 = first_t;
            }
        }
        if let Some(d) = &self.ddp {
            d.g.finish()?;
        }
        crate::dist::testing::g_grads(self.opt_g.params());
        let norm = self.opt_g.clip_grad_norm(t.grad_clip);
        check_finite(step, "generator gradient norm", norm)?;
        let lr = warmup_lr(t.lr_g(), self.g_steps, t.warmup_g);
        self.opt_g.lr = lr;
        self.opt_g.step();
        crate::dist::testing::after_step("g", step, self.opt_g.params());
        self.g_steps += 1;
        self.update_ema();
        Ok(StepLog {
            step,
            loss_diff: Some(lv),
            grad_norm_g: Some(norm),
            lr_g: lr,
            t_start: t0 as i64,
            ..Default::default()
        })
    }

    /// `n` noise levels from [`logit_normal_sigma`] with `train.logit_mean`,
    /// `train.logit_std` and the scheduler's shift.
    fn logit_normal_sigmas(&self, rng: &mut impl Rng, n: i64) -> Vec<f32> {
        let t = &self.cfg.train;
        let shift = self.pipe.schedule.shift;
        (0..n)
            .map(|_| logit_normal_sigma(rng, t.logit_mean, t.logit_std, shift) as f32)
            .collect()
    }

    /// The flow-matching diffusion loss (with graph) at the noise levels `sigmas`, one
    /// per sample: x = (1 - sigma) z0 + sigma noise at model timestep sigma * T, the
    /// mean squared error of the conditional output against noise - z0.
    fn flow_diffusion_loss(
        &self,
        z0: &Tensor,
        noise: &Tensor,
        sigmas: &[f32],
        cond: &Cond,
    ) -> Result<Tensor> {
        let dev = self.device();
        let n_train = self.pipe.schedule.num_train_timesteps as f32;
        let s = Tensor::from_slice(sigmas)
            .to_device(dev)
            .view([-1, 1, 1, 1]);
        let x = z0 * (1.0 - &s) + noise * &s;
        let model_t: Vec<f32> = sigmas.iter().map(|v| v * n_train).collect();
        let tt = Tensor::from_slice(&model_t).to_device(dev);
        let out = self.pipe.denoiser().predict(&x, &tt, cond)?;
        Ok((out.to_kind(Kind::Float) - (noise - z0))
            .square()
            .mean(Kind::Float))
    }

    /// EMA of the generator weights, with the usual warm-up of the decay
    /// (min(decay, (1 + n) / (10 + n)) after n updates) so that early averages are
    /// not dominated by the starting weights.
    fn update_ema(&mut self) {
        if let (Some(ema), Some(d)) = (&mut self.ema, self.cfg.train.ema_decay) {
            let n = self.g_steps as f64;
            let d = d.min((1.0 + n) / (10.0 + n));
            let vars = self.pipe.backbone_vs().variables();
            tch::no_grad(|| {
                for (name, e) in ema.iter_mut() {
                    let _ = e.lerp_(&vars[name].detach(), 1.0 - d);
                }
            });
        }
    }

    /// Drop the lines of metrics.jsonl at or after iteration `step` (a resumed run
    /// logs them again; a new run starts an empty log), and torn lines.
    pub fn truncate_metrics(&mut self, step: usize) -> Result<()> {
        let path = self.out_dir.join("metrics.jsonl");
        if self.metrics.is_none() || !path.is_file() {
            return Ok(());
        }
        self.metrics = None;
        crate::train::logging::truncate_jsonl(&path, step)?;
        self.metrics = Some(JsonlWriter::open(&path)?);
        Ok(())
    }

    /// Write one metrics line and the TensorBoard scalars.
    pub fn log(&mut self, l: &StepLog) -> Result<()> {
        if let Some(m) = &mut self.metrics {
            m.write(&serde_json::to_value(l)?)?;
        }
        if let Some(ev) = &mut self.events {
            let mut vals: Vec<(&str, f64)> =
                vec![("lr_g", l.lr_g), ("lr_d", l.lr_d), ("seconds", l.seconds)];
            for (k, v) in [
                ("loss_d", l.loss_d),
                ("d_acc", l.d_acc),
                ("real_score", l.real_score),
                ("fake_score", l.fake_score),
                ("loss_g_adv", l.loss_g_adv),
                ("loss_diff", l.loss_diff),
                ("grad_norm_g", l.grad_norm_g),
            ] {
                if let Some(v) = v {
                    vals.push((k, v));
                }
            }
            ev.scalars(l.step as i64, &vals)?;
        }
        Ok(())
    }

    /// The tuned backbone weights (EMA weights when generator EMA is on).
    pub fn final_unet_weights(&self) -> Option<&Vec<(String, Tensor)>> {
        self.ema.as_ref()
    }

    /// Write the tuned pipeline in the diffusers layout.
    /// The output of the run: the pipeline folder, or with `train.lora` the adapters
    /// alone (`out/pytorch_lora_weights.safetensors`, for diffusers' `load_lora_weights`
    /// or `adt sample --lora`).
    pub fn save_final(&self, out: &Path) -> Result<()> {
        self.with_ema_weights(|| match &self.cfg.train.lora {
            Some(l) => crate::models::lora::save_peft(
                self.pipe.lora_slots(),
                &l.spec(),
                self.pipe.lora_prefix(),
                out,
            ),
            None => self.pipe.save(out),
        })
    }

    fn with_ema_weights(&self, save: impl Fn() -> Result<()>) -> Result<()> {
        if let Some(ema) = &self.ema {
            // Swap the EMA weights in for saving, then restore.
            let vars = self.pipe.backbone_vs().variables();
            let backup: Vec<(String, Tensor)> = ema
                .iter()
                .map(|(k, _)| (k.clone(), vars[k].detach().copy()))
                .collect();
            tch::no_grad(|| {
                for (k, e) in ema {
                    vars[k].shallow_clone().copy_(e);
                }
            });
            let r = save();
            tch::no_grad(|| {
                for (k, b) in &backup {
                    vars[k].shallow_clone().copy_(b);
                }
            });
            r
        } else {
            save()
        }
    }

    pub fn feature_network(&self) -> Option<&dyn FeatureNetwork> {
        self.features.as_deref()
    }
}
