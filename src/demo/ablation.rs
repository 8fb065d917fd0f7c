//! `adt ablate`: the paper's ablation (Table 3) at the demo's toy scale.
//!
//! Every variant starts from the same base, trains for the same iterations on the same
//! seeds as the demo's ADT run (`examples/demo-adt.toml`) with one setting changed, and
//! is evaluated like the demo, in two feature spaces that no discriminator uses
//! (EfficientNet-Lite1 and Lite2). The default variants:
//!
//! | name | change from ADT |
//! |---|---|
//! | `adt` | none (the demo's ADT configuration) |
//! | `stylegan-t` | StyleGAN-T's discriminator heads instead of the siamese heads |
//! | `drtune` | DRTune's gradient path (Eq. 4) instead of Eq. 11 |
//! | `lambda0` | lambda = 0 (no diffusion loss) |
//! | `k1`, `k3` | K = 1 / K = 3 kept gradient steps |
//! | `levels4` | four feature levels (blocks only) instead of five |
//! | `ft` | plain fine-tuning (`examples/demo-ft.toml`) |
//!
//! Optional variants (name them with `--variants`): `no-color-aug` (DiffAugment without
//! its colour op, a colour-drift hypothesis). A variant whose configuration equals one
//! already run (e.g. `k3` when the ADT configuration already has K = 3) is not trained
//! again: its row repeats the earlier results and says so.
//!
//! The report (`report.md`, `report.json`, `report.html` in the output folder) has one
//! row per variant with the mean and sample standard deviation over seeds of every
//! metric, whether each variant differs from ADT in the same direction in both feature
//! spaces (a claim needs both), the colour statistics of the samples (mean saturation,
//! hue histogram distance to the reference) and side-by-side samples.

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

use super::{captions, check_inputs, mean_sd, DemoOptions, Evaluator};
use crate::eval::metrics::{
    compare, load_image01, select_images, EvalOptions, FeatureExtractor, FeatureSpace,
};
use crate::report::{md_table_to_html, png_data_uri, rows_grid};
use crate::train::config::Config;
use crate::train::run::{run, RunOptions};

/// One row of the ablation: the ADT configuration with `overrides`, or the FT one.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Variant {
    pub name: String,
    pub description: String,
    /// Uses the FT configuration instead of the ADT one.
    pub ft: bool,
    /// `key=value` overrides applied after the configuration file.
    pub overrides: Vec<String>,
}

fn variant(name: &str, description: &str, ft: bool, overrides: &[&str]) -> Variant {
    Variant {
        name: name.into(),
        description: description.into(),
        ft,
        overrides: overrides.iter().map(|s| s.to_string()).collect(),
    }
}

/// The variants of Table 3 (and the additions), in report order.
pub fn table3_variants() -> Vec<Variant> {
    vec![
        variant("adt", "ADT (demo configuration)", false, &[]),
        variant(
            "stylegan-t",
            "StyleGAN-T discriminator (text-conditioned heads, hinge per token)",
            false,
            &["disc.kind=\"stylegan_t\""],
        ),
        variant(
            "drtune",
            "DRTune gradient path (Eq. 4)",
            false,
            &["train.grad_path=\"drtune\""],
        ),
        variant(
            "lambda0",
            "lambda = 0 (w/o L_diff)",
            false,
            &["train.lambda=0.0"],
        ),
        variant("k1", "K = 1", false, &["train.k=1"]),
        variant("k3", "K = 3", false, &["train.k=3"]),
        variant(
            "levels4",
            "four feature levels (blocks only)",
            false,
            &["disc.levels=\"blocks\""],
        ),
        variant("ft", "FT (demo configuration)", true, &[]),
    ]
}

/// Variants that only run when named.
/// The colour-drift hypotheses (README, "Colour drift") are among them: each changes one
/// setting that could make the samples drift away from the target's colours.
pub fn optional_variants() -> Vec<Variant> {
    vec![
        variant(
            "no-color-aug",
            "DiffAugment without the colour op",
            false,
            &["disc.diffaug=\"translation,cutout\""],
        ),
        variant(
            "paired-color",
            "DiffAugment's colour op drawn once per sample for the reference and the scored views",
            false,
            &["disc.paired_color=true"],
        ),
        variant(
            "lr-half",
            "half the generator learning rate",
            false,
            &["train.lr_g=2.5e-5"],
        ),
        variant(
            "h4",
            "H = 4 (half the generator steps)",
            false,
            &["train.h=4"],
        ),
        variant("lambda2", "lambda = 2", false, &["train.lambda=2.0"]),
        variant(
            "cfg1",
            "training trajectories without guidance (CFG 1)",
            false,
            &["sampler.cfg=1.0"],
        ),
    ]
}

