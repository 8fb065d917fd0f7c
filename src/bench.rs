//! `adt bench`: wall time and peak memory of the training and sampling workloads on
//! randomly initialised models of the real sizes, with the speed levers measured
//! one by one against an eager float32 baseline in the same run.
//!
//! Workloads (batch 1; classifier-free guidance doubles the UNet batch):
//! * `unet_cfg_step`: one guided UNet call without gradient;
//! * `sample_ddim50`: a 50-step DDIM sampling run plus the VAE decode;
//! * `adt_gd_s0`: one ADT iteration with generator and discriminator update,
//!   starting at step 0 (the whole 50-step trajectory), K = 3;
//!
//! (`--steps` changes the 50, for quick checks; the names follow.)
//! * `adt_d_s0`: one discriminator-only iteration from step 0;
//! * `adt_h5_mean`: the mean iteration time over H = 5 iterations (one G+D, four
//!   D-only) with random start steps;
//! * `adt_gd_s0_k{K}` / `adt_gd_s0_k{K}_onegraph`: the G+D iteration for each K with
//!   the per-step gradient decomposition and with the whole trajectory in one graph
//!   (peak memory against K).
//!
//! SD3 configurations (`tiny-sd3`, `sd3-medium`) run the same workloads on the
//! MMDiT with SD3's flow-matching schedule and the flow Euler sampler (28 steps by
//! default): `transformer_cfg_step`, `sample_flow28`, and the ADT rows, whose
//! trajectory follows the flow path of the trainer. The UNet-only levers
//! (channels-last, CUDA graph) are reported as unsupported there; `bf16` runs the
//! trajectory on a bfloat16 copy of the transformer.
//!
//! Clocks are synchronised with the device before and after every timed run. Peak
//! memory is the CUDA caching allocator's maximum allocated bytes (reset before the
//! timed runs; needs a binary with the CUDA shim) or, on CPU, the process's peak
//! resident set (VmHWM, reset through /proc/self/clear_refs).

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::fmt;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::time::Instant;
use tch::{nn, Device, Kind, Tensor};

use crate::disc::features::DinoFeatures;
use crate::disc::FeatureNetwork;
use crate::models::clip::ClipTextConfig;
use crate::models::clip::{ClipTextModel, LoadedClipText};
use crate::models::denoiser::{guided_output, Denoiser, Guidance};
use crate::models::dinov2::{Dinov2Config, Dinov2Model};
use crate::models::mmdit::{LoadedSd3Transformer, Sd3Config, Sd3TrajectoryCopy};
use crate::models::pipeline::{
    builtin_tokenizer_dir, Backbone, Family, Pipeline, RandomSpec, TextStack, UnetSpec,
};
use crate::models::sd3_text::{ClipBranch, Sd3TextEncoders, T5Branch, T5Tokenizer};
use crate::models::t5::{LoadedT5, T5Config, T5EncoderModel};
use crate::models::tokenizer::{ClipTokenizer, Pad};
use crate::models::unet::{LoadedUNet, UNetConfig};
use crate::models::vae::{AutoencoderKL, LoadedVae, VaeConfig};
use crate::schedule::{Plan, SamplerKind, ScheduleConfig};
use crate::train::adt::Trainer;
use crate::train::config::{Config, GradPath};
use crate::train::fast::{gpu, FastDenoiser, FastOptions};
use crate::train::path::rollout;

/// Model sizes to benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BenchConfig {
    /// The tiny random pipeline (32 px images), tiny DINOv2 at 56 px.
    Tiny,
    /// SD1.5 sizes: UNet 859.5M, VAE 83.7M, CLIP ViT-L/14 text, DINOv2 ViT-S/14 at
    /// 224 px; 512 px images.
    Sd15,
    /// The tiny random SD3 pipeline (`Sd3Config::tiny`, 16-channel VAE with
    /// downscale 2, tiny CLIP-L / CLIP-G / T5; 32 px images), tiny DINOv2 at 56 px.
    TinySd3,
    /// SD3-medium sizes: the MMDiT of `Sd3Config::medium` (24 joint blocks of width
    /// 1536: 2028.3M trainable parameters, plus the stored 192x192 position grid of
    /// 56.6M values, both counted in `params.unet`), SD3's 16-channel VAE (83.8M;
    /// scaling 1.5305, shift 0.0609), DINOv2 ViT-S/14 at 224 px; 1024 px images.
    /// Float32 master weights with AdamW take 16 bytes per trainable parameter
    /// (32.5 GB) before activations. The text encoders are a
    /// stand-in of negligible size with the real output widths
    /// ([`sd3_stand_in_text`]): conditioning [B, 154, 4096], pooled [B, 2048].
    Sd3Medium,
}

impl BenchConfig {
    /// Whether this is an SD3 (MMDiT, flow matching) configuration.
    pub fn is_sd3(self) -> bool {
        matches!(self, BenchConfig::TinySd3 | BenchConfig::Sd3Medium)
    }

    /// Default sampler steps: 50 DDIM steps, 28 flow Euler steps for SD3.
    pub fn default_steps(self) -> usize {
        if self.is_sd3() {
            28
        } else {
            50
        }
    }
}

impl std::str::FromStr for BenchConfig {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tiny" => Ok(BenchConfig::Tiny),
            "sd15" => Ok(BenchConfig::Sd15),
            "tiny-sd3" | "tiny_sd3" => Ok(BenchConfig::TinySd3),
            "sd3-medium" | "sd3_medium" => Ok(BenchConfig::Sd3Medium),
            _ => bail!("--config {s:?}: expected tiny, sd15, tiny-sd3 or sd3-medium"),
        }
    }
}

