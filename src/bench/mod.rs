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
//!   (peak memory against K);
//! * `kept_step_grad` / `vae_decode_grad` (and `_ckpt`): one kept-step
//!   recomputation (guided backbone call with gradient, then its backward) and the
//!   VAE decode of the final latents with its backward, without and with gradient
//!   checkpointing: the rows' notes give the memory the run added on top of what was
//!   in use before it (the activations), which is what checkpointing saves.
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

//!
//! Layout: this file holds the options, the command line and the set-up shared by the
//! workloads; [`sampling`] (guided backbone step, sampling), [`adt`] (ADT iterations,
//! peak memory against K), [`account`] (the memory account of the training state,
//! computed), [`runner`] (timing, peak-memory probes), [`models`] (the real-size
//! random models) and [`table`] (rows, report, printed table).

mod account;
mod adt;
mod ckpt;
mod models;
mod options;
mod runner;
mod sampling;
mod table;

pub use account::{
    account, memory_account, model_sizes, AccountRow, AccountTable, MemoryTarget, ModelSizes,
    TargetModel, TARGETS,
};
pub use models::{sd15_random_pipeline, sd3_medium_random_pipeline, sd3_stand_in_text};
pub(crate) use options::Inputs;
pub use options::{parse_device, BenchConfig, BenchOptions, Lever, Workload};
pub use runner::vm_hwm;
pub use table::{BenchReport, Params, Row};

use anyhow::{bail, Result};
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

use crate::models::dinov2::Dinov2Config;
use crate::models::pipeline::Pipeline;
use crate::schedule::{Plan, SamplerKind};
use crate::train::adt::Trainer;
use crate::train::config::Config;
use crate::train::fast::gpu;
use models::{count, dino_features};
use runner::{Bench, Memory};

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
    /// Timed runs per measurement (after the warm-up); the table reports their median.
    #[arg(long, default_value_t = 5)]
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
    /// Image resolution (default: the configuration's, 512 px for SD1.5, 1024 px for
    /// SD3-medium, 32 px for the tiny ones); a multiple of 8 times the VAE scale.
    #[arg(long)]
    pub resolution: Option<i64>,
    /// Print the memory account of the training state for the SD1.5 / SDXL / SD3-medium
    /// targets (computed from the real models' parameter counts, not measured) and exit.
    #[arg(long)]
    pub account: bool,
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
            resolution: self.resolution,
        })
    }
}

/// `adt bench`: run, print the table, write the JSON (when asked).
pub fn cli(args: &BenchArgs) -> Result<()> {
    if args.account {
        print!("{}", AccountTable(&memory_account()?));
        return Ok(());
    }
    let report = run_bench(&args.to_options()?)?;
    print!("{report}");
    Ok(())
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
    let resolution = match opts.resolution {
        Some(r) if r < 16 || r % 16 != 0 => {
            bail!("--resolution {r}: must be a positive multiple of 16")
        }
        Some(r) => r,
        None => resolution,
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
    let tr = Trainer::with_parts(cfg.clone(), pipe, Some(features))?;
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
    let mut cx = Inputs {
        tr,
        images,
        captions,
        time_ids,
        cond,
        uncond,
        x_t,
        plan,
        sd3,
        guidance: cfg.sampler.cfg,
        steps: opts.steps,
    };
    for &w in &opts.workloads.clone() {
        match w {
            Workload::UnetCfgStep | Workload::Sample => {
                sampling::run(&mut b, &mut cx, w, &variants)?
            }
            Workload::AdtGd | Workload::AdtD | Workload::AdtH5 => {
                adt::run_iterations(&mut b, &mut cx, w, &variants)?
            }
            Workload::Memory => adt::run_memory(&mut b, &mut cx, &opts.ks)?,
            Workload::Checkpointing => ckpt::run(&mut b, &mut cx)?,
        }
    }
    Ok(b.report)
}