/// Options of [`run_ablation`].
#[derive(Debug, Clone)]
pub struct AblationOptions {
    /// Seeds, iterations, base, data, configs, device, output folder (`from_samples`
    /// is not supported).
    pub demo: DemoOptions,
    /// Variant names to run (default: [`table3_variants`]); `adt` is always run first.
    pub variants: Option<Vec<String>>,
    /// Overrides applied to every run (FT included), before each variant's own.
    pub overrides: Vec<String>,
    /// Feature spaces of the evaluation (default Lite1 and Lite2).
    pub spaces: Vec<FeatureSpace>,
    /// Sampler steps of the evaluation images (the demo's 10).
    pub sample_steps: usize,
    /// Image size of the evaluation samples (the demo's 32).
    pub sample_size: i64,
}

impl Default for AblationOptions {
    fn default() -> Self {
        AblationOptions {
            demo: DemoOptions {
                out: PathBuf::from("runs/ablation"),
                ..Default::default()
            },
            variants: None,
            overrides: vec![],
            spaces: vec![
                FeatureSpace::EfficientNetLite1,
                FeatureSpace::EfficientNetLite2,
            ],
            sample_steps: 10,
            sample_size: 32,
        }
    }
}

/// Colour statistics of a set of images (RGB in [0, 1], alpha on white).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ColourStats {
    /// Mean HSV saturation over all pixels.
    pub mean_saturation: f64,
    /// Hue histogram ([`HUE_BINS`] bins from red, 0 degrees), each pixel weighted by its
    /// saturation (greys and white count for nothing), normalised to sum 1 (all zero for
    /// a set without any coloured pixel).
    pub hue_histogram: Vec<f64>,
}

/// Bins of [`ColourStats::hue_histogram`] (30 degrees each).
pub const HUE_BINS: usize = 12;

/// Saturation and hue of an image `[3, H, W]` in [0, 1]: two `[H, W]` tensors, hue in
/// [0, 1) (HSV; hue 0 where saturation is 0).
pub fn saturation_hue(image01: &Tensor) -> (Tensor, Tensor) {
    let x = image01.to_kind(Kind::Double);
    let (r, g, b) = (x.get(0), x.get(1), x.get(2));
    let (max, _) = x.max_dim(0, false);
    let (min, _) = x.min_dim(0, false);
    let delta = &max - &min;
    let safe_max = max.clamp_min(1e-12);
    let sat = &delta / &safe_max;
    let d = delta.clamp_min(1e-12);
    // Standard HSV hue in sixths of the circle.
    let h_r = ((&g - &b) / &d).remainder(6.0);
    let h_g = (&b - &r) / &d + 2.0;
    let h_b = (&r - &g) / &d + 4.0;
    let is_r = max.eq_tensor(&r);
    let is_g = max.eq_tensor(&g).logical_and(&is_r.logical_not());
    let h = h_b.where_self(
        &is_g.logical_or(&is_r).logical_not(),
        &h_g.where_self(&is_g, &h_r),
    );
    let hue = (h / 6.0).remainder(1.0);
    let hue = hue.where_scalarother(&delta.gt(0.0), 0.0);
    (sat, hue)
}

/// [`ColourStats`] of the images in `dir`: at most `max` of them, the same subset as
/// the FD / KID of `adt eval` with its default seed picks.
pub fn colour_stats(dir: &Path, max: usize) -> Result<ColourStats> {
    let (files, _) = select_images(dir, Some(max), EvalOptions::new(dir, dir).seed)?;
    let mut sat_sum = 0.0;
    let mut pixels = 0.0;
    let mut hist = vec![0.0; HUE_BINS];
    for f in &files {
        let x = load_image01(f)?;
        let (s, h) = saturation_hue(&x);
        sat_sum += s.sum(Kind::Double).double_value(&[]);
        pixels += s.numel() as f64;
        let bins = (h * HUE_BINS as f64)
            .floor()
            .clamp(0.0, (HUE_BINS - 1) as f64)
            .to_kind(Kind::Int64)
            .view([-1]);
        let w = Tensor::zeros([HUE_BINS as i64], (Kind::Double, Device::Cpu)).scatter_add(
            0,
            &bins,
            &s.view([-1]),
        );
        let w: Vec<f64> = Vec::try_from(w)?;
        for (a, b) in hist.iter_mut().zip(w) {
            *a += b;
        }
    }
    let total: f64 = hist.iter().sum();
    if total > 0.0 {
        hist.iter_mut().for_each(|v| *v /= total);
    }
    Ok(ColourStats {
        mean_saturation: sat_sum / pixels,
        hue_histogram: hist,
    })
}