/// A speed lever.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Lever {
    /// bfloat16 copy of the UNet for the gradient-free trajectory (float32 master
    /// weights for the recomputed kept steps and the optimiser).
    Bf16,
    /// cuDNN benchmark mode (CUDA only).
    CudnnBenchmark,
    /// Channels-last convolution weights and latents in the trajectory UNet.
    ChannelsLast,
    /// CUDA-graph capture and replay of the guided UNet call (CUDA only).
    CudaGraph,
    /// TF32 tensor cores for the float32 matmuls and convolutions (CUDA only).
    Tf32,
    /// The whole workload under CUDA bfloat16 autocast, as the PyTorch reference
    /// runs (CUDA only).
    Autocast,
}

impl Lever {
    pub const ALL: [Lever; 6] = [
        Lever::Bf16,
        Lever::CudnnBenchmark,
        Lever::ChannelsLast,
        Lever::CudaGraph,
        Lever::Tf32,
        Lever::Autocast,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Lever::Bf16 => "bf16",
            Lever::CudnnBenchmark => "cudnn_benchmark",
            Lever::ChannelsLast => "channels_last",
            Lever::CudaGraph => "cuda_graph",
            Lever::Tf32 => "tf32",
            Lever::Autocast => "autocast",
        }
    }

    fn needs_cuda(self) -> bool {
        matches!(
            self,
            Lever::CudnnBenchmark | Lever::CudaGraph | Lever::Tf32 | Lever::Autocast
        )
    }

    /// Parse a comma-separated list ("bf16,cudnn,channels-last,graph", "all", "none").
    pub fn parse_list(s: &str) -> Result<Vec<Lever>> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let l = match part.replace('-', "_").as_str() {
                "all" => {
                    out.extend(Lever::ALL);
                    continue;
                }
                "none" => continue,
                "bf16" => Lever::Bf16,
                "cudnn" | "cudnn_benchmark" => Lever::CudnnBenchmark,
                "channels_last" => Lever::ChannelsLast,
                "graph" | "cuda_graph" => Lever::CudaGraph,
                "tf32" => Lever::Tf32,
                "autocast" | "amp" => Lever::Autocast,
                other => bail!(
                    "--levers: unknown lever {other:?} (bf16, cudnn_benchmark, channels_last, cuda_graph, tf32, autocast, all, none)"
                ),
            };
            out.push(l);
        }
        out.sort();
        out.dedup();
        Ok(out)
    }
}

/// A workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    UnetCfgStep,
    Sample,
    AdtGd,
    AdtD,
    AdtH5,
    /// Peak memory against K, decomposed and in one graph.
    Memory,
}

impl Workload {
    pub const ALL: [Workload; 6] = [
        Workload::UnetCfgStep,
        Workload::Sample,
        Workload::AdtGd,
        Workload::AdtD,
        Workload::AdtH5,
        Workload::Memory,
    ];

    /// Parse a comma-separated list ("unet,sample,gd,d,h5,memory" or "all").
    pub fn parse_list(s: &str) -> Result<Vec<Workload>> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "all" => out.extend(Workload::ALL),
                "unet" | "unet_cfg_step" | "step" | "transformer_cfg_step" => {
                    out.push(Workload::UnetCfgStep)
                }
                "sample" | "sample_ddim" | "sample_flow" => out.push(Workload::Sample),
                "gd" | "adt_gd_s0" => out.push(Workload::AdtGd),
                "d" | "adt_d_s0" => out.push(Workload::AdtD),
                "h5" | "adt_h5_mean" => out.push(Workload::AdtH5),
                "memory" | "k" => out.push(Workload::Memory),
                other => bail!(
                    "--workloads: unknown workload {other:?} (unet or step, sample, gd, d, h5, memory, all)"
                ),
            }
        }
        out.dedup();
        Ok(out)
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub config: BenchConfig,
    /// "cpu", "cuda" or "cuda:N".
    pub device: String,
    /// Timed runs per measurement (after the warm-up).
    pub iters: usize,
    /// Untimed warm-up runs per measurement.
    pub warmup: usize,
    /// K values of the memory sweep.
    pub ks: Vec<usize>,
    /// Levers measured one by one (each against the baseline).
    pub levers: Vec<Lever>,
    /// Lever combinations measured in addition (default: all of `levers` together,
    /// when there are at least two).
    pub combos: Vec<Vec<Lever>>,
    pub workloads: Vec<Workload>,
    /// Sampler steps of the trajectory and of sampling (50 for the real workloads).
    pub steps: usize,
    /// Write the JSON report here (rewritten after every measurement, so that a run
    /// cut short keeps what it measured).
    pub json: Option<PathBuf>,
    pub seed: u64,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            config: BenchConfig::Tiny,
            device: "cpu".into(),
            iters: 3,
            warmup: 1,
            ks: vec![1, 3, 8],
            levers: Lever::ALL.to_vec(),
            combos: Vec::new(),
            workloads: Workload::ALL.to_vec(),
            steps: 50,
            json: None,
            seed: 0,
        }
    }
}

