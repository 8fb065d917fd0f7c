//! `adt demo`: the paper's central comparison (Table 1) at toy scale on a CPU.
//!
//! A small SD-architecture model pretrained on Twemoji (the "base", committed under
//! `assets/demo-base`) is tuned towards Noto emoji with plain fine-tuning (FT) and
//! with ADT for the same number of iterations from the same base, for several seeds.
//! Each model then draws one image per held-out Noto caption, and the Frechet
//! distance to the held-out Noto images is measured in the features of a network
//! the discriminator did not use (discriminator: EfficientNet-Lite0; evaluation:
//! EfficientNet-Lite1). Lower is better.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::Device;

use crate::eval::metrics::{
    compare, load_image01, select_images, set_stats, EvalOptions, FeatureExtractor, FeatureSpace,
    SetStats,
};
use crate::models::pipeline::Pipeline;
use crate::progress::{human_seconds, Progress};
use crate::report::{line_plot_svg, md_table_to_html, png_data_uri, read_series, rows_grid};
use crate::schedule::{Plan, SamplerKind};
use crate::train::adt::Trainer;
use crate::train::config::Config;
use crate::train::run::{run, RunOptions};

/// Options of the demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub seeds: Vec<u64>,
    /// Training iterations of each FT / ADT run.
    pub iterations: usize,
    pub out: PathBuf,
    pub base: PathBuf,
    /// Demo data root (`{twemoji,noto}/{train,heldout}`).
    pub data: PathBuf,
    /// Held-out captions (and reference images) used in the evaluation.
    pub eval_images: usize,
    /// Config files of the two runs.
    pub ft_config: PathBuf,
    pub adt_config: PathBuf,
    /// "cpu" or "cuda".
    pub device: String,
    /// Evaluate existing runs instead of training: a folder with `samples/<run>/`
    /// image folders (`base`, `ft-seed<N>`, `adt-seed<N>`) and optionally
    /// `metrics/<run>.jsonl` (what `scripts/gpu_demo.sh` writes).
    pub from_samples: Option<PathBuf>,
    /// Draw the evaluation samples with the float32 UNet. By default the UNet that
    /// samples has bfloat16 weights (about twice as fast on a CPU; the noise, the
    /// sampler's arithmetic and the images stay float32).
    pub sample_fp32: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            seeds: vec![0],
            // Sized for two idle CPU cores: the whole default demo in about 6 minutes
            // (see the README).
            iterations: 80,
            out: PathBuf::from("runs/demo"),
            base: PathBuf::from("assets/demo-base"),
            data: PathBuf::from(".cache/demo/data"),
            eval_images: 256,
            ft_config: PathBuf::from("examples/demo-ft.toml"),
            adt_config: PathBuf::from("examples/demo-adt.toml"),
            device: "cpu".into(),
            from_samples: None,
            sample_fp32: false,
        }
    }
}

/// One evaluated model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelResult {
    pub name: String,
    pub seed: Option<u64>,
    pub fd: f64,
    pub kid: f64,
    pub histogram_l1: f64,
    pub mean_rgb: [f64; 3],
    pub train_seconds: f64,
    pub samples: String,
}

/// The whole demo result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DemoReport {
    pub iterations: usize,
    pub seeds: Vec<u64>,
    pub eval_images: usize,
    pub features: String,
    /// Reference points: held-out Twemoji vs held-out Noto (the style gap) and Noto
    /// training images vs held-out Noto (the floor at this sample size).
    pub style_gap_fd: f64,
    pub floor_fd: f64,
    pub models: Vec<ModelResult>,
    pub wall_seconds: f64,
    /// The same samples scored in a second feature space (EfficientNet-Lite2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub second_space: Option<spaces::SecondSpace>,
    /// Seconds before the first stage: input checks, loading, and the timing of a few
    /// units of each stage for the estimate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preparation_seconds: Option<f64>,
    /// Each stage with its estimate and the seconds it took.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<StageTime>,
}

/// One stage of a demo run: its estimate and what it took.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StageTime {
    pub stage: String,
    pub estimate_seconds: f64,
    pub seconds: f64,
}

fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let sd = if v.len() > 1 {
        (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    (m, sd)
}

impl DemoReport {
    /// FD mean and sample standard deviation over seeds for "ft" / "adt".
    pub fn summary(&self, name: &str) -> Option<(f64, f64, usize)> {
        let v: Vec<f64> = self
            .models
            .iter()
            .filter(|m| m.name == name)
            .map(|m| m.fd)
            .collect();
        if v.is_empty() {
            return None;
        }
        let (m, sd) = mean_sd(&v);
        Some((m, sd, v.len()))
    }

    /// A Markdown table of the results.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        s += &format!(
            "FD to {} held-out Noto images in {} features (lower is better); {} iterations per run.\n\n",
            self.eval_images, self.features, self.iterations
        );
        s += "| model | seed | FD | KID | colour hist. L1 | train s |\n|---|---|---|---|---|---|\n";
        for m in &self.models {
            s += &format!(
                "| {} | {} | {:.1} | {:.4} | {:.3} | {:.0} |\n",
                m.name,
                m.seed.map(|x| x.to_string()).unwrap_or_else(|| "-".into()),
                m.fd,
                m.kid,
                m.histogram_l1,
                m.train_seconds
            );
        }
        s += "\n| summary | FD mean | FD sd | runs |\n|---|---|---|---|\n";
        for name in ["base", "ft", "adt"] {
            if let Some((m, sd, n)) = self.summary(name) {
                s += &format!("| {name} | {m:.1} | {sd:.1} | {n} |\n");
            }
        }
        s += &format!(
            "\nReference points: held-out Twemoji vs held-out Noto (style gap) {:.1}; Noto training images vs held-out Noto (floor) {:.1}. Wall time {:.0} s.\n",
            self.style_gap_fd, self.floor_fd, self.wall_seconds
        );
        s += &self.second_space_markdown();
        s += &self.stages_markdown();
        s
    }

    /// Where the wall time went: the preparation and each stage, with its estimate.
    fn stages_markdown(&self) -> String {
        if self.stages.is_empty() {
            return String::new();
        }
        let mut s = String::from("\n| stage | seconds | estimate |\n|---|---|---|\n");
        if let Some(p) = self.preparation_seconds {
            s += &format!(
                "| preparation (checks, loading, timing for the estimate) | {p:.0} | - |\n"
            );
        }
        for t in &self.stages {
            s += &format!(
                "| {} | {:.0} | {:.0} |\n",
                t.stage, t.seconds, t.estimate_seconds
            );
        }
        s
    }
}

/// Captions of an imagefolder's metadata.jsonl, in file order.
fn captions(dir: &Path) -> Result<Vec<String>> {
    let p = dir.join("metadata.jsonl");
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)
                .with_context(|| format!("{}: bad line {l}", p.display()))?;
            Ok(v["text"].as_str().unwrap_or("").to_string())
        })
        .collect()
}

/// Captions sampled together by [`generate_set`].
const SAMPLE_CHUNK: usize = 64;
/// The demo sampler: DDIM steps and guidance scale.
const SAMPLE_STEPS: usize = 10;

/// Draw one image per caption with the demo sampler into `dir` (PNG files).
pub fn generate_set(pipe: &Pipeline, captions: &[String], dir: &Path, seed: i64) -> Result<()> {
    generate_set_with(pipe, captions, dir, seed, SAMPLE_STEPS, 32)
}

/// Load a model to draw evaluation samples with: the UNet in bfloat16 unless `fp32`
/// (the text encoder and, where there is one, the VAE stay float32).
pub fn sampling_pipeline(dir: &Path, device: Device, fp32: bool) -> Result<Pipeline> {
    let unet = if fp32 {
        tch::Kind::Float
    } else {
        tch::Kind::BFloat16
    };
    Pipeline::load(dir, device, unet, tch::Kind::Float)
        .with_context(|| format!("loading {} to sample", dir.display()))
}

struct Evaluator {
    extractor: FeatureExtractor,
    opts: EvalOptions,
    reference: SetStats,
}

impl Evaluator {
    fn stats(&self, dir: &Path) -> Result<SetStats> {
        let (files, n) = select_images(dir, self.opts.max_images, self.opts.seed)?;
        set_stats(dir, &files, n, &self.extractor, &self.opts)
    }

    /// Whether [`Evaluator::cached_stats`] of `dir` would read the cache, and how many
    /// images the set has.
    fn is_cached(&self, dir: &Path, cache: &Path) -> Result<(bool, usize)> {
        let (files, _, file, meta) = self.cache_paths(dir, cache)?;
        Ok((file.is_file() && meta.is_file(), files.len()))
    }