/// L1 distance between two hue histograms, in [0, 2].
pub fn hue_l1(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum()
}

/// The metrics of one trained (or base) model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AblationRun {
    pub variant: String,
    pub seed: u64,
    /// Per evaluation feature space (in [`AblationReport::spaces`] order).
    pub fd: Vec<f64>,
    pub kid: Vec<f64>,
    /// Colour-histogram L1 to the reference (RGB, as `adt eval`).
    pub histogram_l1: f64,
    pub mean_saturation: f64,
    /// Hue-histogram L1 to the reference.
    pub hue_l1: f64,
    pub mean_rgb: [f64; 3],
    pub train_seconds: f64,
    pub eval_seconds: f64,
    pub samples: String,
    /// Set when this variant's configuration equals an earlier one's (its results are
    /// copied, not re-run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub same_as: Option<String>,
}

/// The whole ablation result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AblationReport {
    pub iterations: usize,
    pub seeds: Vec<u64>,
    pub eval_images: usize,
    pub spaces: Vec<String>,
    pub variants: Vec<Variant>,
    pub runs: Vec<AblationRun>,
    /// The reference's (held-out target images') colour statistics.
    pub reference_colour: ColourStats,
    /// Base model (before tuning), seed-independent.
    pub base: Option<AblationRun>,
    pub wall_seconds: f64,
}

/// Mean ± sd of a column.
fn pm(v: &[f64], digits: usize) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let (m, sd) = mean_sd(v);
    if v.len() > 1 {
        format!("{m:.digits$} ± {sd:.digits$}")
    } else {
        format!("{m:.digits$}")
    }
}

impl AblationReport {
    fn runs_of(&self, name: &str) -> Vec<&AblationRun> {
        self.runs.iter().filter(|r| r.variant == name).collect()
    }

    /// Mean of a metric of a variant.
    pub fn mean_of(&self, name: &str, f: impl Fn(&AblationRun) -> f64) -> Option<f64> {
        let v: Vec<f64> = self.runs_of(name).into_iter().map(f).collect();
        (!v.is_empty()).then(|| mean_sd(&v).0)
    }

    /// Direction of a variant against ADT in every feature space, by mean FD and by
    /// mean KID: "worse" / "better" when all spaces agree (positive = higher than ADT
    /// = worse), "disagree" otherwise.
    pub fn direction(&self, name: &str) -> Option<(String, String)> {
        if name == "adt" {
            return None;
        }
        let dir = |metric: &dyn Fn(&AblationRun, usize) -> f64| -> Option<String> {
            let mut signs = Vec::new();
            for i in 0..self.spaces.len() {
                let a = self.mean_of("adt", |r| metric(r, i))?;
                let v = self.mean_of(name, |r| metric(r, i))?;
                signs.push(v.partial_cmp(&a)?);
            }
            use std::cmp::Ordering::*;
            Some(if signs.iter().all(|s| *s == Greater) {
                "worse".into()
            } else if signs.iter().all(|s| *s == Less) {
                "better".into()
            } else if signs.iter().all(|s| *s == Equal) {
                "equal".into()
            } else {
                "disagree".into()
            })
        };
        Some((dir(&|r, i| r.fd[i])?, dir(&|r, i| r.kid[i])?))
    }

