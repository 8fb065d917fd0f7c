//! The training configuration: a TOML file plus `--set key=value` overrides,
//! validated up front. Defaults are the paper's (section 5, "Training Settings").

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::disc::features::Levels;
use crate::models::pipeline::Family;
use crate::schedule::SamplerKind;

/// ADT or the plain fine-tuning baseline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Adversarial Diffusion Tuning (Algorithm 1).
    Adt,
    /// Plain diffusion-loss fine-tuning (the paper's FT baseline).
    Ft,
}

/// Which stop-gradients the sampled trajectory uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GradPath {
    /// Eq. 11: x + (a - 1) sg(x) + b eps(sg(x)): unit-scale gradient to every step.
    Adt,
    /// Eq. 4 (DRTune): a x + b eps(sg(x)): the gradient scales by prod a.
    Drtune,
}

/// How the flow-matching diffusion loss draws its noise level sigma (SD3 models).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowTimestep {
    /// FT: sigma uniform over the scheduler's shifted training sigmas. ADT: the
    /// diffusion loss of Eq. 8 at the trajectory's start step t_s.
    Uniform,
    /// sigma = sigmoid(n), n ~ N(train.logit_mean, train.logit_std^2), then the
    /// scheduler's shift (SD3's training default). ADT evaluates its diffusion-loss
    /// term at such a sigma, drawn independently of the trajectory's start step.
    LogitNormal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiscKind {
    /// Eq. 6: dual EMA heads, BYOL predictor, cosine score.
    Siamese,
    /// StyleGAN-T's heads: text-conditioned logits per token, hinge loss per token
    /// (paper ablation).
    StyleganT,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FeatureNet {
    Dinov2,
    EfficientnetLite0,
    EfficientnetLite1,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// A diffusers pipeline folder, or "tiny-random" / "tiny-random-sd3" for
    /// randomly initialised tiny models of the real architectures (smoke tests).
    pub path: String,
    /// Weight variant to prefer, e.g. "fp16".
    pub variant: Option<String>,
    /// Where the tuned pipeline is written (default: `<output.dir>/final`).
    pub save_to: Option<PathBuf>,
    /// SD3: run the T5 encoder (`text_encoder_3`) when the pipeline has one.
    pub use_t5: bool,
    /// SD3: T5 tokens per prompt (without T5, as many zero tokens stand in for them,
    /// as in diffusers).
    pub max_sequence_length: usize,
    /// Weights of the frozen networks: the VAE, the text encoders and the
    /// discriminator's feature network (DINOv2 / EfficientNet-Lite): "fp32" (default),
    /// "bf16" or "fp16". They compute in this dtype; their outputs are float32.
    pub frozen_dtype: WeightDtype,
    /// Where the text encoders live and run: "train" (the training device, default) or
    /// "cpu" (only their outputs move to the training device).
    pub text_device: TextDevice,
}

/// A floating-point storage dtype for weights (`model.frozen_dtype`, `train.base_dtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightDtype {
    #[default]
    Fp32,
    Bf16,
    Fp16,
}

impl WeightDtype {
    pub fn kind(self) -> tch::Kind {
        match self {
            WeightDtype::Fp32 => tch::Kind::Float,
            WeightDtype::Bf16 => tch::Kind::BFloat16,
            WeightDtype::Fp16 => tch::Kind::Half,
        }
    }

    /// The configuration spelling ("fp32", "bf16", "fp16").
    pub fn name(self) -> &'static str {
        match self {
            WeightDtype::Fp32 => "fp32",
            WeightDtype::Bf16 => "bf16",
            WeightDtype::Fp16 => "fp16",
        }
    }
}