    /// The selected files of `dir` (and how many it has), and the cache files of
    /// their statistics.
    fn cache_paths(
        &self,
        dir: &Path,
        cache: &Path,
    ) -> Result<(Vec<PathBuf>, usize, PathBuf, PathBuf)> {
        use sha2::Digest;
        let (files, n) = select_images(dir, self.opts.max_images, self.opts.seed)?;
        let mut h = sha2::Sha256::new();
        h.update(format!(
            "{}|{}|{}",
            self.extractor.space().name(),
            self.extractor.resolution(),
            self.opts.histogram_bins
        ));
        for f in &files {
            let m = std::fs::metadata(f)?;
            let t = m
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos());
            h.update(format!("{}|{}|{:?}\n", f.display(), m.len(), t));
        }
        let key = format!("{:x}", h.finalize());
        let file = cache.join(format!("{}.safetensors", &key[..16]));
        let meta = cache.join(format!("{}.json", &key[..16]));
        Ok((files, n, file, meta))
    }

    /// Statistics of a fixed image set, cached under `cache` keyed by the file list
    /// (names, sizes, modification times) and the feature network.
    fn cached_stats(&self, dir: &Path, cache: &Path) -> Result<SetStats> {
        let (files, n, file, meta) = self.cache_paths(dir, cache)?;
        if file.is_file() && meta.is_file() {
            let t: std::collections::HashMap<String, tch::Tensor> =
                crate::weights::read_safetensors(&file)?
                    .into_iter()
                    .collect();
            let summary = serde_json::from_str(&std::fs::read_to_string(&meta)?)?;
            if let (Some(f), Some(hist)) = (t.get("features"), t.get("histogram")) {
                return Ok(SetStats {
                    summary,
                    features: f.shallow_clone(),
                    histogram: hist.shallow_clone(),
                });
            }
        }
        let s = set_stats(dir, &files, n, &self.extractor, &self.opts)?;
        std::fs::create_dir_all(cache)?;
        crate::weights::save_safetensors(
            &[
                ("features".into(), s.features.shallow_clone()),
                ("histogram".into(), s.histogram.shallow_clone()),
            ],
            &file,
            None,
            None,
        )?;
        crate::weights::atomic_write(&meta, serde_json::to_string(&s.summary)?.as_bytes())?;
        Ok(s)
    }
}

/// The configuration of one FT or ADT run of the demo.
fn run_config(
    o: &DemoOptions,
    cfg_path: &Path,
    seed: u64,
    iterations: usize,
    run_dir: &Path,
    extra: &[String],
) -> Result<Config> {
    let mut sets = vec![
        format!("model.path={:?}", o.base.display().to_string()),
        format!("train.seed={seed}"),
        format!("train.iterations={iterations}"),
        format!("output.dir={:?}", run_dir.display().to_string()),
        format!(
            "data.path={:?}",
            o.data.join("noto/train").display().to_string()
        ),
        format!("train.device={:?}", o.device),
    ];
    sets.extend(extra.iter().cloned());
    Config::load(Some(cfg_path), &sets)
}

/// Seconds per unit of work on this machine, measured by [`measure_rates`].
#[derive(Debug, Clone, Default)]
struct Rates {
    /// Loading the models and the data of one run.
    run_setup: f64,
    ft_iteration: f64,
    /// An ADT iteration, averaged over one cycle of H iterations (one G step).
    adt_iteration: f64,
    /// An ADT iteration without G step (`train.d_only_iterations` at the start).
    adt_d_only_iteration: f64,
    /// One image of [`generate_set`].
    sample_image: f64,
    /// Captions in the timed sampling step.
    sample_batch: usize,
    /// Reading one image and computing its features and colour statistics.
    feature_image: f64,
}

impl Rates {
    fn describe(&self) -> String {
        let mut s = String::from("adt demo: measured here: ");
        if self.ft_iteration > 0.0 {
            s += &format!(
                "FT {:.2} s/iteration, ADT {:.2} s/iteration over one cycle of H iterations (D steps and one G step; {:.2} s without the G step), each after a warm-up iteration, run setup {:.1} s, sampling {:.3} s/image (one DDIM step of {} captions, times {SAMPLE_STEPS}), ",
                self.ft_iteration, self.adt_iteration, self.adt_d_only_iteration, self.run_setup, self.sample_image, self.sample_batch
            );
        }
        s += &format!(
            "features {:.3} s/image (one batch, after a warm-up batch); the estimates below multiply these by the configured sizes",
            self.feature_image
        );
        s
    }
}

