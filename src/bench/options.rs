//! The benchmark's options: model sizes, speed levers, workloads, the device, and
//! the inputs every workload shares.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::PathBuf;
use tch::{Device, Tensor};

use crate::schedule::Plan;
use crate::train::adt::Trainer;

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

    pub(super) fn needs_cuda(self) -> bool {
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
    /// Gradient checkpointing: memory added and time of one kept-step recomputation
    /// (guided backbone call with gradient, backward) and of the VAE decode
    /// backward, with and without it.
    Checkpointing,
}

impl Workload {
    pub const ALL: [Workload; 7] = [
        Workload::UnetCfgStep,
        Workload::Sample,
        Workload::AdtGd,
        Workload::AdtD,
        Workload::AdtH5,
        Workload::Memory,
        Workload::Checkpointing,
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
                "ckpt" | "checkpointing" => out.push(Workload::Checkpointing),
                other => bail!(
                    "--workloads: unknown workload {other:?} (unet or step, sample, gd, d, h5, memory, ckpt, all)"
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
    /// Image resolution instead of the configuration's.
    pub resolution: Option<i64>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            config: BenchConfig::Tiny,
            device: "cpu".into(),
            iters: 5,
            warmup: 1,
            ks: vec![1, 3, 8],
            levers: Lever::ALL.to_vec(),
            combos: Vec::new(),
            workloads: Workload::ALL.to_vec(),
            steps: 50,
            json: None,
            seed: 0,
            resolution: None,
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

    pub(super) fn device(&self) -> Result<Device> {
        parse_device(&self.device)
    }
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

/// What the workloads share: the trainer (models, optimisers) and the inputs.
pub(crate) struct Inputs {
    pub tr: Trainer,
    /// One random image in [-1, 1] and its caption.
    pub images: Tensor,
    pub captions: Vec<String>,
    pub time_ids: Tensor,
    /// Text conditioning of the caption and of the empty prompt.
    pub cond: crate::models::denoiser::Cond,
    pub uncond: crate::models::denoiser::Cond,
    /// The starting latent of the trajectory.
    pub x_t: Tensor,
    pub plan: Plan,
    pub sd3: bool,
    /// Classifier-free guidance scale.
    pub guidance: f64,
    pub steps: usize,
}