impl BenchOptions {
    /// Parse "1,3,8".
    pub fn parse_ks(s: &str) -> Result<Vec<usize>> {
        s.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                p.parse::<usize>()
                    .with_context(|| format!("--k: {p:?} is not a non-negative integer"))
            })
            .collect()
    }

    fn device(&self) -> Result<Device> {
        parse_device(&self.device)
    }
}

/// The `adt bench` command line (flatten into the CLI's subcommand enum:
/// `Bench(adt::bench::BenchArgs)`, then call [`cli`]).
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Model sizes: tiny, sd15, tiny-sd3 or sd3-medium.
    #[arg(long, default_value = "tiny")]
    pub config: String,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Write the report as JSON (rewritten after every measurement).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Timed runs per measurement.
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// Untimed warm-up runs per measurement.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// K values of the peak-memory sweep.
    #[arg(long, default_value = "1,3,8")]
    pub k: String,
    /// Levers measured one by one: bf16, cudnn_benchmark, channels_last, cuda_graph,
    /// all or none (comma-separated).
    #[arg(long, default_value = "all")]
    pub levers: String,
    /// A lever combination to measure as well, e.g. bf16+cuda_graph (repeatable;
    /// default: every lever that can run on the device, together).
    #[arg(long)]
    pub combo: Vec<String>,
    /// Workloads: unet (or step: the guided backbone call), sample, gd, d, h5,
    /// memory or all (comma-separated).
    #[arg(long, default_value = "all")]
    pub workloads: String,
    /// Sampler steps of the trajectory and of sampling (default: 50 DDIM steps, or 28
    /// flow Euler steps for the SD3 configurations).
    #[arg(long)]
    pub steps: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl BenchArgs {
    pub fn to_options(&self) -> Result<BenchOptions> {
        let combos = self
            .combo
            .iter()
            .map(|c| Lever::parse_list(&c.replace('+', ",")))
            .collect::<Result<Vec<_>>>()?;
        let config: BenchConfig = self.config.parse()?;
        Ok(BenchOptions {
            config,
            device: self.device.clone(),
            iters: self.iters,
            warmup: self.warmup,
            ks: BenchOptions::parse_ks(&self.k)?,
            levers: Lever::parse_list(&self.levers)?,
            combos,
            workloads: Workload::parse_list(&self.workloads)?,
            steps: self.steps.unwrap_or(config.default_steps()),
            json: self.json.clone(),
            seed: self.seed,
        })
    }
}

/// `adt bench`: run, print the table, write the JSON (when asked).
pub fn cli(args: &BenchArgs) -> Result<()> {
    let report = run_bench(&args.to_options()?)?;
    print!("{report}");
    Ok(())
}

/// "cpu", "cuda" or "cuda:N".
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        d if d.starts_with("cuda:") => {
            Ok(Device::Cuda(d[5..].parse().with_context(|| {
                format!("--device {d:?}: bad CUDA index")
            })?))
        }
        d => bail!("--device {d:?}: expected cpu, cuda or cuda:N"),
    }
}

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub workload: String,
    /// "baseline", a lever name, or levers joined with '+'.
    pub variant: String,
    pub levers: Vec<Lever>,
    pub iters: usize,
    pub mean_ms: Option<f64>,
    /// Median of the timed runs (robust to a run slowed by another process).
    pub median_ms: Option<f64>,
    pub min_ms: Option<f64>,
    pub max_ms: Option<f64>,
    /// median_ms of this variant over median_ms of the workload's baseline.
    pub ratio: Option<f64>,
    /// Peak bytes during the timed runs (see `BenchReport::peak_memory`).
    pub peak_bytes: Option<i64>,
    /// Why the measurement did not run, or how it failed.
    pub note: Option<String>,
}

impl Row {
    fn peak_gib(&self) -> Option<f64> {
        self.peak_bytes.map(|b| b as f64 / (1u64 << 30) as f64)
    }
}

/// Parameter counts of the benchmarked models.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Params {
    pub unet: i64,
    pub vae: i64,
    pub text: i64,
    pub features: i64,
    pub heads: i64,
}

/// The benchmark result.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub config: BenchConfig,
    pub device: String,
    pub cuda_available: bool,
    pub cudnn_available: bool,
    /// Whether the binary has the CUDA shim (peak GPU memory, CUDA graphs).
    pub cuda_shim: bool,
    /// What `peak_bytes` measures: "cuda_max_allocated", "cpu_max_rss" or
    /// "cpu_max_rss_unreset" (VmHWM could not be reset: process-wide peak).
    pub peak_memory: String,
    pub resolution: i64,
    pub steps: usize,
    pub cfg: f64,
    pub warmup: usize,
    pub params: Params,
    pub rows: Vec<Row>,
}

impl BenchReport {
    /// The baseline row and the best lever row of every workload (in order).
    pub fn summary(&self) -> Vec<(&Row, Option<&Row>)> {
        let mut out: Vec<(&Row, Option<&Row>)> = Vec::new();
        for r in &self.rows {
            if r.variant == "baseline" {
                let best = self
                    .rows
                    .iter()
                    .filter(|o| o.workload == r.workload && o.variant != "baseline")
                    .filter(|o| o.median_ms.is_some())
                    .min_by(|a, b| a.median_ms.partial_cmp(&b.median_ms).unwrap());
                out.push((r, best));
            }
        }
        out
    }