/// Where the text encoders run (`model.text_device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextDevice {
    /// The training device (`train.device`).
    #[default]
    Train,
    /// The host CPU: the encoders' weights stay in host memory.
    Cpu,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            path: "tiny-random".into(),
            variant: None,
            save_to: None,
            use_t5: true,
            max_sequence_length: 256,
            frozen_dtype: WeightDtype::Fp32,
            text_device: TextDevice::Train,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSection {
    pub mode: Mode,
    pub grad_path: GradPath,
    /// Training iterations (each has a D step; every H-th also a G step).
    pub iterations: usize,
    pub batch_size: usize,
    /// Micro-batches accumulated per optimiser step.
    pub grad_accum: usize,
    pub seed: u64,
    /// Weight of the diffusion loss in the generator objective (Eq. 8).
    pub lambda: f64,
    /// Number of kept gradient steps (Alg. 1 line 5); at least 1 (0 is refused).
    pub k: usize,
    /// Generator update period (Alg. 1 line 19).
    pub h: usize,
    /// EMA rate of the dual heads (Alg. 1 line 18).
    pub tau: f64,
    /// Generator learning rate; unset: the paper's for the model's family
    /// ([`ModelDefaults`]).
    pub lr_g: Option<f64>,
    /// Discriminator learning rate; unset: the same as the generator's default.
    pub lr_d: Option<f64>,
    pub warmup_g: usize,
    pub warmup_d: usize,
    pub weight_decay_g: f64,
    pub weight_decay_d: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    /// Gradient-norm clipping for the generator (0 = off, the default: the paper
    /// does not clip).
    pub grad_clip: f64,
    /// EMA of the generator weights (None = off).
    pub ema_decay: Option<f64>,
    /// Per-step gradient decomposition (Eq. 12): one UNet graph at a time.
    /// `false` keeps the whole trajectory in one graph.
    pub decompose: bool,
    /// Training resolution in pixels; unset: the model's native resolution.
    pub resolution: Option<i64>,
    /// Probability of dropping the caption (for CFG) in the diffusion loss.
    pub caption_dropout: f64,
    /// Flow-matching models: the noise-level draw of the diffusion loss, "uniform"
    /// or "logit_normal" (see [`FlowTimestep`]).
    pub flow_timestep: FlowTimestep,
    /// Mean of the logit-normal draw (`flow_timestep = "logit_normal"`).
    pub logit_mean: f64,
    /// Standard deviation of the logit-normal draw (`flow_timestep = "logit_normal"`).
    pub logit_std: f64,
    /// Iterations with discriminator updates only, before the first generator step.
    pub d_only_iterations: usize,
    /// "cpu", "cuda" or "cuda:N".
    pub device: String,
    /// Run the gradient-free trajectory with a bfloat16 copy of the UNet or SD3
    /// transformer (refreshed from the float32 master weights after each generator
    /// step); the kept steps are recomputed with the float32 weights.
    pub bf16_trajectory: bool,
    /// Gradient checkpointing: the backbone's blocks (UNet resnets and transformers,
    /// MMDiT joint blocks) and the VAE decoder's blocks keep only their inputs in
    /// the graph and run again in the backward, so the kept-step recomputation and
    /// the decode backward hold one block's activations at a time, for about one
    /// more forward of each. Needs a build with LIBTORCH set (the checkpoint
    /// binding).
    pub gradient_checkpointing: bool,
    /// Capture the guided UNet call of the trajectory once as a CUDA graph and replay
    /// it (CUDA, GPU build only; UNet models).
    pub cuda_graph: bool,
    /// Channels-last layout for the trajectory copy of the UNet (UNet models).
    pub channels_last: bool,
    /// cuDNN benchmark mode: pick the fastest convolution algorithms (CUDA).
    pub cudnn_benchmark: bool,
    /// Allow TF32 tensor cores for float32 matmuls and convolutions (CUDA).
    pub tf32: bool,
    /// Run the iteration under CUDA bfloat16 autocast (torch.autocast semantics:
    /// matmuls / convolutions in bfloat16, float32 master weights and optimiser).
    pub autocast_bf16: bool,
    /// Record the wall time of each phase of an ADT iteration (trajectory,
    /// discriminator, generator) in metrics.jsonl; synchronises the device at each
    /// phase boundary.
    pub profile_phases: bool,
    /// Stop after this many minutes of training and save as if finished.
    pub time_limit_minutes: Option<f64>,
    /// Data-parallel runs: "auto" (NCCL on CUDA, Gloo on the CPU), "gloo" or "nccl".
    pub dist_backend: String,
    /// Data-parallel runs: seconds a collective may wait for the other ranks before
    /// the run stops with an error naming the rank that died or stopped answering.
    pub dist_timeout_s: f64,
    /// Data-parallel ADT runs: every rank uses the same trajectory start step in an
    /// iteration (drawn from a stream shared by the ranks; noise, kept steps and data
    /// stay per rank). Off, each rank draws its own, and an iteration waits for the
    /// rank with the longest trajectory.
    pub dist_shared_start: bool,
    /// Train LoRA adapters instead of the backbone (`train.lora = { rank = 16 }`): the
    /// base weights are frozen and only the adapters are optimised; the run writes
    /// `pytorch_lora_weights.safetensors` (diffusers / PEFT layout) instead of a pipeline.
    pub lora: Option<LoraSection>,
    /// Storage of the generator's AdamW moments: "fp32" (8 bytes per trainable
    /// parameter), "bf16" (4) or "8bit" (block-wise 8-bit as bitsandbytes' AdamW8bit,
    /// about 2). The update itself is computed in float32.
    pub optimizer_state: crate::train::optim::MomentStorage,
    /// With `train.lora`: the dtype the frozen base weights of the backbone are kept
    /// in, "fp32" (default) or "bf16". With "bf16" the base is stored once in
    /// bfloat16 and is also the trajectory model (no separate trajectory copy); the
    /// adapters stay float32 and the base matmuls run in bfloat16.
    pub base_dtype: WeightDtype,
}

