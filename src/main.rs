//! The `adt` command line: a thin layer over the library.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "adt",
    version,
    about = "Adversarial Diffusion Tuning for Stable Diffusion models"
)]
struct Cli {
    /// CPU threads for tensor operations (libtorch intra-op threads). Default:
    /// OMP_NUM_THREADS when set, else the cores that are idle at start-up (libtorch's
    /// one per physical core less the other processes running then, at least one).
    #[arg(long, global = true, value_name = "N")]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune a model with ADT (or the plain FT baseline).
    Train {
        /// TOML configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a configuration value, e.g. --set train.lr_g=1e-5 (repeatable).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Print the effective configuration (with defaults) and exit.
        #[arg(long)]
        print_config: bool,
        /// Continue from the latest checkpoint of the output folder, or from DIR.
        #[arg(long, value_name = "DIR", num_args = 0..=1)]
        resume: Option<Option<PathBuf>>,
        /// Stop after this many iterations of this invocation (checkpoints are kept).
        #[arg(long)]
        max_iterations: Option<usize>,
        /// Start a new run in an output folder that holds checkpoints (or resume from
        /// a checkpoint older than others there): same-named checkpoints are replaced.
        #[arg(long)]
        overwrite: bool,
        /// Data-parallel training on this machine: start N ranks (processes) and
        /// wait for them (torchrun and srun launch ranks without it).
        #[arg(long, value_name = "N")]
        nproc: Option<usize>,
    },
    /// Generate images from prompts with a pipeline folder.
    Sample {
        /// Diffusers pipeline folder.
        #[arg(long)]
        model: PathBuf,
        /// One prompt (repeatable).
        #[arg(long)]
        prompt: Vec<String>,
        /// A text file with one prompt per line.
        #[arg(long)]
        prompts: Option<PathBuf>,
        /// ddim, dpmpp or flow.
        #[arg(long, default_value = "ddim")]
        sampler: String,
        /// Step counts (comma-separated for a sweep).
        #[arg(long, default_value = "50", value_delimiter = ',')]
        steps: Vec<usize>,
        /// Guidance scales (comma-separated for a sweep).
        #[arg(long, default_value = "7", value_delimiter = ',')]
        cfg: Vec<f64>,
        #[arg(long, default_value_t = 0)]
        seed: i64,
        /// Image size in pixels (default: the UNet's sample_size times the VAE factor).
        #[arg(long)]
        resolution: Option<i64>,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// A LoRA file (diffusers / PEFT layout, e.g. pytorch_lora_weights.safetensors or
        /// its folder) merged into the model, with an optional scale: FILE or FILE:SCALE
        /// (repeatable; the scales multiply the file's alpha / rank).
        #[arg(long, value_name = "FILE[:SCALE]")]
        lora: Vec<String>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Merge LoRA files into a pipeline and write the merged diffusers folder.
    MergeLora {
        /// Diffusers pipeline folder (the base model).
        #[arg(long)]
        model: PathBuf,
        /// FILE or FILE:SCALE (repeatable).
        #[arg(long, value_name = "FILE[:SCALE]", required = true)]
        lora: Vec<String>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Distribution distance between generated and reference images (FD, KID, colour; CLIP score with --clip).
    Eval {
        /// Folder of generated images.
        #[arg(long)]
        generated: PathBuf,
        /// Folder (or imagefolder dataset) of reference images.
        #[arg(long)]
        reference: PathBuf,
        /// efficientnet-lite1 (default, offline), efficientnet-lite0, efficientnet-lite2, dinov2 or inception-v3 (FID; weights from scripts/convert_inception.py).
        #[arg(long, default_value = "efficientnet-lite1")]
        features: String,
        /// Weights folder of the feature network (required for dinov2).
        #[arg(long)]
        features_path: Option<PathBuf>,
        /// Use at most this many images of each set.
        #[arg(long)]
        max_images: Option<usize>,
        #[arg(long)]
        json: Option<PathBuf>,
        /// A transformers CLIPModel folder: also report the CLIP score of the generated
        /// images against their prompts (prompts.jsonl or metadata.jsonl).
        #[arg(long)]
        clip: Option<PathBuf>,
    },
    /// The toy reproduction of the paper's claim: FT vs ADT from a Twemoji base towards Noto emoji.
    Demo {
        /// Seeds (comma-separated); one FT and one ADT run each.
        #[arg(long, default_value = "0", value_delimiter = ',')]
        seeds: Vec<u64>,
        /// Iterations per run.
        #[arg(long, default_value_t = adt::demo::DemoOptions::default().iterations)]
        iterations: usize,
        /// Held-out captions / images used in the evaluation (all of them: 478).
        #[arg(long, default_value_t = adt::demo::DemoOptions::default().eval_images)]
        eval_images: usize,
        #[arg(long, default_value = "runs/demo")]
        out: PathBuf,
        /// cpu or cuda.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Only evaluate runs made elsewhere (scripts/gpu_demo.sh output folder).
        #[arg(long)]
        from_samples: Option<PathBuf>,
        /// Draw the evaluation samples with the float32 UNet (default: bfloat16 UNet
        /// weights, about twice as fast on a CPU).
        #[arg(long)]
        sample_fp32: bool,
    },
    /// The paper's ablation (Table 3) at the demo's scale: ADT, StyleGAN-T discriminator,
    /// DRTune path, lambda 0, K 1 / 3, four feature levels and FT, from the same base on the
    /// same seeds; FD / KID in EfficientNet-Lite1 and Lite2.
    Ablate {
        /// Seeds (comma-separated); one run per variant each.
        #[arg(long, default_value = "0", value_delimiter = ',')]
        seeds: Vec<u64>,
        /// Iterations per run (the demo's default).
        #[arg(long, default_value_t = adt::demo::DemoOptions::default().iterations)]
        iterations: usize,
        /// Held-out captions / images used in the evaluation.
        #[arg(long, default_value_t = adt::demo::DemoOptions::default().eval_images)]
        eval_images: usize,
        #[arg(long, default_value = "runs/ablation")]
        out: PathBuf,
        /// cpu or cuda.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Variants (comma-separated; adt always runs): adt, stylegan-t, drtune, lambda0,
        /// k1, k3, levels4, ft, and the optional colour-drift ones no-color-aug, paired-color, lr-half, h4, lambda2,
        /// cfg1. Default: all but the optional.
        #[arg(long, value_delimiter = ',')]
        variants: Option<Vec<String>>,
        /// Override a configuration value in every run, FT included (repeatable), e.g.
        /// --set train.lr_g=2e-5 to test a colour-drift hypothesis.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Switch DiffAugment's colour op off in every run (colour-drift measurement).
        #[arg(long)]
        no_color_aug: bool,
        /// Draw the evaluation samples with the float32 UNet (default: bfloat16 UNet
        /// weights, about twice as fast on a CPU).
        #[arg(long)]
        sample_fp32: bool,
        /// Base pipeline folder.
        #[arg(long, default_value = "assets/demo-base")]
        base: PathBuf,
        /// Demo data root (noto/train, noto/heldout).
        #[arg(long, default_value = ".cache/demo/data")]
        data: PathBuf,
        #[arg(long, default_value = "examples/demo-adt.toml")]
        adt_config: PathBuf,
        #[arg(long, default_value = "examples/demo-ft.toml")]
        ft_config: PathBuf,
        /// DDIM steps and image size of the evaluation samples.
        #[arg(long, default_value_t = 10)]
        sample_steps: usize,
        #[arg(long, default_value_t = 32)]
        sample_size: i64,
    },
    /// Build the demo's emoji datasets from the emoji-datasource npm tarballs in the cache
    /// folder (scripts/setup_demo_data.sh fetches them): <cache>/data (32x32) and
    /// <cache>/data-64px (64x64), {twemoji,noto}/{train,heldout}.
    PrepareEmoji {
        #[arg(long, default_value = ".cache/demo")]
        cache: PathBuf,
        /// npm package style and dataset name (repeatable; default: twitter=twemoji
        /// google=noto). Only images that every style has are kept.
        #[arg(long = "style", value_name = "STYLE=NAME")]
        styles: Vec<String>,
        /// Rebuild even when the outputs are up to date.
        #[arg(long)]
        force: bool,
    },
    /// Time the UNet step, sampling and ADT iterations (tiny or real SD1.5 sizes) and measure peak memory.
    Bench(adt::bench::BenchArgs),
    /// Describe a diffusers pipeline folder, a component folder or a .safetensors file.
    Inspect { path: PathBuf },
    /// Write a pipeline folder with randomly initialised weights (the start of pretraining).
    InitPipeline {
        /// tiny, tiny-sd3 or demo.
        #[arg(long)]
        preset: String,
        #[arg(long, default_value_t = 0)]
        seed: i64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Report on a dataset: counts, resolutions, caption lengths, bad samples.
    InspectData {
        path: PathBuf,
        /// Fail on the first bad sample.
        #[arg(long)]
        strict: bool,
        /// Follow symbolic links that stay inside the dataset folder (data.follow_symlinks).
        #[arg(long)]
        follow_symlinks: bool,
    },
    /// Run one component on named inputs and write named outputs (parity checks).
    Forward {
        /// unet, vae-encode, vae-decode, clip-text, clip-text-proj, dinov2, dinov2-grad, efficientnet, inception, sd3-transformer, t5
        #[arg(long)]
        component: String,
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        inputs: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the 77 token ids an SD pipeline feeds its text encoder, one JSON array per text.
    Tokenize {
        #[arg(long)]
        tokenizer: PathBuf,
        /// eos (SD1.x, SDXL tokenizer), zero (SD2, SDXL tokenizer_2) or config.
        #[arg(long)]
        pad: Option<String>,
        texts: Vec<String>,
    },
}

/// Tensor threads when the user chose none: the cores not taken by other runnable
/// processes at start-up (the running-task count of /proc/loadavg, less this process),
/// at least one. The instantaneous count, not the one-minute average: right after a
/// build the average still says "busy" for a minute while the cores are free
/// (measured on two cores: the demo's ADT iterations take 28 s with one thread against
/// 16 s with two). Beside a busy process fewer threads finish sooner than threads
/// that wait for a core (the smoke test: 3 s with one thread each, 9 to 24 s with two).
fn threads_for(cores: usize, others_running: usize) -> usize {
    cores.saturating_sub(others_running).clamp(1, cores.max(1))
}

/// Other runnable tasks now: the 4th field of /proc/loadavg is "running/total",
/// counting this process's own thread.
fn others_running() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    let running: usize = s
        .split_whitespace()
        .nth(3)?
        .split('/')
        .next()?
        .parse()
        .ok()?;
    Some(running.saturating_sub(1))
}

/// `FILE` or `FILE:SCALE` (scale 1 by default).
fn parse_lora_args(args: &[String]) -> Result<Vec<(PathBuf, f64)>> {
    args.iter()
        .map(|a| match a.rsplit_once(':') {
            Some((f, s)) if !f.is_empty() && s.parse::<f64>().is_ok() => {
                Ok((PathBuf::from(f), s.parse::<f64>()?))
            }
            _ if a.is_empty() => bail!("--lora: empty file name"),
            _ => Ok((PathBuf::from(a), 1.0)),
        })
        .collect()
}

/// OpenMP threads that wait for work spin for a long time by default (libgomp), which
/// starves every other process on the machine: two `adt` processes on two cores ran the
/// tiny smoke test 25 to 50 times slower than one. Fully passive waiting (threads sleep
/// at once) shares well but costs a single process dearly on small operations
/// (measured on two cores: the smoke test 8.4 s passive against 3.1 s, the demo's ADT
/// iterations 21 s against 16 s). A short spin (`GOMP_SPINCOUNT`, about tens of
/// microseconds) keeps the single-process speed, and the thread count (see
/// [`threads_for`]) keeps processes from fighting over cores. libgomp reads these
/// variables once, when it is loaded with the program, before `main`: so when the user
/// has chosen neither `OMP_WAIT_POLICY` nor `GOMP_SPINCOUNT`, the program sets the spin
/// count and replaces itself with a fresh copy of itself (`exec`), which loads libgomp
/// again.
const SPIN_COUNT: &str = "10000";

fn ensure_short_omp_spin() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("OMP_WAIT_POLICY").is_some() || std::env::var_os("GOMP_SPINCOUNT").is_some()
    {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let err = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .env("GOMP_SPINCOUNT", SPIN_COUNT)
        .exec();
    // exec only returns on failure: carry on with libgomp's default.
    eprintln!("warning: could not restart with GOMP_SPINCOUNT={SPIN_COUNT} ({err}); OpenMP threads will spin while waiting");
}

fn main() -> Result<()> {
    ensure_short_omp_spin();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        tch::set_num_threads(n as i32);
    } else if std::env::var_os("OMP_NUM_THREADS").is_none() {
        let cores = tch::get_num_threads().max(1) as usize;
        if let Some(others) = others_running() {
            tch::set_num_threads(threads_for(cores, others) as i32);
        }
    }
    tracing::debug!(
        "OMP_WAIT_POLICY={}, GOMP_SPINCOUNT={}, {} tensor threads",
        std::env::var("OMP_WAIT_POLICY").unwrap_or_default(),
        std::env::var("GOMP_SPINCOUNT").unwrap_or_default(),
        tch::get_num_threads()
    );
    // Large tensors are allocated and freed every iteration; glibc's default of
    // returning every block above 128 KiB to the kernel turns that into page faults
    // (measured: half of the evaluation's time was system time). Keep freed memory.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
    match cli.command {
        Command::Train {
            config,
            set,
            print_config,
            resume,
            max_iterations,
            overwrite,
            nproc,
        } => {
            let cfg = adt::train::config::Config::load(config.as_deref(), &set)?;
            if print_config {
                print!("{}", cfg.to_toml()?);
                println!(
                    "\n# Not set above, chosen when the model is loaded: train.lr_g and train.lr_d \
                     (5e-6 for SD 1.x / 2.x, 1e-6 for SDXL and SD3), train.resolution (the \
                     model's native one), disc.blocks (DINOv2 [2, 5, 8, 11], EfficientNet \
                     [1, 2, 4, 6]), disc.channels (the width of the features)."
                );
                return Ok(());
            }
            if let Some(n) = nproc {
                if adt::dist::Launch::from_env()?.is_some() {
                    anyhow::bail!(
                        "--nproc: this process is already one rank of a launched job (RANK/WORLD_SIZE or SLURM variables are set)"
                    );
                }
                // The same command line without --nproc, for each rank.
                let mut args: Vec<String> = Vec::new();
                let mut it = std::env::args().skip(1);
                while let Some(a) = it.next() {
                    if a == "--nproc" {
                        it.next();
                    } else if !a.starts_with("--nproc=") {
                        args.push(a);
                    }
                }
                // A rank that fails brings the others down within the collective
                // timeout; the launcher waits that long before stopping them.
                let grace = std::time::Duration::from_secs_f64(cfg.train.dist_timeout_s + 30.0);
                adt::dist::spawn_local(n, &args, grace)?;
                return Ok(());
            }
            let opts = adt::train::run::RunOptions {
                resume,
                max_iterations,
                quiet: false,
                overwrite,
            };
            let tr = adt::train::run::run(cfg, &opts)?;
            eprintln!(
                "finished {} iterations; logs in {}",
                tr.step,
                tr.out_dir.display()
            );
        }
        Command::Sample {
            model,
            prompt,
            prompts,
            sampler,
            steps,
            cfg,
            seed,
            resolution,
            batch_size,
            lora,
            out,
        } => {
            let mut all = prompt;
            if let Some(f) = prompts {
                let text = std::fs::read_to_string(&f)
                    .with_context(|| format!("reading {}", f.display()))?;
                all.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(String::from),
                );
            }
            if all.is_empty() {
                bail!("no prompts: give --prompt TEXT or --prompts FILE");
            }
            if let Some(g) = cfg.iter().find(|g| !g.is_finite()) {
                bail!("--cfg {g}: the guidance scale must be a finite number");
            }
            let kind: adt::schedule::SamplerKind = sampler.parse()?;
            let device = if tch::Cuda::is_available() {
                tch::Device::Cuda(0)
            } else {
                tch::Device::Cpu
            };
            let mut pipe = adt::models::pipeline::Pipeline::load(
                &model,
                device,
                tch::Kind::Float,
                tch::Kind::Float,
            )?;
            pipe.merge_lora(&parse_lora_args(&lora)?)?;
            let res = resolution.unwrap_or_else(|| pipe.default_resolution());
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            for &n in &steps {
                let plan = adt::schedule::Plan::new(&pipe.schedule, kind, n)?;
                for &g in &cfg {
                    let tag = format!("{sampler}-{n}steps-cfg{g}");
                    let mut imgs = Vec::new();
                    for (ci, chunk) in all.chunks(batch_size.max(1)).enumerate() {
                        let x =
                            adt::sample::generate(&pipe, &plan, chunk, g, seed + ci as i64, res)
                                .with_context(|| {
                                    format!(
                                        "sampling model {} (cfg {g}, {n} steps)",
                                        model.display()
                                    )
                                })?;
                        imgs.push(x);
                    }
                    let x = tch::Tensor::cat(&imgs, 0);
                    adt::sample::save_images(&x, &out.join(&tag), &all)?;
                    let grid = out.join(format!("grid-{tag}.png"));
                    adt::sample::save_grid(&x, &grid, 4)?;
                    eprintln!("wrote {} images and {}", all.len(), grid.display());
                }
            }
        }
        Command::Eval {
            generated,
            reference,
            features,
            features_path,
            max_images,
            json,
            clip,
        } => {
            let mut o = adt::eval::metrics::EvalOptions::new(generated, reference);
            o.features = features.parse()?;
            o.features_path = features_path;
            o.max_images = max_images;
            o.clip = clip;
            let r = adt::eval::metrics::evaluate(&o)?;
            print!("{r}");
            for w in &r.warnings {
                tracing::warn!("{w}");
            }
            if let Some(j) = json {
                r.save_json(&j)?;
            }
        }
        Command::Demo {
            seeds,
            iterations,
            eval_images,
            out,
            device,
            from_samples,
            sample_fp32,
        } => {
            let o = adt::demo::DemoOptions {
                seeds,
                iterations,
                eval_images,
                out,
                device,
                from_samples,
                sample_fp32,
                ..Default::default()
            };
            let r = adt::demo::run_demo(&o)?;
            print!("{}", r.markdown());
            eprintln!("report: {}", o.out.join("report.html").display());
        }
        Command::MergeLora { model, lora, out } => {
            let mut pipe = adt::models::pipeline::Pipeline::load(
                &model,
                tch::Device::Cpu,
                tch::Kind::Float,
                tch::Kind::Float,
            )?;
            pipe.merge_lora(&parse_lora_args(&lora)?)?;
            pipe.save(&out)?;
            eprintln!("wrote the merged pipeline to {}", out.display());
        }
        Command::Ablate {
            seeds,
            iterations,
            eval_images,
            out,
            device,
            variants,
            mut set,
            no_color_aug,
            sample_fp32,
            base,
            data,
            adt_config,
            ft_config,
            sample_steps,
            sample_size,
        } => {
            if no_color_aug {
                set.push("disc.diffaug=\"translation,cutout\"".into());
            }
            let o = adt::demo::ablation::AblationOptions {
                demo: adt::demo::DemoOptions {
                    seeds,
                    iterations,
                    eval_images,
                    out,
                    device,
                    base,
                    data,
                    adt_config,
                    ft_config,
                    sample_fp32,
                    ..Default::default()
                },
                variants,
                overrides: set,
                sample_steps,
                sample_size,
                ..Default::default()
            };
            let r = adt::demo::ablation::run_ablation(&o)?;
            print!("{}", r.markdown());
            eprintln!("report: {}", o.demo.out.join("report.html").display());
        }
        Command::PrepareEmoji {
            cache,
            styles,
            force,
        } => {
            let mut o = adt::demo_data::PrepareOptions::demo(cache);
            o.force = force;
            if !styles.is_empty() {
                o.styles = styles
                    .iter()
                    .map(|s| match s.split_once('=') {
                        Some((st, name)) if !st.is_empty() && !name.is_empty() => {
                            Ok((st.to_string(), name.to_string()))
                        }
                        _ => bail!("--style {s}: expected STYLE=NAME, e.g. twitter=twemoji"),
                    })
                    .collect::<Result<_>>()?;
            }
            let t0 = std::time::Instant::now();
            let r = adt::demo_data::prepare_emoji(&o)?;
            print!("{r}");
            if !r.up_to_date {
                println!("demo data: {:.1} s", t0.elapsed().as_secs_f64());
            }
        }
        Command::Bench(a) => adt::bench::cli(&a)?,
        Command::Inspect { path } => print!("{}", adt::inspect::inspect(&path)?),
        Command::InitPipeline { preset, seed, out } => {
            let spec = adt::models::pipeline::RandomSpec::by_name(&preset)?;
            let pipe = adt::models::pipeline::Pipeline::random(&spec, tch::Device::Cpu, seed)?;
            pipe.save(&out)?;
            eprintln!(
                "wrote a randomly initialised {preset} pipeline to {}",
                out.display()
            );
        }
        Command::InspectData {
            path,
            strict,
            follow_symlinks,
        } => {
            print!(
                "{}",
                adt::data::inspect_data_with(&path, strict, follow_symlinks)?
            )
        }
        Command::Forward {
            component,
            model,
            inputs,
            out,
        } => {
            let ins: HashMap<String, tch::Tensor> = adt::weights::read_safetensors(&inputs)?
                .into_iter()
                .collect();
            use adt::models::*;
            let outs = match component.as_str() {
                "unet" => unet::run_forward(&component, &model, &ins)?,
                "vae-encode" | "vae-decode" => vae::run_forward(&component, &model, &ins)?,
                "clip-text" | "clip-text-proj" => clip::run_forward(&component, &model, &ins)?,
                "dinov2" | "dinov2-grad" => dinov2::run_forward(&component, &model, &ins)?,
                "efficientnet" => efficientnet::run_forward(&component, &model, &ins)?,
                "inception" => inception::run_forward(&component, &model, &ins)?,
                "sd3-transformer" => mmdit::run_forward(&component, &model, &ins)?,
                "t5" => t5::run_forward(&component, &model, &ins)?,
                c => bail!(
                    "unknown component {c:?}: expected unet, vae-encode, vae-decode, clip-text, clip-text-proj, dinov2, dinov2-grad, efficientnet, inception, sd3-transformer, t5"
                ),
            };
            let mut named: Vec<(String, tch::Tensor)> = outs.into_iter().collect();
            named.sort_by(|a, b| a.0.cmp(&b.0));
            adt::weights::save_safetensors(&named, &out, None, None)?;
            for (k, t) in &named {
                eprintln!("{k}: {:?}", t.size());
            }
        }
        Command::Tokenize {
            tokenizer,
            pad,
            texts,
        } => {
            for ids in adt::models::tokenizer::run_tokenize(&tokenizer, pad.as_deref(), &texts)? {
                println!("{}", serde_json::to_string(&ids)?);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn threads_follow_the_idle_cores() {
        use super::threads_for;
        assert_eq!(threads_for(2, 0), 2);
        assert_eq!(threads_for(2, 1), 1);
        assert_eq!(threads_for(2, 5), 1);
        assert_eq!(threads_for(16, 4), 12);
        assert_eq!(threads_for(8, 0), 8);
    }
}