    pub fn row(&self, workload: &str, variant: &str) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.workload == workload && r.variant == variant)
    }
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    v.map(|x| format!("{x:.prec$}"))
        .unwrap_or_else(|| "-".into())
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "adt bench: config {:?}, device {} (cuda {}, cudnn {}, shim {}), {} px, {} steps, cfg {}, peak = {}",
            self.config,
            self.device,
            self.cuda_available,
            self.cudnn_available,
            self.cuda_shim,
            self.resolution,
            self.steps,
            self.cfg,
            self.peak_memory
        )?;
        let p = &self.params;
        let m = |n: i64| n as f64 / 1e6;
        writeln!(
            f,
            "params (M): unet {:.1}, vae {:.1}, text {:.1}, features {:.1}, heads {:.2}",
            m(p.unet),
            m(p.vae),
            m(p.text),
            m(p.features),
            m(p.heads)
        )?;
        writeln!(
            f,
            "{:<26} {:<44} {:>5} {:>10} {:>10} {:>10} {:>7} {:>9}  note",
            "workload", "variant", "iters", "median ms", "mean ms", "min ms", "ratio", "peak GiB"
        )?;
        for r in &self.rows {
            writeln!(
                f,
                "{:<26} {:<44} {:>5} {:>10} {:>10} {:>10} {:>7} {:>9}  {}",
                r.workload,
                r.variant,
                r.iters,
                fmt_opt(r.median_ms, 2),
                fmt_opt(r.mean_ms, 2),
                fmt_opt(r.min_ms, 2),
                fmt_opt(r.ratio, 3),
                fmt_opt(r.peak_gib(), 3),
                r.note.as_deref().unwrap_or("")
            )?;
        }
        writeln!(f)?;
        writeln!(f, "summary (best variant per workload; median times)")?;
        writeln!(
            f,
            "{:<26} {:>11} {:>11} {:>7} {:>9} {:>9}  best variant",
            "workload", "baseline ms", "levers ms", "ratio", "base GiB", "lever GiB"
        )?;
        for (b, best) in self.summary() {
            writeln!(
                f,
                "{:<26} {:>11} {:>11} {:>7} {:>9} {:>9}  {}",
                b.workload,
                fmt_opt(b.median_ms, 2),
                fmt_opt(best.and_then(|r| r.median_ms), 2),
                fmt_opt(best.and_then(|r| r.ratio), 3),
                fmt_opt(b.peak_gib(), 3),
                fmt_opt(best.and_then(|r| r.peak_gib()), 3),
                best.map(|r| r.variant.as_str()).unwrap_or("-")
            )?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Models of the real sizes.

fn sd15_vae_config() -> Result<VaeConfig> {
    VaeConfig::from_value(&serde_json::json!({
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": 0.18215
    }))
}

/// A randomly initialised SD1.5 pipeline (UNet trainable, the rest frozen).
pub fn sd15_random_pipeline(device: Device, seed: i64) -> Result<Pipeline> {
    let spec = RandomSpec::Unet(UnetSpec {
        unet: UNetConfig::sd15(),
        clip: ClipTextConfig::sd15(),
        vae: Some(sd15_vae_config()?),
        schedule: ScheduleConfig::sd15(),
    });
    Pipeline::random(&spec, device, seed)
}

/// SD3's VAE (`vae/config.json` of the SD3 pipelines): 16 latent channels, no
/// quant convs, scaling 1.5305 and shift 0.0609.
fn sd3_vae_config() -> Result<VaeConfig> {
    VaeConfig::from_value(&serde_json::json!({
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 16,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": 1024,
        "scaling_factor": 1.5305,
        "shift_factor": 0.0609,
        "use_quant_conv": false,
        "use_post_quant_conv": false
    }))
}

/// A stand-in for SD3's frozen text encoders with the real output widths: tiny
/// random CLIP-L / CLIP-G towers (widths 8 and 16) projecting to the real pooled
/// widths 768 + 1280 = 2048, and a one-layer random T5 of the real width 4096 over
/// 77 tokens. The conditioning has the shapes of the real stack with 77 T5 tokens
/// (context [B, 77 + 77, 4096], pooled [B, 2048]) at a negligible cost: the bench
/// measures the transformer, the VAE and the discriminator, not the text encoders.
pub fn sd3_stand_in_text(device: Device, seed: i64) -> Result<Sd3TextEncoders> {
    tch::manual_seed(seed);
    let clip = |hidden: i64, proj: i64, act: &str, pad: Pad| -> Result<ClipBranch> {
        let config = ClipTextConfig {
            hidden_size: hidden,
            intermediate_size: 2 * hidden,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            hidden_act: act.to_string(),
            projection_dim: proj,
            ..ClipTextConfig::tiny()
        };
        let mut vs = nn::VarStore::new(device);
        let model = ClipTextModel::new(&vs.root(), &config, true)?;
        vs.freeze();
        Ok(ClipBranch {
            tokenizer: ClipTokenizer::from_dir(&builtin_tokenizer_dir())?,
            pad,
            encoder: LoadedClipText { vs, model, config },
        })
    };
    let clip_l = clip(8, 768, "quick_gelu", Pad::Eos)?;
    let clip_g = clip(16, 1280, "gelu", Pad::Zero)?;
    let t5_cfg = T5Config {
        d_model: 4096,
        d_kv: 8,
        d_ff: 16,
        num_layers: 1,
        num_heads: 2,
        ..T5Config::tiny()
    };
    let mut vs = nn::VarStore::new(device);
    let model = T5EncoderModel::new(&vs.root(), &t5_cfg)?;
    vs.freeze();
    let t5 = T5Branch {
        tokenizer: T5Tokenizer::tiny(77)?,
        encoder: LoadedT5 {
            vs,
            model,
            config: t5_cfg,
        },
    };
    Ok(Sd3TextEncoders {
        clip_l,
        clip_g,
        t5: Some(t5),
        context_dim: 4096,
        max_sequence_length: 77,
        device,
    })
}

/// A randomly initialised SD3-medium pipeline (transformer trainable, the rest
/// frozen) with the stand-in text encoders of [`sd3_stand_in_text`].
pub fn sd3_medium_random_pipeline(device: Device, seed: i64) -> Result<Pipeline> {
    tch::manual_seed(seed);
    let transformer = LoadedSd3Transformer::from_config(&Sd3Config::medium(), device, Kind::Float)?;
    let vcfg = sd3_vae_config()?;
    let mut vs = nn::VarStore::new(device);
    let model = AutoencoderKL::new(&vs.root(), &vcfg)?;
    vs.freeze();
    let vae = LoadedVae {
        vs,
        model,
        config: vcfg,
    };
    let text = sd3_stand_in_text(device, seed.wrapping_add(1))?;
    Ok(Pipeline {
        dir: None,
        family: Family::Sd3,
        backbone: Backbone::Sd3(Box::new(transformer)),
        vae: Some(vae),
        text: TextStack::Sd3(Box::new(text)),
        schedule: ScheduleConfig::sd3(),
        device,
        backbone_file_kind: Kind::Float,
    })
}

/// Randomly initialised, frozen DINOv2 features at `resolution` px tapping the
/// default blocks 2, 5, 8, 11 (clamped to the last layer of a smaller model) with
/// the patch embedding (the default levels), and
/// the parameter count.
fn dino_features(
    device: Device,
    config: Dinov2Config,
    resolution: i64,
) -> Result<(Box<dyn FeatureNetwork>, i64)> {
    let mut vs = nn::VarStore::new(device);
    let model = Dinov2Model::new(&vs.root(), &config)?;
    vs.freeze();
    let n = count(&vs);
    let last = config.num_hidden_layers as usize - 1;
    let blocks: Vec<usize> = DinoFeatures::DEFAULT_BLOCKS
        .iter()
        .map(|&b| b.min(last))
        .collect();
    let f = DinoFeatures::new(model, Some(vs), resolution, &blocks, Default::default())?;
    Ok((Box::new(f), n))
}

fn count(vs: &nn::VarStore) -> i64 {
    vs.variables().values().map(|t| t.numel() as i64).sum()
}

// ---------------------------------------------------------------------------
// Clocks and memory.

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Peak-memory probe for one device.
struct Memory {
    device: Device,
    kind: String,
}

impl Memory {
    fn new(device: Device) -> Memory {
        let kind = match device {
            Device::Cuda(_) if gpu::available() => "cuda_max_allocated".to_string(),
            Device::Cuda(_) => "unavailable (binary without the CUDA shim)".to_string(),
            _ if Self::reset_rss() => "cpu_max_rss".to_string(),
            _ => "cpu_max_rss_unreset".to_string(),
        };
        Memory { device, kind }
    }

    /// Reset the peak RSS (Linux >= 4.0: writing 5 to clear_refs resets VmHWM).
    fn reset_rss() -> bool {
        std::fs::write("/proc/self/clear_refs", "5").is_ok()
    }

    fn reset(&self) {
        match self.device {
            Device::Cuda(i) => {
                if gpu::available() {
                    if let Err(e) = gpu::reset_peak(i) {
                        tracing::warn!("{e:#}");
                    }
                }
            }
            _ => {
                Self::reset_rss();
            }
        }
    }

    fn peak(&self) -> Option<i64> {
        match self.device {
            Device::Cuda(i) => gpu::memory(i).ok().map(|m| m.peak_allocated),
            _ => vm_hwm(),
        }
    }

    fn release(&self) {
        if self.device.is_cuda() && gpu::available() {
            let _ = gpu::empty_cache();
        }
    }
}

/// The process's peak resident set in bytes (Linux).
pub fn vm_hwm() -> Option<i64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: i64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else {
        "panic".into()
    }
}