/// `train.lora`: the LoRA adapters to train.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraSection {
    pub rank: i64,
    /// Scale numerator: the adapter output is multiplied by `alpha / rank` (default: rank).
    pub alpha: Option<f64>,
    /// Dropout on the adapter input during training.
    pub dropout: f64,
    /// Module-name suffixes to adapt (PEFT's `target_modules`): by default the attention
    /// projections; also possible: `ff.net.0.proj`, `ff.net.2` (feed-forward), and for
    /// SD3 `add_q_proj`, `add_k_proj`, `add_v_proj`, `to_add_out`.
    pub targets: Vec<String>,
}

impl Default for LoraSection {
    fn default() -> Self {
        LoraSection {
            rank: 16,
            alpha: None,
            dropout: 0.0,
            targets: crate::models::lora::default_targets(),
        }
    }
}

impl LoraSection {
    pub fn spec(&self) -> crate::models::lora::LoraSpec {
        crate::models::lora::LoraSpec {
            rank: self.rank,
            alpha: self.alpha.unwrap_or(self.rank as f64),
            dropout: self.dropout,
            targets: self.targets.clone(),
        }
    }
}

/// The paper's per-model settings (section 5, "Training Settings"): learning rate
/// 5e-6 for SD 1.x / 2.x, 1e-6 for SDXL and SD3 (the same for the generator and
/// the discriminator), training at the model's native resolution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelDefaults {
    pub lr: f64,
    pub resolution: i64,
}

impl ModelDefaults {
    /// The defaults of a pipeline `family` whose native resolution (the backbone's
    /// `sample_size` in pixels) is `native_resolution`.
    pub fn for_family(family: Family, native_resolution: i64) -> ModelDefaults {
        let lr = match family {
            Family::Sd => 5e-6,
            Family::Sdxl | Family::Sd3 => 1e-6,
        };
        ModelDefaults {
            lr,
            resolution: native_resolution,
        }
    }
}

impl TrainSection {
    /// The generator learning rate (before [`Config::apply_model_defaults`]: the
    /// SD 1.x default when unset).
    pub fn lr_g(&self) -> f64 {
        self.lr_g.unwrap_or(5e-6)
    }

    /// The discriminator learning rate (see [`Self::lr_g`]).
    pub fn lr_d(&self) -> f64 {
        self.lr_d.unwrap_or(5e-6)
    }