/// Time a few units of each kind of work the demo will do: feature
/// extraction on 32 held-out images; and, when `train`, the setup and a few
/// iterations of an FT and an ADT run (in a scratch folder, removed afterwards)
/// and one sampling step.
fn measure_rates(o: &DemoOptions, caps: &[String], ev: &Evaluator, train: bool) -> Result<Rates> {
    let mut r = Rates::default();
    let (files, _) = select_images(&o.data.join("noto/heldout"), Some(32), 0)?;
    // The same batch twice: the first call pays one-off costs (per batch shape).
    let read = || {
        files
            .iter()
            .map(|f| load_image01(f))
            .collect::<Result<Vec<_>>>()
    };
    let _ = ev.extractor.features(&read()?)?;
    let t = std::time::Instant::now();
    let _ = ev.extractor.features(&read()?)?;
    r.feature_image = t.elapsed().as_secs_f64() / files.len() as f64;
    if !train {
        return Ok(r);
    }
    let scratch = o.out.join("speed-check");
    for (name, cfg_path) in [("ft", &o.ft_config), ("adt", &o.adt_config)] {
        // Every iteration as in the run's steady state: D and (every H) G steps.
        let extra = ["train.d_only_iterations=0".to_string()];
        let cfg = run_config(o, cfg_path, 0, 100, &scratch.join(name), &extra)?;
        let cycle = if name == "adt" { cfg.train.h.max(2) } else { 2 };
        let t = std::time::Instant::now();
        let mut tr = Trainer::new(cfg).with_context(|| format!("speed check of the {name} run"))?;
        r.run_setup = r.run_setup.max(t.elapsed().as_secs_f64());
        // A warm-up iteration (one-off costs of the first passes).
        tr.iteration()?;
        let mut times = Vec::with_capacity(cycle);
        for _ in 0..cycle {
            let t = std::time::Instant::now();
            tr.iteration()?;
            times.push(t.elapsed().as_secs_f64());
        }
        let per = times.iter().sum::<f64>() / cycle as f64;
        if name == "ft" {
            r.ft_iteration = per;
            // The sampling pipeline as the evaluation loads it, after a warm-up call.
            let pipe = sampling_pipeline(&o.base, tr.pipe.device, o.sample_fp32)?;
            let plan = Plan::new(&pipe.schedule, SamplerKind::Ddim, 1)?;
            let m = caps.len().clamp(1, SAMPLE_CHUNK);
            let _ = crate::sample::generate(&pipe, &plan, &caps[..m], 2.0, 0, 32)?;
            let t = std::time::Instant::now();
            let _ = crate::sample::generate(&pipe, &plan, &caps[..m], 2.0, 0, 32)?;
            r.sample_image = t.elapsed().as_secs_f64() * SAMPLE_STEPS as f64 / m as f64;
            r.sample_batch = m;
        } else {
            r.adt_iteration = per;
            // The cheapest of the cycle: an iteration without a G step.
            r.adt_d_only_iteration = times.iter().copied().fold(f64::INFINITY, f64::min);
        }
    }
    std::fs::remove_dir_all(&scratch).with_context(|| format!("removing {}", scratch.display()))?;
    Ok(r)
}

/// The demo's stages with their estimated seconds; logs each start and end with the
/// time left (the remaining estimates scaled by how the finished stages compared
/// with theirs).
struct Stages {
    list: Vec<(String, f64)>,
    /// The finished stages.
    done: Vec<StageTime>,
    next: usize,
    started: std::time::Instant,
    stage_started: std::time::Instant,
    done_estimate: f64,
    done_actual: f64,
}

impl Stages {
    fn new(started: std::time::Instant) -> Stages {
        Stages {
            list: Vec::new(),
            done: Vec::new(),
            next: 0,
            started,
            stage_started: started,
            done_estimate: 0.0,
            done_actual: 0.0,
        }
    }

    fn add(&mut self, label: &str, seconds: f64) {
        self.list.push((label.to_string(), seconds));
    }

    fn total(&self) -> f64 {
        self.list.iter().map(|s| s.1).sum()
    }

    fn announce(&self) {
        tracing::info!(
            "adt demo: {} stages, about {} from here (estimate):",
            self.list.len(),
            human_seconds(self.total())
        );
        for (i, (label, s)) in self.list.iter().enumerate() {
            tracing::info!("  {}. {label}: about {}", i + 1, human_seconds(*s));
        }
    }

    fn left(&self) -> f64 {
        let rest: f64 = self.list[self.next.min(self.list.len())..]
            .iter()
            .map(|s| s.1)
            .sum();
        let ratio = if self.done_estimate > 1.0 {
            (self.done_actual / self.done_estimate).clamp(0.25, 4.0)
        } else {
            1.0
        };
        rest * ratio
    }

    fn begin(&mut self) {
        self.stage_started = std::time::Instant::now();
        if let Some((label, s)) = self.list.get(self.next) {
            tracing::info!(
                "[{}/{}] {label} (about {})",
                self.next + 1,
                self.list.len(),
                human_seconds(*s)
            );
        }
    }