fn variant_name(levers: &[Lever]) -> String {
    if levers.is_empty() {
        "baseline".into()
    } else {
        levers
            .iter()
            .map(|l| l.name())
            .collect::<Vec<_>>()
            .join("+")
    }
}

/// The runner: options, probes, collected rows.
struct Bench {
    opts: BenchOptions,
    device: Device,
    mem: Memory,
    report: BenchReport,
}

impl Bench {
    /// The variants to measure: baseline, each lever, the combinations.
    fn variants(&self) -> Vec<Vec<Lever>> {
        let mut v: Vec<Vec<Lever>> = vec![vec![]];
        for l in &self.opts.levers {
            v.push(vec![*l]);
        }
        if self.opts.combos.is_empty() {
            // All levers that can run here, together.
            let here: Vec<Lever> = self
                .opts
                .levers
                .iter()
                .copied()
                .filter(|l| self.unsupported(&[*l]).is_none())
                .collect();
            if here.len() > 1 {
                v.push(here);
            }
        } else {
            for c in &self.opts.combos {
                let mut c = c.clone();
                c.sort();
                c.dedup();
                if !v.contains(&c) {
                    v.push(c);
                }
            }
        }
        v
    }

    /// Why a lever set cannot run here (None if it can).
    fn unsupported(&self, levers: &[Lever]) -> Option<String> {
        for l in levers {
            if self.opts.config.is_sd3() && matches!(l, Lever::ChannelsLast | Lever::CudaGraph) {
                return Some(format!(
                    "unsupported: {} belongs to the UNet fast path, not to the SD3 transformer",
                    l.name()
                ));
            }
            if l.needs_cuda() && !self.device.is_cuda() {
                return Some(format!("skipped: {} needs a CUDA device", l.name()));
            }
            if matches!(l, Lever::CudaGraph | Lever::Tf32 | Lever::Autocast) && !gpu::available() {
                return Some(format!(
                    "skipped: {} needs a binary built with --features cuda",
                    l.name()
                ));
            }
        }
        None
    }