    /// The training resolution (before [`Config::apply_model_defaults`]: 512 when
    /// unset).
    pub fn resolution(&self) -> i64 {
        self.resolution.unwrap_or(512)
    }
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection {
            mode: Mode::Adt,
            grad_path: GradPath::Adt,
            iterations: 20_000,
            batch_size: 8,
            grad_accum: 1,
            seed: 0,
            lambda: 0.5,
            k: 3,
            h: 5,
            tau: 0.99,
            lr_g: None,
            lr_d: None,
            warmup_g: 500,
            warmup_d: 1000,
            weight_decay_g: 1e-2,
            weight_decay_d: 1e-2,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            grad_clip: 0.0,
            ema_decay: None,
            decompose: true,
            resolution: None,
            caption_dropout: 0.0,
            flow_timestep: FlowTimestep::Uniform,
            logit_mean: 0.0,
            logit_std: 1.0,
            d_only_iterations: 0,
            device: "cpu".into(),
            bf16_trajectory: false,
            gradient_checkpointing: false,
            cuda_graph: false,
            channels_last: false,
            cudnn_benchmark: false,
            tf32: false,
            autocast_bf16: false,
            profile_phases: false,
            time_limit_minutes: None,
            lora: None,
            optimizer_state: Default::default(),
            base_dtype: WeightDtype::Fp32,
            dist_backend: "auto".into(),
            dist_timeout_s: 600.0,
            dist_shared_start: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplerSection {
    pub kind: SamplerKind,
    pub steps: usize,
    /// Classifier-free guidance scale (1 = off).
    pub cfg: f64,
}

impl Default for SamplerSection {
    fn default() -> Self {
        SamplerSection {
            kind: SamplerKind::Ddim,
            steps: 50,
            cfg: 7.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscSection {
    pub kind: DiscKind,
    pub features: FeatureNet,
    /// Folder of the feature network's weights (DINOv2: a transformers folder).
    pub features_path: Option<PathBuf>,
    /// Tapped blocks (DINOv2, 0-based layers) or stages (EfficientNet); unset: the
    /// network's default (DINOv2 [2, 5, 8, 11], EfficientNet [1, 2, 4, 6]).
    pub blocks: Option<Vec<usize>>,
    /// "patch_and_blocks" (default: the patch embedding or stem plus the blocks,
    /// DINOv2 tokens with the CLS readout: StyleGAN-T's hooks, five levels) or
    /// "blocks" (the blocks only, no CLS: the four-level ablation).
    pub levels: Levels,
    /// Input resolution of the feature network.
    pub resolution: i64,
    /// DiffAugment policy.
    pub diffaug: String,
    /// One draw of DiffAugment's colour op per sample, shared by the real reference
    /// view and the views scored against it (real and generated) in both steps;
    /// translation and cutout stay independent per view. Default false: every view
    /// gets its own colour draw (DiffAugment as published). See README, "Colour drift".
    pub paired_color: bool,
    /// Width of the heads' convolution blocks; unset: the width of the features
    /// of each level (StyleGAN-T).
    pub channels: Option<i64>,
    /// Output channels of the heads (StyleGAN-T's and the paper's 64).
    pub out_channels: i64,
}

impl Default for DiscSection {
    fn default() -> Self {
        DiscSection {
            kind: DiscKind::Siamese,
            features: FeatureNet::Dinov2,
            features_path: None,
            blocks: None,
            levels: Levels::PatchAndBlocks,
            resolution: 224,
            diffaug: "color,translation,cutout".into(),
            paired_color: false,
            channels: None,
            out_channels: 64,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutputSection {
    pub dir: PathBuf,
    pub log_every: usize,
    pub sample_every: usize,
    pub checkpoint_every: usize,
    pub validation_prompts: Vec<String>,
    /// Keep this many periodic checkpoints (the newest ones).
    pub keep_checkpoints: usize,
}

impl Default for OutputSection {
    fn default() -> Self {
        OutputSection {
            dir: PathBuf::from("runs/adt"),
            log_every: 1,
            sample_every: 500,
            checkpoint_every: 1000,
            validation_prompts: vec![],
            keep_checkpoints: 2,
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub model: ModelSection,
    pub train: TrainSection,
    pub sampler: SamplerSection,
    pub disc: DiscSection,
    pub data: toml::Table,
    pub output: OutputSection,
}

/// Parse `key=value` where value is a TOML value; bare words become strings.
fn parse_override(s: &str) -> Result<(Vec<String>, toml::Value)> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| anyhow!("--set {s:?}: expected key=value, e.g. train.lr_g=1e-5"))?;
    let key: Vec<String> = k.trim().split('.').map(|p| p.trim().to_string()).collect();
    if key.iter().any(|p| p.is_empty()) {
        bail!("--set {s:?}: empty key part");
    }
    let v = v.trim();
    let value = match format!("x = {v}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("x").unwrap(),
        Err(_) => toml::Value::String(v.to_string()),
    };
    Ok((key, value))
}

fn set_path(table: &mut toml::Table, key: &[String], value: toml::Value) -> Result<()> {
    let (first, rest) = key.split_first().unwrap();
    if rest.is_empty() {
        table.insert(first.clone(), value);
        return Ok(());
    }
    let entry = table
        .entry(first.clone())
        .or_insert_with(|| toml::Value::Table(Default::default()));
    match entry {
        toml::Value::Table(t) => set_path(t, rest, value),
        _ => bail!("--set {}: {first} is not a section", key.join(".")),
    }
}

impl Config {
    /// Load a TOML file (or start from defaults) and apply `key=value` overrides.
    pub fn load(path: Option<&Path>, overrides: &[String]) -> Result<Config> {
        let mut table: toml::Table = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .with_context(|| format!("reading config {}", p.display()))?;
                text.parse()
                    .with_context(|| format!("{}: invalid TOML", p.display()))?
            }
            None => toml::Table::new(),
        };
        for o in overrides {
            let (key, value) = parse_override(o)?;
            set_path(&mut table, &key, value)?;
        }
        let where_ = path
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "configuration".into());
        let cfg: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
                let key = e.path().to_string();
                let inner = e.into_inner();
                anyhow!("{where_}: key {key}: {}", inner.message().trim())
            })?;
        cfg.validate()
            .with_context(|| format!("{where_}: invalid value"))?;
        Ok(cfg)
    }

    /// Range and consistency checks; errors name the key and the allowed values.
    pub fn validate(&self) -> Result<()> {
        let t = &self.train;
        if t.gradient_checkpointing && !crate::models::checkpoint::available() {
            bail!(
                "train.gradient_checkpointing = true: this build has no checkpoint binding \
                 (csrc/ckpt_shim.cpp is compiled only when LIBTORCH is set at build time; \
                 source scripts/env.sh and rebuild)"
            );
        }
        if !["auto", "gloo", "nccl"].contains(&t.dist_backend.as_str()) {
            bail!(
                "train.dist_backend = {:?}: expected \"auto\", \"gloo\" or \"nccl\"",
                t.dist_backend
            );
        }
        if !(t.dist_timeout_s > 0.0 && t.dist_timeout_s.is_finite()) {
            bail!(
                "train.dist_timeout_s = {}: must be a positive number of seconds",
                t.dist_timeout_s
            );
        }
        let pos = |k: &str, v: usize| -> Result<()> {
            if v == 0 {
                bail!("{k} = 0: must be at least 1");
            }
            Ok(())
        };
        pos("train.iterations", t.iterations)?;
        pos("train.batch_size", t.batch_size)?;
        pos("train.grad_accum", t.grad_accum)?;
        pos("train.h", t.h)?;
        pos("train.k", t.k)?;
        pos("sampler.steps", self.sampler.steps)?;
        if !(0.0..=1.0).contains(&t.tau) {
            bail!("train.tau = {}: must be in [0, 1]", t.tau);
        }
        if t.lambda < 0.0 || !t.lambda.is_finite() {
            bail!("train.lambda = {}: must be a finite number >= 0", t.lambda);
        }
        for (k, v) in [("train.lr_g", t.lr_g), ("train.lr_d", t.lr_d)] {
            if let Some(v) = v.filter(|v| !(*v > 0.0 && v.is_finite())) {
                bail!("{k} = {v}: must be a positive number");
            }
        }
        if !(t.grad_clip >= 0.0 && t.grad_clip.is_finite()) {
            bail!(
                "train.grad_clip = {}: must be a finite number >= 0 (0 = off)",
                t.grad_clip
            );
        }
        if let Some(d) = t.ema_decay {
            if !(0.0..1.0).contains(&d) {
                bail!("train.ema_decay = {d}: must be in [0, 1)");
            }
        }
        if !t.logit_mean.is_finite() {
            bail!(
                "train.logit_mean = {}: must be a finite number",
                t.logit_mean
            );
        }
        if !(t.logit_std > 0.0 && t.logit_std.is_finite()) {
            bail!(
                "train.logit_std = {}: must be a positive number",
                t.logit_std
            );
        }
        if !(0.0..=1.0).contains(&t.caption_dropout) {
            bail!(
                "train.caption_dropout = {}: must be in [0, 1]",
                t.caption_dropout
            );
        }
        if let Some(r) = t.resolution.filter(|&r| r < 8 || r % 8 != 0) {
            bail!("train.resolution = {r}: must be a positive multiple of 8");
        }
        if self.sampler.cfg < 0.0 {
            bail!(
                "sampler.cfg = {}: must be >= 0 (1 = no guidance)",
                self.sampler.cfg
            );
        }
        if !(32..=4096).contains(&self.disc.resolution) {
            bail!(
                "disc.resolution = {}: must be between 32 and 4096 pixels (DINOv2 also needs a multiple of its patch size, 14)",
                self.disc.resolution
            );
        }
        if self.disc.blocks.as_ref().is_some_and(|b| b.is_empty()) {
            bail!("disc.blocks: at least one block is needed");
        }
        if let Some(c) = self.disc.channels.filter(|&c| c <= 0) {
            bail!("disc.channels = {c}: must be positive");
        }
        if self.disc.out_channels <= 0 {
            bail!(
                "disc.out_channels = {}: must be positive",
                self.disc.out_channels
            );
        }
        for p in self
            .disc
            .diffaug
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            if !["color", "translation", "cutout"].contains(&p) {
                bail!("disc.diffaug: unknown policy {p:?} (allowed: color, translation, cutout)");
            }
        }
        match t.base_dtype {
            WeightDtype::Fp32 => {}
            WeightDtype::Fp16 => bail!(
                "train.base_dtype = \"fp16\": allowed values are \"fp32\" and \"bf16\" (float16 \
                 has too little range for the trained model's activations)"
            ),
            WeightDtype::Bf16 => {
                if t.lora.is_none() {
                    bail!(
                        "train.base_dtype = \"bf16\" needs train.lora: a full fine-tune trains the \
                         base weights, which stay float32 master weights (train.bf16_trajectory \
                         gives the bfloat16 trajectory)"
                    );
                }
                if t.cuda_graph || t.channels_last {
                    bail!(
                        "train.base_dtype = \"bf16\" runs the trajectory on the bfloat16 base itself; \
                         train.cuda_graph and train.channels_last build a separate trajectory copy \
                         of the UNet: turn them off"
                    );
                }
            }
        }
        match t.device.as_str() {
            "cpu" | "cuda" => {}
            d if d.starts_with("cuda:") && d[5..].parse::<usize>().is_ok() => {}
            d => bail!("train.device = {d:?}: allowed values are cpu, cuda, cuda:N"),
        }
        Ok(())
    }

    /// Fill in the per-model settings the user left unset (`train.lr_g`,
    /// `train.lr_d`, `train.resolution`) from the paper's defaults for `family`
    /// ([`ModelDefaults`]). Returns one line per value chosen (empty when all
    /// were set).
    pub fn apply_model_defaults(&mut self, family: Family, native_resolution: i64) -> Vec<String> {
        let d = ModelDefaults::for_family(family, native_resolution);
        let family = match family {
            Family::Sd => "SD 1.x / 2.x",
            Family::Sdxl => "SDXL",
            Family::Sd3 => "SD3",
        };
        let t = &mut self.train;
        let mut chosen = Vec::new();
        if t.lr_g.is_none() {
            t.lr_g = Some(d.lr);
            chosen.push(format!(
                "train.lr_g = {:e} (the paper's for {family})",
                d.lr
            ));
        }
        if t.lr_d.is_none() {
            t.lr_d = Some(d.lr);
            chosen.push(format!(
                "train.lr_d = {:e} (the paper's for {family})",
                d.lr
            ));
        }
        if t.resolution.is_none() {
            t.resolution = Some(d.resolution);
            chosen.push(format!(
                "train.resolution = {} (the model's native resolution)",
                d.resolution
            ));
        }
        chosen
    }

    /// The effective configuration as TOML.
    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }

    /// The configured device exists in this build and on this machine.
    pub fn check_device(&self) -> Result<()> {
        if let tch::Device::Cuda(i) = self.device() {
            let n = if tch::Cuda::is_available() {
                tch::Cuda::device_count() as usize
            } else {
                0
            };
            if i >= n {
                bail!(
                    "train.device = {:?}: {}",
                    self.train.device,
                    if n == 0 {
                        "no CUDA device is available (a CPU build of adt, or no GPU visible); use train.device = \"cpu\" or a CUDA build (--features cuda)".to_string()
                    } else {
                        format!(
                            "this machine has {n} CUDA device(s) (cuda:0..cuda:{})",
                            n - 1
                        )
                    }
                );
            }
        }
        Ok(())
    }

    /// The device the text encoders run on (`model.text_device`).
    pub fn text_device(&self) -> tch::Device {
        match self.model.text_device {
            TextDevice::Train => self.device(),
            TextDevice::Cpu => tch::Device::Cpu,
        }
    }

    pub fn device(&self) -> tch::Device {
        match self.train.device.as_str() {
            "cpu" => tch::Device::Cpu,
            "cuda" => tch::Device::Cuda(0),
            d => tch::Device::Cuda(d[5..].parse().unwrap_or(0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_papers() {
        let c = Config::load(None, &[]).unwrap();
        assert_eq!(c.train.lambda, 0.5);
        assert_eq!(c.train.k, 3);
        assert_eq!(c.train.h, 5);
        assert_eq!(c.train.tau, 0.99);
        // Learning rates and resolution are chosen per model family (see
        // `model_defaults_by_family`).
        assert_eq!(
            (c.train.lr_g, c.train.lr_d, c.train.resolution),
            (None, None, None)
        );
        assert_eq!(c.train.grad_clip, 0.0, "the paper does not clip gradients");
        assert_eq!((c.train.warmup_d, c.train.warmup_g), (1000, 500));
        assert_eq!(c.train.batch_size, 8);
        assert_eq!(c.sampler.kind, SamplerKind::Ddim);
        assert_eq!(c.sampler.steps, 50);
        assert_eq!(c.sampler.cfg, 7.0);
        assert_eq!(c.disc.blocks, None);
        assert_eq!(c.disc.levels, Levels::PatchAndBlocks);
        assert_eq!((c.disc.channels, c.disc.out_channels), (None, 64));
    }

    /// Section 5: 5e-6 for SD 1.x, 1e-6 for SDXL and SD3, the native resolution;
    /// values the user set are kept, and every chosen value is reported.
    #[test]
    fn model_defaults_by_family() {
        for (family, native, lr) in [
            (Family::Sd, 512, 5e-6),
            (Family::Sdxl, 1024, 1e-6),
            (Family::Sd3, 1024, 1e-6),
        ] {
            let mut c = Config::load(None, &[]).unwrap();
            let lines = c.apply_model_defaults(family, native);
            assert_eq!(c.train.lr_g, Some(lr), "{family:?}");
            assert_eq!(c.train.lr_d, Some(lr), "{family:?}");
            assert_eq!(c.train.resolution, Some(native), "{family:?}");
            assert_eq!(lines.len(), 3, "{lines:?}");
            assert!(lines[0].contains("train.lr_g") && lines[2].contains(&native.to_string()));
            // Set by the user: kept, nothing reported for it.
            let mut c = Config::load(
                None,
                &["train.lr_g=3e-5".into(), "train.resolution=256".into()],
            )
            .unwrap();
            let lines = c.apply_model_defaults(family, native);
            assert_eq!(c.train.lr_g, Some(3e-5));
            assert_eq!(c.train.lr_d, Some(lr));
            assert_eq!(c.train.resolution, Some(256));
            assert_eq!(lines.len(), 1, "{lines:?}");
            assert!(lines[0].contains("train.lr_d"));
        }
    }

    #[test]
    fn overrides_apply_and_round_trip() {
        let c = Config::load(
            None,
            &[
                "train.k=8".into(),
                "sampler.kind=dpm_solver_pp2m".into(),
                "train.mode=ft".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.train.k, 8);
        assert_eq!(c.sampler.kind, SamplerKind::DpmSolverPp2m);
        assert_eq!(c.train.mode, Mode::Ft);
        let text = c.to_toml().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, text).unwrap();
        assert_eq!(Config::load(Some(&p), &[]).unwrap(), c);
    }

    #[test]
    fn errors_name_the_key_and_allowed_values() {
        let e = format!(
            "{:#}",
            Config::load(None, &["train.mode=gan".into()]).unwrap_err()
        );
        assert!(
            e.contains("train.mode") && e.contains("adt") && e.contains("ft"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            Config::load(None, &["train.lamda=0.5".into()]).unwrap_err()
        );
        assert!(e.contains("lamda") && e.contains("lambda"), "{e}");
        let e = format!(
            "{:#}",
            Config::load(None, &["train.tau=1.5".into()]).unwrap_err()
        );
        assert!(e.contains("train.tau"), "{e}");
        let e = format!(
            "{:#}",
            Config::load(None, &["disc.diffaug=color,blur".into()]).unwrap_err()
        );
        assert!(e.contains("blur") && e.contains("cutout"), "{e}");
        let e = format!(
            "{:#}",
            Config::load(None, &["nonsense".into()]).unwrap_err()
        );
        assert!(e.contains("key=value"), "{e}");
        let e = format!(
            "{:#}",
            Config::load(None, &["train.device=tpu".into()]).unwrap_err()
        );
        assert!(e.contains("cuda:N"), "{e}");
    }

    #[test]
    fn flow_timestep_keys() {
        let c = Config::load(None, &[]).unwrap();
        assert_eq!(c.train.flow_timestep, FlowTimestep::Uniform);
        assert_eq!((c.train.logit_mean, c.train.logit_std), (0.0, 1.0));
        let c = Config::load(
            None,
            &[
                "train.flow_timestep=logit_normal".into(),
                "train.logit_mean=-0.5".into(),
                "train.logit_std=1.5".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.train.flow_timestep, FlowTimestep::LogitNormal);
        assert_eq!((c.train.logit_mean, c.train.logit_std), (-0.5, 1.5));
        let text = c.to_toml().unwrap();
        assert!(text.contains("flow_timestep = \"logit_normal\""), "{text}");
        let e = format!(
            "{:#}",
            Config::load(None, &["train.flow_timestep=lognormal".into()]).unwrap_err()
        );
        assert!(
            e.contains("train.flow_timestep")
                && e.contains("logit_normal")
                && e.contains("uniform"),
            "{e}"
        );
        for bad in [
            "train.logit_std=0",
            "train.logit_std=-1",
            "train.logit_std=nan",
        ] {
            let e = format!("{:#}", Config::load(None, &[bad.into()]).unwrap_err());
            assert!(e.contains("train.logit_std"), "{bad}: {e}");
        }
        let e = format!(
            "{:#}",
            Config::load(None, &["train.logit_mean=inf".into()]).unwrap_err()
        );
        assert!(e.contains("train.logit_mean"), "{e}");
    }

    /// The memory options: the bf16 base needs LoRA and no separate trajectory copy,
    /// fp16 is refused for the base, and the text device resolves to the host or the
    /// training device.
    #[test]
    fn memory_options_are_checked() {
        let load = |o: &[&str]| {
            let o: Vec<String> = o.iter().map(|s| s.to_string()).collect();
            Config::load(None, &o)
        };
        let err = |o: &[&str]| format!("{:#}", load(o).unwrap_err());
        let e = err(&["train.base_dtype=\"bf16\""]);
        assert!(
            e.contains("train.base_dtype") && e.contains("train.lora"),
            "{e}"
        );
        let e = err(&["train.base_dtype=\"fp16\"", "train.lora={}"]);
        assert!(e.contains("train.base_dtype = \"fp16\""), "{e}");
        for lever in ["train.cuda_graph=true", "train.channels_last=true"] {
            let e = err(&["train.base_dtype=\"bf16\"", "train.lora={}", lever]);
            assert!(
                e.contains("train.cuda_graph and train.channels_last"),
                "{e}"
            );
        }
        let e = err(&["model.frozen_dtype=\"fp8\""]);
        assert!(e.contains("model.frozen_dtype"), "{e}");
        let c = load(&[
            "train.base_dtype=\"bf16\"",
            "train.lora={}",
            "model.frozen_dtype=\"fp16\"",
            "model.text_device=\"cpu\"",
            "train.device=\"cuda:1\"",
        ])
        .unwrap();
        assert_eq!(c.train.base_dtype.kind(), tch::Kind::BFloat16);
        assert_eq!(c.model.frozen_dtype.kind(), tch::Kind::Half);
        assert_eq!(c.text_device(), tch::Device::Cpu);
        let c = load(&["train.device=\"cuda:1\""]).unwrap();
        assert_eq!(c.text_device(), tch::Device::Cuda(1));
        assert_eq!(c.model.frozen_dtype, WeightDtype::Fp32);
        assert_eq!(c.train.base_dtype, WeightDtype::Fp32);
    }
}