    fn end(&mut self) {
        let took = self.stage_started.elapsed().as_secs_f64();
        if let Some((label, s)) = self.list.get(self.next) {
            self.done_estimate += s;
            self.done_actual += took;
            self.next += 1;
            self.done.push(StageTime {
                stage: label.clone(),
                estimate_seconds: *s,
                seconds: took,
            });
            tracing::info!(
                "[{}/{}] {label}: done in {}; {} elapsed, about {} left",
                self.next,
                self.list.len(),
                human_seconds(took),
                human_seconds(self.started.elapsed().as_secs_f64()),
                human_seconds(self.left())
            );
        }
    }
}

/// Checks what a demo or ablation run reads before any work starts: the named subsets
/// of the demo data and the base model; returns the device of `--device`.
fn check_inputs(o: &DemoOptions, subsets: &[&str]) -> Result<Device> {
    for sub in subsets {
        if !o.data.join(sub).join("metadata.jsonl").is_file() {
            bail!(
                "demo data missing: {} (run scripts/setup_demo_data.sh, or scripts/demo.sh which does everything)",
                o.data.join(sub).display()
            );
        }
    }
    if !o.base.join("model_index.json").is_file() {
        bail!(
            "demo base model missing: {} (it is committed in the repository; to make it again see examples/demo-pretrain.toml)",
            o.base.display()
        );
    }
    match o.device.as_str() {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        d => bail!("--device {d:?}: expected cpu or cuda"),
    }
}