    /// Time `f` (warm-up, then `iters` synchronised runs) and record a row.
    fn measure(
        &mut self,
        workload: &str,
        levers: &[Lever],
        mut f: impl FnMut() -> Result<()>,
    ) -> Result<()> {
        let variant = variant_name(levers);
        let mut row = Row {
            workload: workload.to_string(),
            variant: variant.clone(),
            levers: levers.to_vec(),
            iters: 0,
            mean_ms: None,
            median_ms: None,
            min_ms: None,
            max_ms: None,
            ratio: None,
            peak_bytes: None,
            note: None,
        };
        let device = self.device;
        let (warmup, iters) = (self.opts.warmup, self.opts.iters.max(1));
        let mem = &self.mem;
        if self.device.is_cuda() {
            tch::Cuda::cudnn_set_benchmark(levers.contains(&Lever::CudnnBenchmark));
            if gpu::available() {
                gpu::set_tf32(levers.contains(&Lever::Tf32))?;
            }
        }
        let amp = levers.contains(&Lever::Autocast);
        let mut f = move || -> Result<()> {
            if amp {
                gpu::autocast_bf16(&mut f)?
            } else {
                f()
            }
        };
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| -> Result<Vec<f64>> {
            for _ in 0..warmup {
                f()?;
            }
            sync(device);
            mem.reset();
            let mut times = Vec::with_capacity(iters);
            for _ in 0..iters {
                sync(device);
                let t0 = Instant::now();
                f()?;
                sync(device);
                times.push(t0.elapsed().as_secs_f64() * 1e3);
            }
            Ok(times)
        }));
        match outcome {
            Ok(Ok(times)) => {
                row.iters = times.len();
                row.mean_ms = Some(times.iter().sum::<f64>() / times.len() as f64);
                let mut sorted = times.clone();
                sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
                let n = sorted.len();
                row.median_ms = Some(if n % 2 == 1 {
                    sorted[n / 2]
                } else {
                    0.5 * (sorted[n / 2 - 1] + sorted[n / 2])
                });
                row.min_ms = times.iter().cloned().reduce(f64::min);
                row.max_ms = times.iter().cloned().reduce(f64::max);
                row.peak_bytes = self.mem.peak();
            }
            Ok(Err(e)) => row.note = Some(format!("failed: {e:#}")),
            Err(p) => row.note = Some(format!("failed (panic): {}", panic_message(p))),
        }
        if self.device.is_cuda() {
            tch::Cuda::cudnn_set_benchmark(false);
            if gpu::available() {
                gpu::set_tf32(false)?;
            }
        }
        let base = if levers.is_empty() {
            row.median_ms
        } else {
            self.report
                .row(workload, "baseline")
                .and_then(|b| b.median_ms)
        };
        if let Some(base) = base {
            row.ratio = row.median_ms.map(|m| m / base);
        }
        tracing::info!(
            "bench {workload} {variant}: mean {} ms, peak {:?} B {}",
            fmt_opt(row.mean_ms, 2),
            row.peak_bytes,
            row.note.as_deref().unwrap_or("")
        );
        self.push(row)
    }

    fn skip(&mut self, workload: &str, levers: &[Lever], note: String) -> Result<()> {
        self.push(Row {
            workload: workload.to_string(),
            variant: variant_name(levers),
            levers: levers.to_vec(),
            iters: 0,
            mean_ms: None,
            median_ms: None,
            min_ms: None,
            max_ms: None,
            ratio: None,
            peak_bytes: None,
            note: Some(note),
        })
    }

    fn push(&mut self, row: Row) -> Result<()> {
        self.report.rows.push(row);
        self.mem.release();
        if let Some(path) = &self.opts.json {
            let text = serde_json::to_string_pretty(&self.report)?;
            crate::weights::atomic_write(path, text.as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }
}

/// The trajectory denoisers of a lever set: the UNet's fast copy ([`fast_for`]) or,
/// for SD3 with `bf16`, a bfloat16 copy of the transformer; None for the float32
/// eager backbone.
fn trajectory_for(
    pipe: &Pipeline,
    levers: &[Lever],
) -> Result<(Option<FastDenoiser>, Option<Sd3TrajectoryCopy>)> {
    match &pipe.backbone {
        Backbone::Unet(u) => Ok((fast_for(u, levers)?, None)),
        Backbone::Sd3(t) if levers.contains(&Lever::Bf16) => {
            Ok((None, Some(Sd3TrajectoryCopy::new(t, Kind::BFloat16)?)))
        }
        Backbone::Sd3(_) => Ok((None, None)),
    }
}

/// The trajectory denoiser of a lever set: None for the float32 eager UNet.
fn fast_for(tr_unet: &LoadedUNet, levers: &[Lever]) -> Result<Option<FastDenoiser>> {
    let bf16 = levers.contains(&Lever::Bf16);
    let cl = levers.contains(&Lever::ChannelsLast);
    let graph = levers.contains(&Lever::CudaGraph);
    if !(bf16 || cl || graph) {
        return Ok(None);
    }
    let opts = FastOptions {
        kind: if bf16 { Kind::BFloat16 } else { Kind::Float },
        channels_last: cl,
        cuda_graph: graph,
    };
    Ok(Some(FastDenoiser::new(&tr_unet.vs, &tr_unet.config, opts)?))
}

/// Run the benchmark.
pub fn run_bench(opts: &BenchOptions) -> Result<BenchReport> {
    let device = opts.device()?;
    if device.is_cuda() && !tch::Cuda::is_available() {
        bail!(
            "--device {}: CUDA is not available to this binary (a GPU build needs \
             `ADT_CUDA_LINK=1 cargo build --release --features cuda`, and libtorch's CUDA libraries at run time)",
            opts.device
        );
    }
    if let Device::Cuda(i) = device {
        let n = tch::Cuda::device_count();
        if i as i64 >= n {
            bail!("--device {}: only {n} CUDA device(s)", opts.device);
        }
    }
    if opts.steps < 2 {
        bail!("--steps must be at least 2");
    }
    for k in &opts.ks {
        if *k == 0 {
            bail!("--k: K must be at least 1");
        }
    }
    let tiny = matches!(opts.config, BenchConfig::Tiny | BenchConfig::TinySd3);
    let sd3 = opts.config.is_sd3();
    let (resolution, disc_res) = match opts.config {
        BenchConfig::Tiny | BenchConfig::TinySd3 => (32, 56),
        BenchConfig::Sd15 => (512, 224),
        BenchConfig::Sd3Medium => (1024, 224),
    };
    let sampler = if sd3 {
        SamplerKind::FlowEuler
    } else {
        SamplerKind::Ddim
    };
    let mut cfg = Config::default();
    cfg.model.path = "tiny-random".into();
    cfg.train.device = opts.device.clone();
    cfg.train.batch_size = 1;
    cfg.train.resolution = Some(resolution);
    cfg.train.seed = opts.seed;
    cfg.train.k = 3;
    cfg.train.h = 1;
    cfg.train.warmup_g = 0;
    cfg.train.warmup_d = 0;
    cfg.sampler.kind = sampler;
    cfg.sampler.steps = opts.steps;
    cfg.sampler.cfg = 7.0;
    cfg.disc.resolution = disc_res;

    let seed = opts.seed as i64;
    let pipe = match opts.config {
        BenchConfig::Tiny => Pipeline::tiny_random(device, seed)?,
        BenchConfig::Sd15 => sd15_random_pipeline(device, seed)?,
        BenchConfig::TinySd3 => Pipeline::tiny_random_sd3(device, seed)?,
        BenchConfig::Sd3Medium => sd3_medium_random_pipeline(device, seed)?,
    };
    let (features, n_features) = dino_features(
        device,
        if tiny {
            Dinov2Config::tiny()
        } else {
            Dinov2Config::vit_s14()
        },
        disc_res,
    )?;
    let mut params = Params {
        unet: count(pipe.backbone_vs()),
        vae: pipe.vae.as_ref().map(|v| count(&v.vs)).unwrap_or(0),
        text: pipe.text.varstores().into_iter().map(count).sum(),
        features: n_features,
        heads: 0,
    };
    let mut tr = Trainer::with_parts(cfg.clone(), pipe, Some(features))?;
    if let Some(d) = &tr.disc {
        params.heads = count(&d.vs);
    }

    let mem = Memory::new(device);
    let report = BenchReport {
        config: opts.config,
        device: format!("{device:?}"),
        cuda_available: tch::Cuda::is_available(),
        cudnn_available: tch::Cuda::cudnn_is_available(),
        cuda_shim: gpu::available(),
        peak_memory: mem.kind.clone(),
        resolution,
        steps: cfg.sampler.steps,
        cfg: cfg.sampler.cfg,
        warmup: opts.warmup,
        params,
        rows: Vec::new(),
    };
    let mut b = Bench {
        opts: opts.clone(),
        device,
        mem,
        report,
    };

    // Inputs: random images and one caption.
    tch::manual_seed(opts.seed as i64);
    let images = (Tensor::rand([1, 3, resolution, resolution], (Kind::Float, device)) * 2.0 - 1.0)
        .clamp(-1.0, 1.0);
    let captions = vec!["a photograph of an astronaut riding a horse".to_string()];
    let time_ids = Tensor::zeros([1, 6], (Kind::Float, device));
    let (cond, _) = tr.pipe.encode_text(&captions, None)?;
    let (uncond, _) = tr.pipe.encode_text(&[String::new()], None)?;
    let lat = resolution / tr.pipe.vae_scale();
    let c_in = tr.pipe.latent_channels();
    let x_t = Tensor::randn([1, c_in, lat, lat], (Kind::Float, device));
    let plan = Plan::new(&tr.pipe.schedule, sampler, opts.steps)?;
    let variants = b.variants();

    for &w in &opts.workloads.clone() {
        match w {
            Workload::UnetCfgStep | Workload::Sample => {
                let name = match (w == Workload::UnetCfgStep, sd3) {
                    (true, false) => "unet_cfg_step".to_string(),
                    (true, true) => "transformer_cfg_step".to_string(),
                    (false, false) => format!("sample_ddim{}", opts.steps),
                    (false, true) => format!("sample_flow{}", opts.steps),
                };
                let name = name.as_str();
                for levers in &variants {
                    if let Some(why) = b.unsupported(levers) {
                        b.skip(name, levers, why)?;
                        continue;
                    }
                    let (fast, fast_sd3) = trajectory_for(&tr.pipe, levers)?;
                    let den: &dyn Denoiser = match (&fast, &fast_sd3) {
                        (Some(f), _) => f,
                        (None, Some(f)) => f,
                        (None, None) => tr.pipe.denoiser(),
                    };
                    let g = Guidance::new(&uncond, &cond, cfg.sampler.cfg);
                    let pipe = &tr.pipe;
                    let plan = &plan;
                    let x_t = &x_t;
                    b.measure(name, levers, || {
                        tch::no_grad(|| -> Result<()> {
                            if w == Workload::UnetCfgStep {
                                let _ = guided_output(den, x_t, plan.timesteps[0], &g)?;
                            } else {
                                let r = rollout(den, plan, 0, x_t, &[], &g, GradPath::Adt)?;
                                let _ = pipe.to_images(&r.final_x)?;
                            }
                            Ok(())
                        })
                    })?;
                }
            }
            Workload::AdtGd | Workload::AdtD | Workload::AdtH5 => {
                let name = match w {
                    Workload::AdtGd => "adt_gd_s0",
                    Workload::AdtD => "adt_d_s0",
                    _ => "adt_h5_mean",
                };
                for levers in &variants {
                    if let Some(why) = b.unsupported(levers) {
                        b.skip(name, levers, why)?;
                        continue;
                    }
                    (tr.fast, tr.fast_sd3) = trajectory_for(&tr.pipe, levers)?;
                    tr.cfg.train.k = 3;
                    tr.cfg.train.decompose = true;
                    let per_call = match w {
                        Workload::AdtGd => {
                            tr.cfg.train.h = 1;
                            tr.force_start = Some(0);
                            1
                        }
                        Workload::AdtD => {
                            tr.cfg.train.h = usize::MAX;
                            tr.force_start = Some(0);
                            1
                        }
                        _ => {
                            tr.cfg.train.h = 5;
                            tr.force_start = None;
                            5
                        }
                    };
                    if per_call == 5 {
                        // Align to an H-cycle (four D-only iterations, then G+D),
                        // untimed.
                        while tr.step % 5 != 0 {
                            tr.iteration_on(&images, &captions, &time_ids)?;
                        }
                    }
                    // Phase times of the last timed G+D (or D-only) iteration.
                    tr.cfg.train.profile_phases = true;
                    let mut phases = None;
                    let trr = &mut tr;
                    let (images, captions, time_ids) = (&images, &captions, &time_ids);
                    b.measure(name, levers, || {
                        for _ in 0..per_call {
                            let log = trr.iteration_on(images, captions, time_ids)?;
                            if log.phases_ms.is_some() {
                                phases = log.phases_ms;
                            }
                        }
                        Ok(())
                    })?;
                    tr.cfg.train.profile_phases = false;
                    if let (Some(ph), Some(r)) = (phases, b.report.rows.last_mut()) {
                        if r.median_ms.is_some() {
                            let text = ph
                                .iter()
                                .map(|(k, v)| format!("{k} {v:.0}"))
                                .collect::<Vec<_>>()
                                .join(", ");
                            r.note = Some(format!("last iteration, ms: {text}"));
                        }
                    }
                    if per_call == 5 {
                        // Per iteration.
                        if let Some(r) = b.report.rows.last_mut() {
                            for v in [
                                &mut r.mean_ms,
                                &mut r.median_ms,
                                &mut r.min_ms,
                                &mut r.max_ms,
                            ] {
                                *v = v.map(|x| x / 5.0);
                            }
                            r.note = Some(match r.note.take() {
                                Some(n) => format!("per iteration, H = 5 cycle; {n}"),
                                None => "per iteration, H = 5 cycle".into(),
                            });
                        }
                        let base = b.report.row(name, "baseline").and_then(|r| r.median_ms);
                        if let (Some(r), Some(base)) = (b.report.rows.last_mut(), base) {
                            r.ratio = r.median_ms.map(|m| m / base);
                        }
                    }
                    tr.fast = None;
                    tr.fast_sd3 = None;
                }
            }
            Workload::Memory => {
                tr.fast = None;
                tr.fast_sd3 = None;
                tr.force_start = Some(0);
                tr.cfg.train.h = 1;
                for &k in &opts.ks {
                    for decompose in [true, false] {
                        let name = if decompose {
                            format!("adt_gd_s0_k{k}")
                        } else {
                            format!("adt_gd_s0_k{k}_onegraph")
                        };
                        tr.cfg.train.k = k;
                        tr.cfg.train.decompose = decompose;
                        let trr = &mut tr;
                        let (images, captions, time_ids) = (&images, &captions, &time_ids);
                        b.measure(&name, &[], || {
                            trr.iteration_on(images, captions, time_ids).map(|_| ())
                        })?;
                    }
                }
                tr.cfg.train.k = 3;
                tr.cfg.train.decompose = true;
            }
        }
    }
    // The H = 5 timing leaves the step counter mid-cycle for nobody: fine.
    Ok(b.report)
}