    /// The table: one row per variant, mean ± sd over seeds of every metric.
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "Ablation (Table 3 at toy scale): {} iterations per run, seeds {:?}, {} held-out images; FD / KID in {} (lower is better). \"vs ADT\": the variant's mean FD / KID is higher (worse) or lower (better) than ADT's in every space, equal in every space, or the spaces disagree.\n\n",
            self.iterations,
            self.seeds,
            self.eval_images,
            self.spaces.join(" and ")
        );
        s += "| variant | change |";
        let mut sep = "|---|---|".to_string();
        for sp in &self.spaces {
            s += &format!(" FD {sp} | KID {sp} |");
            sep += "---|---|";
        }
        s += " vs ADT (FD / KID) | RGB hist. L1 | hue hist. L1 | mean saturation | train s | eval s |\n";
        sep += "---|---|---|---|---|---|\n";
        s += &sep;
        let row = |s: &mut String, name: &str, change: &str, runs: &[&AblationRun]| {
            *s += &format!("| {name} | {change} |");
            for i in 0..self.spaces.len() {
                let fd: Vec<f64> = runs.iter().map(|r| r.fd[i]).collect();
                let kid: Vec<f64> = runs.iter().map(|r| r.kid[i]).collect();
                *s += &format!(" {} | {} |", pm(&fd, 1), pm(&kid, 4));
            }
            let dir = self
                .direction(name)
                .map(|(a, b)| format!("{a} / {b}"))
                .unwrap_or_else(|| "-".into());
            let col = |f: &dyn Fn(&AblationRun) -> f64, d: usize| {
                pm(&runs.iter().map(|r| f(r)).collect::<Vec<_>>(), d)
            };
            *s += &format!(
                " {dir} | {} | {} | {} | {} | {} |\n",
                col(&|r| r.histogram_l1, 3),
                col(&|r| r.hue_l1, 3),
                col(&|r| r.mean_saturation, 3),
                col(&|r| r.train_seconds, 0),
                col(&|r| r.eval_seconds, 0),
            );
        };
        if let Some(b) = &self.base {
            row(&mut s, "base", "before tuning", &[b]);
        }
        for v in &self.variants {
            let runs = self.runs_of(&v.name);
            let mut change = v.description.clone();
            if let Some(same) = runs.first().and_then(|r| r.same_as.clone()) {
                change += &format!(" (same configuration as {same}; not re-run)");
            }
            row(&mut s, &v.name, &change, &runs);
        }
        s += &format!(
            "\nReference (held-out target images): mean saturation {:.3}. Wall time {:.0} s.\n",
            self.reference_colour.mean_saturation, self.wall_seconds
        );
        s
    }

    /// Every number of the table is finite (what the smoke test checks).
    pub fn all_finite(&self) -> bool {
        self.runs.iter().chain(self.base.iter()).all(|r| {
            r.fd.iter().chain(&r.kid).all(|x| x.is_finite())
                && r.histogram_l1.is_finite()
                && r.hue_l1.is_finite()
                && r.mean_saturation.is_finite()
        })
    }
}