/// Run the demo end to end.
pub fn run_demo(o: &DemoOptions) -> Result<DemoReport> {
    let started = std::time::Instant::now();
    let device = check_inputs(o, &["twemoji/heldout", "noto/train", "noto/heldout"])?;
    std::fs::create_dir_all(&o.out)?;
    let mut opts = EvalOptions::new(o.out.join("unused"), o.data.join("noto/heldout"));
    opts.features = FeatureSpace::EfficientNetLite1;
    opts.max_images = Some(o.eval_images);
    opts.device = device;
    opts.kid_subset_size = 100;
    opts.kid_subsets = 50;
    let extractor = FeatureExtractor::load(opts.features, None, None, false, device)
        .context("loading EfficientNet-Lite1 (run scripts/setup_efficientnet.sh)")?;
    let cache = o.data.join("eval-cache");
    let placeholder = SetStats {
        summary: crate::eval::metrics::SetSummary {
            path: String::new(),
            count: 0,
            available: 0,
            sizes: vec![],
            mean_rgb: [0.0; 3],
        },
        features: tch::Tensor::zeros([1], (tch::Kind::Float, Device::Cpu)),
        histogram: tch::Tensor::zeros([1], (tch::Kind::Float, Device::Cpu)),
    };
    let mut ev = Evaluator {
        extractor,
        opts,
        reference: placeholder,
    };
    let mut caps = captions(&o.data.join("noto/heldout"))?;
    caps.truncate(o.eval_images);
    let ref_dirs = ["noto/heldout", "twemoji/heldout", "noto/train"].map(|d| o.data.join(d));
    let (mut ref_images, mut cached_sets) = (0, 0);
    for d in &ref_dirs {
        let (cached, n) = ev.is_cached(d, &cache)?;
        if cached {
            cached_sets += 1;
        } else {
            ref_images += n;
        }
    }
    let train_runs = if o.from_samples.is_some() {
        0
    } else {
        o.seeds.len()
    };
    tracing::info!(
        "adt demo: {}; every model draws one image per held-out caption ({}, DDIM {SAMPLE_STEPS} steps), scored against as many held-out Noto images in EfficientNet-Lite1 features; reference statistics: {ref_images} images to compute ({} cached sets)",
        if train_runs == 0 {
            format!("evaluating the samples in {}", o.from_samples.as_ref().unwrap().display())
        } else {
            let seeds: Vec<String> = o.seeds.iter().map(|s| s.to_string()).collect();
            format!(
                "the base model, then FT and ADT from it ({} {}), {} iterations each",
                if seeds.len() == 1 { "seed" } else { "seeds" },
                seeds.join(", "),
                o.iterations
            )
        },
        caps.len(),
        cached_sets,
    );
    tracing::info!(
        "adt demo: timing a few units of each stage on this machine for an estimate of the time..."
    );
    let rates = measure_rates(o, &caps, &ev, train_runs > 0)?;
    let preparation = started.elapsed().as_secs_f64();
    let mut stages = Stages::new(started);
    stages.add(
        "reference statistics",
        ref_images as f64 * rates.feature_image,
    );
    let per_model = caps.len() as f64 * (rates.sample_image + rates.feature_image);
    if train_runs == 0 {
        stages.add(
            "evaluate the samples",
            (1 + 2 * o.seeds.len()) as f64 * caps.len() as f64 * rates.feature_image,
        );
    } else {
        stages.add("base: sample and evaluate", per_model);
        for &seed in &o.seeds {
            for (name, cfg_path) in [("ft", &o.ft_config), ("adt", &o.adt_config)] {
                let train_s = if name == "ft" {
                    o.iterations as f64 * rates.ft_iteration
                } else {
                    // D-only iterations first, then the D/G cycle.
                    let dir = o.out.join(format!("{name}-seed{seed}"));
                    let cfg = run_config(o, cfg_path, seed, o.iterations, &dir, &[])?;
                    let d_only = cfg.train.d_only_iterations.min(o.iterations);
                    d_only as f64 * rates.adt_d_only_iteration
                        + (o.iterations - d_only) as f64 * rates.adt_iteration
                };
                stages.add(
                    &format!(
                        "{} seed {seed}: train {} iterations",
                        name.to_uppercase(),
                        o.iterations
                    ),
                    rates.run_setup + train_s,
                );
                stages.add(
                    &format!("{} seed {seed}: sample and evaluate", name.to_uppercase()),
                    per_model,
                );
            }
        }
    }
    // The same samples (and the reference) in EfficientNet-Lite2: 260 px and width 1.1,
    // counted as one Lite1 image each (measured: 37 s for the four sets of 256 images
    // of a one-seed run whose Lite1 rate was 0.042 s/image, i.e. 43 s by this count).
    stages.add(
        "score every model in EfficientNet-Lite2",
        rates.feature_image * ((2 + 2 * o.seeds.len()) * caps.len()) as f64,
    );
    tracing::info!("{}", rates.describe());
    stages.announce();

    stages.begin();
    ev.reference = ev.cached_stats(&ref_dirs[0], &cache)?;
    let fd_of = |stats: &SetStats| compare(stats, &ev.reference, &ev.extractor, &ev.opts);
    let gap = fd_of(&ev.cached_stats(&ref_dirs[1], &cache)?)?.fd;
    let floor = fd_of(&ev.cached_stats(&ref_dirs[2], &cache)?)?.fd;
    stages.end();
    tracing::info!("reference points: style gap FD {gap:.1}, floor FD {floor:.1}");

    let mut models = Vec::new();
    let eval_model =
        |name: &str, seed: Option<u64>, dir: &Path, train_s: f64| -> Result<ModelResult> {
            let pipe = sampling_pipeline(dir, device, o.sample_fp32)?;
            let samples = o.out.join("samples").join(match seed {
                Some(s) => format!("{name}-seed{s}"),
                None => name.to_string(),
            });
            generate_set(&pipe, &caps, &samples, 1234)?;
            let r = fd_of(&ev.stats(&samples)?)?;
            let tag = seed.map(|s| format!(" seed {s}")).unwrap_or_default();
            tracing::info!("{name}{tag}: FD {:.1} KID {:.4}", r.fd, r.kid);
            Ok(ModelResult {
                name: name.into(),
                seed,
                fd: r.fd,
                kid: r.kid,
                histogram_l1: r.histogram_l1,
                mean_rgb: r.generated.mean_rgb,
                train_seconds: train_s,
                samples: samples.display().to_string(),
            })
        };
    if let Some(root) = &o.from_samples {
        // Images drawn elsewhere (e.g. on a GPU): find each run's image folder.
        let find = |run: &str| -> Result<PathBuf> {
            let d = root.join("samples").join(run);
            let sub = d.join("ddim-10steps-cfg2");
            let dir = if sub.is_dir() { sub } else { d };
            if !dir.is_dir() {
                bail!("{}: no sample folder for run {run}", dir.display());
            }
            Ok(dir)
        };
        let mut runs = vec![("base".to_string(), None)];
        for &seed in &o.seeds {
            runs.push(("ft".to_string(), Some(seed)));
            runs.push(("adt".to_string(), Some(seed)));
        }
        stages.begin();
        for (name, seed) in runs {
            let tag = seed
                .map(|s| format!("{name}-seed{s}"))
                .unwrap_or_else(|| name.clone());
            let dir = find(&tag)?;
            let r = fd_of(&ev.stats(&dir)?)?;
            tracing::info!("{tag}: FD {:.1} KID {:.4}", r.fd, r.kid);
            let metrics = root.join("metrics").join(format!("{tag}.jsonl"));
            if metrics.is_file() {
                let dst = o.out.join(&tag);
                std::fs::create_dir_all(&dst)?;
                std::fs::copy(&metrics, dst.join("metrics.jsonl"))?;
            }
            models.push(ModelResult {
                name,
                seed,
                fd: r.fd,
                kid: r.kid,
                histogram_l1: r.histogram_l1,
                mean_rgb: r.generated.mean_rgb,
                train_seconds: 0.0,
                samples: dir.display().to_string(),
            });
        }
        stages.end();
    } else {
        stages.begin();
        models.push(eval_model("base", None, &o.base, 0.0)?);
        stages.end();
    }
    for &seed in o.seeds.iter().filter(|_| o.from_samples.is_none()) {
        for (name, cfg_path) in [("ft", &o.ft_config), ("adt", &o.adt_config)] {
            let run_dir = o.out.join(format!("{name}-seed{seed}"));
            let cfg = run_config(o, cfg_path, seed, o.iterations, &run_dir, &[])?;
            stages.begin();
            let t0 = std::time::Instant::now();
            let tr = run(
                cfg,
                &RunOptions {
                    quiet: false,
                    // The demo re-runs into its own folders on purpose.
                    overwrite: true,
                    ..Default::default()
                },
            )
            .with_context(|| format!("{name} run, seed {seed}"))?;
            drop(tr);
            let secs = t0.elapsed().as_secs_f64();
            stages.end();
            stages.begin();
            models.push(eval_model(name, Some(seed), &run_dir.join("final"), secs)?);
            stages.end();
        }
    }
    let report = DemoReport {
        iterations: o.iterations,
        seeds: o.seeds.clone(),
        eval_images: caps.len(),
        features: "EfficientNet-Lite1 (pooled, 240 px)".into(),
        style_gap_fd: gap,
        floor_fd: floor,
        models,
        wall_seconds: started.elapsed().as_secs_f64(),
        second_space: None,
        preparation_seconds: None,
        stages: Vec::new(),
    };
    let mut report = report;
    stages.begin();
    spaces::add_second_space(
        &mut report,
        FeatureSpace::EfficientNetLite2,
        &ref_dirs[0],
        o.eval_images,
        &cache,
        device,
    )?;
    stages.end();
    report.wall_seconds = started.elapsed().as_secs_f64();
    report.preparation_seconds = Some(preparation);
    report.stages = stages.done.clone();
    std::fs::write(
        o.out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(o.out.join("report.md"), report.markdown())?;
    write_demo_html(&report, &o.out).context("writing the HTML report")?;
    Ok(report)
}

/// The demo's one-page report: table, side-by-side samples, loss curves.
fn write_demo_html(r: &DemoReport, out: &Path) -> Result<()> {
    let mut body = String::new();
    body += "<h1>ADT vs FT: Twemoji base tuned towards Noto emoji</h1>";
    body += &md_table_to_html(&r.markdown());
    // Side-by-side samples of the first seed.
    let seed = r.seeds.first().copied().unwrap_or(0);
    let find = |name: &str, s: Option<u64>| {
        r.models
            .iter()
            .find(|m| m.name == name && m.seed == s)
            .map(|m| m.samples.clone())
    };
    let mut rows: Vec<String> = Vec::new();
    let mut labels = Vec::new();
    for (label, name, s) in [
        ("base", "base", None),
        ("FT", "ft", Some(seed)),
        ("ADT", "adt", Some(seed)),
    ] {
        if let Some(p) = find(name, s) {
            rows.push(p);
            labels.push(label);
        }
    }
    if !rows.is_empty() {
        let paths: Vec<&Path> = rows.iter().map(|s| Path::new(s.as_str())).collect();
        let grid = out.join("samples-side-by-side.png");
        rows_grid(&paths, 12, 3, &grid)?;
        body += &format!(
            "<h2>Samples (held-out captions, seed {seed}; rows: {})</h2><img src=\"{}\">",
            labels.join(", "),
            png_data_uri(&grid)?
        );
    }
    body += "<h2>Training curves</h2>";
    for m in r.models.iter().filter(|m| m.name != "base") {
        let metrics = out
            .join(format!("{}-seed{}", m.name, m.seed.unwrap_or(0)))
            .join("metrics.jsonl");
        if metrics.is_file() {
            let series = read_series(&metrics, &["loss_d", "loss_g_adv", "loss_diff", "d_acc"])?;
            body += &line_plot_svg(&format!("{} seed {}", m.name, m.seed.unwrap_or(0)), &series)?;
        }
    }
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>adt demo report</title><style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}td{{border:1px solid #ccc;padding:3px 8px}}img{{image-rendering:pixelated;max-width:100%}}</style></head><body>{body}</body></html>"
    );
    crate::weights::atomic_write(&out.join("report.html"), html.as_bytes())
}

pub mod ablation;
pub mod spaces;

/// Statistics of no images: the slot an [`Evaluator`]'s reference fills before it is
/// computed.
fn placeholder_stats() -> SetStats {
    SetStats {
        summary: crate::eval::metrics::SetSummary {
            path: String::new(),
            count: 0,
            available: 0,
            sizes: vec![],
            mean_rgb: [0.0; 3],
        },
        features: tch::Tensor::zeros([1], (tch::Kind::Float, Device::Cpu)),
        histogram: tch::Tensor::zeros([1], (tch::Kind::Float, Device::Cpu)),
    }
}

/// [`generate_set`] with the DDIM step count and image size given (the demo: 10, 32).
pub fn generate_set_with(
    pipe: &Pipeline,
    captions: &[String],
    dir: &Path,
    seed: i64,
    steps: usize,
    resolution: i64,
) -> Result<()> {
    let plan = Plan::new(&pipe.schedule, SamplerKind::Ddim, steps)?;
    std::fs::create_dir_all(dir)?;
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
    let mut progress = Progress::new(
        format!("sample {}", name.unwrap_or_default()),
        captions.len() as u64,
    );
    let mut k = 0;
    for (bi, chunk) in captions.chunks(SAMPLE_CHUNK).enumerate() {
        let imgs =
            crate::sample::generate(pipe, &plan, chunk, 2.0, seed * 1000 + bi as i64, resolution)?;
        for im in crate::sample::to_rgb8(&imgs)? {
            im.save(dir.join(format!("{k:05}.png")))?;
            k += 1;
        }
        progress.inc(chunk.len() as u64);
    }
    progress.finish();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The evaluation samples with a bfloat16 UNet by default, float32 with
    /// `--sample-fp32`; the text encoder stays float32 either way.
    #[test]
    fn sampling_pipeline_kinds() {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo-base");
        assert!(!DemoOptions::default().sample_fp32);
        for (fp32, kind) in [(false, tch::Kind::BFloat16), (true, tch::Kind::Float)] {
            let pipe = sampling_pipeline(&base, Device::Cpu, fp32).unwrap();
            assert_eq!(pipe.kind(), kind, "fp32 = {fp32}");
            let (cond, _) = pipe.encode_text(&["red heart".to_string()], None).unwrap();
            assert_eq!(cond.context.kind(), tch::Kind::Float);
        }
    }

    #[test]
    fn time_left_scales_the_remaining_estimates_by_the_finished_ones() {
        let mut s = Stages::new(std::time::Instant::now());
        s.add("a", 10.0);
        s.add("b", 20.0);
        s.add("c", 30.0);
        assert_eq!(s.total(), 60.0);
        assert_eq!(s.left(), 60.0);
        s.begin();
        s.end();
        // Stage a took about 0 s of its 10: the rest is scaled down, at most 4x.
        assert_eq!(s.next, 1);
        assert_eq!(s.left(), 50.0 * 0.25);
        s.done_actual = 20.0; // twice as slow as estimated
        assert_eq!(s.left(), 100.0);
        s.next = 3;
        assert_eq!(s.left(), 0.0);
    }

    #[test]
    fn finished_stages_are_recorded_for_the_report() {
        let mut s = Stages::new(std::time::Instant::now());
        s.add("train", 10.0);
        s.add("evaluate", 5.0);
        s.begin();
        s.end();
        assert_eq!(s.done.len(), 1);
        assert_eq!(s.done[0].stage, "train");
        assert_eq!(s.done[0].estimate_seconds, 10.0);
        assert!(s.done[0].seconds >= 0.0 && s.done[0].seconds < 5.0);
        let r = DemoReport {
            iterations: 1,
            seeds: vec![0],
            eval_images: 1,
            features: "f".into(),
            style_gap_fd: 1.0,
            floor_fd: 1.0,
            models: Vec::new(),
            wall_seconds: 3.0,
            second_space: None,
            preparation_seconds: Some(2.0),
            stages: s.done.clone(),
        };
        let md = r.markdown();
        assert!(md.contains("| preparation (checks, loading, timing for the estimate) | 2 | - |"));
        assert!(md.contains("| train | 0 | 10 |"), "{md}");
        let back: DemoReport = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back.stages, r.stages);
    }
}
