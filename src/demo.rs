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
    compare, select_images, set_stats, EvalOptions, FeatureExtractor, FeatureSpace, SetStats,
};
use crate::models::pipeline::Pipeline;
use crate::report::{line_plot_svg, md_table_to_html, png_data_uri, read_series, rows_grid};
use crate::schedule::{Plan, SamplerKind};
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
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            seeds: vec![0],
            // Sized for two CPU cores: about 14 minutes (see the README).
            iterations: 120,
            out: PathBuf::from("runs/demo"),
            base: PathBuf::from("assets/demo-base"),
            data: PathBuf::from(".cache/demo/data"),
            eval_images: 256,
            ft_config: PathBuf::from("examples/demo-ft.toml"),
            adt_config: PathBuf::from("examples/demo-adt.toml"),
            device: "cpu".into(),
            from_samples: None,
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

/// Draw one image per caption with the demo sampler into `dir` (PNG files).
pub fn generate_set(pipe: &Pipeline, captions: &[String], dir: &Path, seed: i64) -> Result<()> {
    let plan = Plan::new(&pipe.schedule, SamplerKind::Ddim, 10)?;
    std::fs::create_dir_all(dir)?;
    let mut k = 0;
    for (bi, chunk) in captions.chunks(64).enumerate() {
        let imgs = crate::sample::generate(pipe, &plan, chunk, 2.0, seed * 1000 + bi as i64, 32)?;
        for im in crate::sample::to_rgb8(&imgs)? {
            im.save(dir.join(format!("{k:05}.png")))?;
            k += 1;
        }
    }
    Ok(())
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

    /// Statistics of a fixed image set, cached under `cache` keyed by the file list
    /// (names, sizes, modification times) and the feature network.
    fn cached_stats(&self, dir: &Path, cache: &Path) -> Result<SetStats> {
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

/// Run the demo end to end.
pub fn run_demo(o: &DemoOptions) -> Result<DemoReport> {
    let started = std::time::Instant::now();
    for sub in ["twemoji/heldout", "noto/train", "noto/heldout"] {
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
    std::fs::create_dir_all(&o.out)?;
    let device = match o.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        d => bail!("--device {d:?}: expected cpu or cuda"),
    };
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
    ev.reference = ev.cached_stats(&o.data.join("noto/heldout"), &cache)?;
    let fd_of = |stats: &SetStats| compare(stats, &ev.reference, &ev.extractor, &ev.opts);
    let gap = fd_of(&ev.cached_stats(&o.data.join("twemoji/heldout"), &cache)?)?.fd;
    let floor = fd_of(&ev.cached_stats(&o.data.join("noto/train"), &cache)?)?.fd;
    tracing::info!("reference points: style gap FD {gap:.1}, floor FD {floor:.1}");

    let mut caps = captions(&o.data.join("noto/heldout"))?;
    caps.truncate(o.eval_images);
    let mut models = Vec::new();
    let eval_model =
        |name: &str, seed: Option<u64>, dir: &Path, train_s: f64| -> Result<ModelResult> {
            let pipe = Pipeline::load(dir, device, tch::Kind::Float, tch::Kind::Float)?;
            let samples = o.out.join("samples").join(match seed {
                Some(s) => format!("{name}-seed{s}"),
                None => name.to_string(),
            });
            generate_set(&pipe, &caps, &samples, 1234)?;
            let r = fd_of(&ev.stats(&samples)?)?;
            tracing::info!("{name} seed {seed:?}: FD {:.1} KID {:.4}", r.fd, r.kid);
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
    } else {
        models.push(eval_model("base", None, &o.base, 0.0)?);
    }
    for &seed in o.seeds.iter().filter(|_| o.from_samples.is_none()) {
        for (name, cfg_path) in [("ft", &o.ft_config), ("adt", &o.adt_config)] {
            let run_dir = o.out.join(format!("{name}-seed{seed}"));
            let cfg = Config::load(
                Some(cfg_path),
                &[
                    format!("model.path={:?}", o.base.display().to_string()),
                    format!("train.seed={seed}"),
                    format!("train.iterations={}", o.iterations),
                    format!("output.dir={:?}", run_dir.display().to_string()),
                    format!(
                        "data.path={:?}",
                        o.data.join("noto/train").display().to_string()
                    ),
                    format!("train.device={:?}", o.device),
                ],
            )?;
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
            models.push(eval_model(name, Some(seed), &run_dir.join("final"), secs)?);
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
    };
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