/// Resolve the variant list: `adt` first, names checked.
fn select_variants(names: &Option<Vec<String>>) -> Result<Vec<Variant>> {
    let all: Vec<Variant> = table3_variants()
        .into_iter()
        .chain(optional_variants())
        .collect();
    let Some(names) = names else {
        return Ok(table3_variants());
    };
    let mut out = vec![all[0].clone()];
    for n in names {
        let Some(v) = all.iter().find(|v| &v.name == n) else {
            bail!(
                "unknown ablation variant {n:?}; known: {}",
                all.iter()
                    .map(|v| v.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        };
        if !out.contains(v) {
            out.push(v.clone());
        }
    }
    Ok(out)
}

/// The configuration of one run of a variant.
fn variant_config(o: &AblationOptions, v: &Variant, seed: u64, run_dir: &Path) -> Result<Config> {
    let d = &o.demo;
    let file = if v.ft { &d.ft_config } else { &d.adt_config };
    let mut over = vec![
        format!("model.path={:?}", d.base.display().to_string()),
        format!("train.seed={seed}"),
        format!("train.iterations={}", d.iterations),
        format!("output.dir={:?}", run_dir.display().to_string()),
        format!(
            "data.path={:?}",
            d.data.join("noto/train").display().to_string()
        ),
        format!("train.device={:?}", d.device),
    ];
    over.extend(o.overrides.iter().cloned());
    over.extend(v.overrides.iter().cloned());
    Config::load(Some(file), &over).with_context(|| format!("configuration of variant {}", v.name))
}

/// Run the ablation end to end.
pub fn run_ablation(o: &AblationOptions) -> Result<AblationReport> {
    let started = std::time::Instant::now();
    let d = &o.demo;
    ensure!(
        d.from_samples.is_none(),
        "the ablation trains its own runs; --from-samples is not supported"
    );
    ensure!(!d.seeds.is_empty(), "no seeds");
    ensure!(!o.spaces.is_empty(), "no evaluation feature space");
    let device = check_inputs(d, &["noto/train", "noto/heldout"])?;
    let variants = select_variants(&o.variants)?;
    // Every configuration loads and validates before any work starts.
    for v in &variants {
        variant_config(o, v, d.seeds[0], &d.out.join("check"))?.validate()?;
    }
    std::fs::create_dir_all(&d.out)?;
    let heldout = d.data.join("noto/heldout");
    let cache = d.data.join("eval-cache");
    let mut evaluators = Vec::new();
    for &space in &o.spaces {
        let mut opts = EvalOptions::new(d.out.join("unused"), &heldout);
        opts.features = space;
        opts.max_images = Some(d.eval_images);
        opts.device = device;
        opts.kid_subset_size = 100;
        opts.kid_subsets = 50;
        let extractor = FeatureExtractor::load(space, None, None, false, device)
            .with_context(|| format!("loading {space} (run scripts/setup_efficientnet.sh)"))?;
        let mut ev = Evaluator {
            extractor,
            opts,
            reference: super::placeholder_stats(),
        };
        ev.reference = ev.cached_stats(&heldout, &cache)?;
        evaluators.push(ev);
    }
    let reference_colour = colour_stats(&heldout, d.eval_images)?;
    let mut caps = captions(&heldout)?;
    caps.truncate(d.eval_images);

    let evaluate = |variant: &str, seed: u64, model: &Path, train_s: f64| -> Result<AblationRun> {
        let t0 = std::time::Instant::now();
        let pipe = super::sampling_pipeline(model, device, d.sample_fp32)?;
        let samples = d.out.join("samples").join(format!("{variant}-seed{seed}"));
        super::generate_set_with(&pipe, &caps, &samples, 1234, o.sample_steps, o.sample_size)?;
        drop(pipe);
        let (mut fd, mut kid) = (Vec::new(), Vec::new());
        let mut hist = 0.0;
        let mut mean_rgb = [0.0; 3];
        for ev in &evaluators {
            let r = compare(&ev.stats(&samples)?, &ev.reference, &ev.extractor, &ev.opts)?;
            fd.push(r.fd);
            kid.push(r.kid);
            hist = r.histogram_l1;
            mean_rgb = r.generated.mean_rgb;
        }
        let c = colour_stats(&samples, d.eval_images)?;
        let run = AblationRun {
            variant: variant.into(),
            seed,
            fd,
            kid,
            histogram_l1: hist,
            mean_saturation: c.mean_saturation,
            hue_l1: hue_l1(&c.hue_histogram, &reference_colour.hue_histogram),
            mean_rgb,
            train_seconds: train_s,
            eval_seconds: t0.elapsed().as_secs_f64(),
            samples: samples.display().to_string(),
            same_as: None,
        };
        tracing::info!(
            "ablation {variant} seed {seed}: FD {:?} KID {:?} saturation {:.3} hue L1 {:.3} (train {:.0} s, eval {:.0} s)",
            run.fd,
            run.kid,
            run.mean_saturation,
            run.hue_l1,
            run.train_seconds,
            run.eval_seconds
        );
        Ok(run)
    };

    let mut base = evaluate("base", 0, &d.base, 0.0)?;
    base.seed = 0;
    let report = |runs: Vec<AblationRun>| AblationReport {
        iterations: d.iterations,
        seeds: d.seeds.clone(),
        eval_images: caps.len(),
        spaces: o.spaces.iter().map(|s| s.name().to_string()).collect(),
        variants: variants.clone(),
        runs,
        reference_colour: reference_colour.clone(),
        base: Some(base.clone()),
        wall_seconds: started.elapsed().as_secs_f64(),
    };
    let mut runs: Vec<AblationRun> = Vec::new();
    // Configuration text (output folder blanked) -> variant that ran it, per seed.
    let mut seen: Vec<(u64, String, String)> = Vec::new();
    let total = variants.len() * d.seeds.len();
    let mut done = 0;
    for &seed in &d.seeds {
        for v in &variants {
            done += 1;
            let run_dir = d.out.join(format!("{}-seed{seed}", v.name));
            let cfg = variant_config(o, v, seed, &run_dir)?;
            let key = {
                let mut c = cfg.clone();
                c.output.dir = PathBuf::new();
                c.to_toml()?
            };
            if let Some((_, _, first)) = seen.iter().find(|(s, k, _)| *s == seed && *k == key) {
                let mut r = runs
                    .iter()
                    .find(|r| r.seed == seed && &r.variant == first)
                    .cloned()
                    .context("earlier run of the same configuration")?;
                r.variant = v.name.clone();
                r.same_as = Some(first.clone());
                tracing::info!(
                    "ablation {} seed {seed}: same configuration as {first}, not re-run",
                    v.name
                );
                runs.push(r);
                continue;
            }
            tracing::info!(
                "ablation run {done}/{total}: {} ({}), seed {seed}",
                v.name,
                v.description
            );
            let t0 = std::time::Instant::now();
            let tr = run(
                cfg,
                &RunOptions {
                    quiet: false,
                    // Each variant re-runs into its own folder on purpose.
                    overwrite: true,
                    ..Default::default()
                },
            )
            .with_context(|| format!("ablation variant {}, seed {seed}", v.name))?;
            drop(tr);
            let secs = t0.elapsed().as_secs_f64();
            runs.push(evaluate(&v.name, seed, &run_dir.join("final"), secs)?);
            seen.push((seed, key, v.name.clone()));
            // The runs so far, so that a long ablation stopped early keeps them.
            write_tables(&report(runs.clone()), &d.out)?;
        }
    }
    let report = report(runs);
    write_tables(&report, &d.out)?;
    write_html(&report, &d.out).context("writing the ablation HTML report")?;
    Ok(report)
}

/// `report.json` and `report.md` in `out`.
fn write_tables(report: &AblationReport, out: &Path) -> Result<()> {
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(report)?,
    )?;
    std::fs::write(out.join("report.md"), report.markdown())?;
    Ok(())
}

/// The HTML report: the table and one row of samples per variant (first seed).
fn write_html(r: &AblationReport, out: &Path) -> Result<()> {
    let mut body = "<h1>Ablation (Table 3 at toy scale)</h1>".to_string();
    body += &md_table_to_html(&r.markdown());
    let seed = r.seeds.first().copied().unwrap_or(0);
    let mut rows: Vec<String> = Vec::new();
    let mut labels: Vec<String> = Vec::new();
    if let Some(b) = &r.base {
        rows.push(b.samples.clone());
        labels.push("base".into());
    }
    for v in &r.variants {
        if let Some(run) = r
            .runs
            .iter()
            .find(|x| x.variant == v.name && x.seed == seed)
        {
            rows.push(run.samples.clone());
            labels.push(v.name.clone());
        }
    }
    let paths: Vec<&Path> = rows.iter().map(|s| Path::new(s.as_str())).collect();
    let grid = out.join("samples-side-by-side.png");
    rows_grid(&paths, 12, 3, &grid)?;
    body += &format!(
        "<h2>Samples (held-out captions, seed {seed}; rows: {})</h2><img src=\"{}\">",
        labels.join(", "),
        png_data_uri(&grid)?
    );
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>adt ablation report</title><style>body{{font-family:sans-serif;max-width:1400px;margin:2em auto}}table{{border-collapse:collapse}}td{{border:1px solid #ccc;padding:3px 8px}}img{{image-rendering:pixelated;max-width:100%}}</style></head><body>{body}</body></html>"
    );
    crate::weights::atomic_write(&out.join("report.html"), html.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(rgb: [f64; 3]) -> Tensor {
        Tensor::from_slice(&rgb).view([3, 1, 1])
    }

    /// Hue and saturation of primary and secondary colours, grey and white
    /// (the HSV definition, e.g. Python's colorsys).
    #[test]
    fn saturation_and_hue_match_hsv() {
        for (rgb, s, h) in [
            ([1.0, 0.0, 0.0], 1.0, 0.0),
            ([1.0, 1.0, 0.0], 1.0, 1.0 / 6.0),
            ([0.0, 1.0, 0.0], 1.0, 2.0 / 6.0),
            ([0.0, 1.0, 1.0], 1.0, 3.0 / 6.0),
            ([0.0, 0.0, 1.0], 1.0, 4.0 / 6.0),
            ([1.0, 0.0, 1.0], 1.0, 5.0 / 6.0),
            ([1.0, 0.5, 0.5], 0.5, 0.0),
            ([0.2, 0.4, 0.8], 0.75, 0.6111111111111112),
            ([0.5, 0.5, 0.5], 0.0, 0.0),
            ([1.0, 1.0, 1.0], 0.0, 0.0),
            ([0.0, 0.0, 0.0], 0.0, 0.0),
        ] {
            let (sat, hue) = saturation_hue(&img(rgb));
            assert!((sat.double_value(&[0, 0]) - s).abs() < 1e-12, "{rgb:?} sat");
            assert!((hue.double_value(&[0, 0]) - h).abs() < 1e-12, "{rgb:?} hue");
        }
    }

    /// A red and a white image: half the pixels fully saturated, all the hue weight in
    /// the red bin; a blue set is 2 away in hue-histogram L1.
    #[test]
    fn colour_stats_of_a_known_set() {
        let d = tempfile::tempdir().unwrap();
        image::RgbImage::from_pixel(4, 4, image::Rgb([255, 0, 0]))
            .save(d.path().join("a.png"))
            .unwrap();
        image::RgbImage::from_pixel(4, 4, image::Rgb([255, 255, 255]))
            .save(d.path().join("b.png"))
            .unwrap();
        let c = colour_stats(d.path(), 10).unwrap();
        assert!((c.mean_saturation - 0.5).abs() < 1e-12, "{c:?}");
        let mut want = vec![0.0; HUE_BINS];
        want[0] = 1.0;
        assert_eq!(c.hue_histogram, want);
        let mut blue = vec![0.0; HUE_BINS];
        blue[8] = 1.0;
        assert_eq!(hue_l1(&c.hue_histogram, &blue), 2.0);
    }

    /// The committed demo configurations load with every variant's overrides, each
    /// variant changes what it says, and the paper defaults hold where the demo does
    /// not set a value (no clipping, five feature levels).
    #[test]
    fn every_variant_configures_from_the_demo_configs() {
        let mut o = AblationOptions::default();
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        o.demo.adt_config = root.join("examples/demo-adt.toml");
        o.demo.ft_config = root.join("examples/demo-ft.toml");
        let dir = Path::new("unused");
        let adt = variant_config(&o, &table3_variants()[0], 3, dir).unwrap();
        assert_eq!(adt.train.grad_clip, 0.0);
        assert_eq!(
            adt.disc.levels,
            crate::disc::features::Levels::PatchAndBlocks
        );
        assert_eq!(adt.disc.blocks, None);
        assert_eq!(adt.train.seed, 3);
        for v in table3_variants().iter().chain(&optional_variants()) {
            let c = variant_config(&o, v, 3, dir).unwrap();
            c.validate().unwrap();
            let changed = match v.name.as_str() {
                "adt" => true,
                "stylegan-t" => c.disc.kind == crate::train::config::DiscKind::StyleganT,
                "drtune" => c.train.grad_path == crate::train::config::GradPath::Drtune,
                "lambda0" => c.train.lambda == 0.0,
                "k1" => c.train.k == 1,
                "k3" => c.train.k == 3,
                "levels4" => c.disc.levels == crate::disc::features::Levels::Blocks,
                "ft" => c.train.mode == crate::train::config::Mode::Ft,
                "no-color-aug" => c.disc.diffaug == "translation,cutout",
                "paired-color" => c.disc.paired_color,
                "lr-half" => c.train.lr_g == Some(2.5e-5),
                "h4" => c.train.h == 4,
                "lambda2" => c.train.lambda == 2.0,
                "cfg1" => c.sampler.cfg == 1.0,
                other => panic!("untested variant {other}"),
            };
            assert!(changed, "{}", v.name);
        }
    }

    #[test]
    fn unknown_variant_is_an_error_and_adt_comes_first() {
        let e = select_variants(&Some(vec!["k9".into()])).unwrap_err();
        assert!(e.to_string().contains("k9") && e.to_string().contains("drtune"));
        let v = select_variants(&Some(vec!["ft".into(), "no-color-aug".into()])).unwrap();
        let names: Vec<_> = v.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["adt", "ft", "no-color-aug"]);
    }
}
