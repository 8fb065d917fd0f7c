//! Colour-drift probes that need no training (README, "Colour drift"):
//!
//! 1. **The discriminator's features** (`examples/demo-adt.toml`'s: EfficientNet-Lite0 at
//!    its resolution, its five levels): how far a colour change moves each level's
//!    features, relative to the distance between two different held-out emoji
//!    (`||F(p(x)) - F(x)|| / ||F(x') - F(x)||`, means over the images). Changes:
//!    saturation x0.5 and x1.5 (DiffAugment's saturation op), a hue rotation (R, G, B)
//!    -> (G, B, R), a 2-pixel shift, and one random draw of DiffAugment's colour op.
//! 2. **The evaluation spaces** (Lite1, Lite2): FD / KID of Noto training images, their
//!    saturation scaled by f (then clamped to [0, 1]), to the held-out Noto images: how
//!    much FD rises when only the saturation moves.
//! 3. **Out-of-range pixels** of models given as `NAME=DIR` arguments: the
//!    evaluation's samples (DDIM 10, CFG 2, the held-out captions, the ablation's
//!    seeds) before the clamp to [-1, 1] that saving them applies; the discriminator
//!    scores them unclamped.
//!
//! `cargo run --example colour_probe -- [--n N] [--data DIR] [--out DIR] [--models-only]
//! [NAME=DIR]...` writes `probe.md` and `probe.json` to `--out` (default
//! `runs/colour-probe`); `--models-only` skips probes 1 and 2. `--grid OUT.png DIR,DIR,...`
//! only writes a small side-by-side of sample folders (one row each).

use adt::demo::ablation::saturation_hue;
use adt::disc::diffaug::{diff_augment, Policy};
use adt::eval::fd;
use adt::eval::metrics::{
    load_image01, select_images, EvalOptions, FeatureExtractor, FeatureSpace,
};
use adt::models::pipeline::Pipeline;
use adt::sample::generate_unclamped;
use adt::schedule::{Plan, SamplerKind};
use adt::train::adt::build_features;
use adt::train::config::Config;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// DiffAugment's saturation op with factor `f` on images in any range.
fn saturate(x: &Tensor, f: f64) -> Tensor {
    let mean = x.mean_dim([1i64].as_slice(), true, x.kind());
    (x - &mean) * f + mean
}

/// Mean HSV saturation of images `[N, 3, H, W]` in [0, 1].
fn mean_saturation(x01: &Tensor) -> f64 {
    let n = x01.size()[0];
    (0..n)
        .map(|i| {
            saturation_hue(&x01.get(i))
                .0
                .mean(Kind::Double)
                .double_value(&[])
        })
        .sum::<f64>()
        / n as f64
}

/// The images of `dir` the evaluation uses (at most `n`), `[N, 3, H, W]` in [0, 1].
fn load_set(dir: &Path, n: usize) -> Result<Tensor> {
    let (files, _) = select_images(dir, Some(n), EvalOptions::new(dir, dir).seed)?;
    let imgs = files
        .iter()
        .map(|f| load_image01(f))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::stack(&imgs, 0).to_kind(Kind::Float))
}

/// Mean over images of the per-image L2 distance between two feature maps.
fn mean_dist(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .flatten(1, -1)
        .square()
        .sum_dim_intlist([1i64].as_slice(), false, Kind::Double)
        .sqrt()
        .mean(Kind::Double)
        .double_value(&[])
}

fn pooled(ex: &FeatureExtractor, x01: &Tensor) -> Result<Tensor> {
    let n = x01.size()[0];
    let mut out = Vec::new();
    for start in (0..n).step_by(32) {
        let len = (n - start).min(32);
        let imgs: Vec<Tensor> = (start..start + len).map(|i| x01.get(i)).collect();
        out.push(ex.features(&imgs)?.to_device(Device::Cpu));
    }
    Ok(Tensor::cat(&out, 0))
}

fn main() -> Result<()> {
    let mut n = 128usize;
    let mut data = PathBuf::from(".cache/demo/data");
    let mut out = PathBuf::from("runs/colour-probe");
    let mut models: Vec<(String, PathBuf)> = Vec::new();
    let mut models_only = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--n" => n = args.next().context("--n needs a value")?.parse()?,
            "--data" => data = args.next().context("--data needs a value")?.into(),
            "--out" => out = args.next().context("--out needs a value")?.into(),
            "--models-only" => models_only = true,
            "--grid" => {
                // `--grid OUT.png DIR,DIR,...`: only a small side-by-side of sample
                // folders (10 images a row, 2x), nothing else.
                let png = PathBuf::from(args.next().context("--grid needs OUT.png")?);
                let dirs: Vec<PathBuf> = args
                    .next()
                    .context("--grid needs a comma-separated list of folders")?
                    .split(',')
                    .map(PathBuf::from)
                    .collect();
                let rows: Vec<&Path> = dirs.iter().map(PathBuf::as_path).collect();
                return adt::report::rows_grid(&rows, 10, 2, &png);
            }
            m if m.contains('=') => {
                let (k, v) = m.split_once('=').unwrap();
                models.push((k.to_string(), PathBuf::from(v)));
            }
            other => bail!("unknown argument {other:?} (see the file's doc comment)"),
        }
    }
    tch::set_num_threads(1);
    std::fs::create_dir_all(&out)?;
    let heldout = data.join("noto/heldout");
    let x01 = load_set(&heldout, n)?;
    let mut md = String::new();
    let mut js = json!({ "n": x01.size()[0] });
    if !models_only {
        disc_feature_probe(&x01, &mut md, &mut js)?;
        eval_space_probe(&x01, &data.join("noto/train"), n, &mut md, &mut js)?;
    }
    if !models.is_empty() {
        range_probe(&models, &heldout, n, &mut md, &mut js)?;
    }
    std::fs::write(out.join("probe.md"), &md)?;
    std::fs::write(out.join("probe.json"), serde_json::to_string_pretty(&js)?)?;
    print!("{md}");
    Ok(())
}

/// Probe 1: the discriminator's features under colour changes.
fn disc_feature_probe(x01: &Tensor, md: &mut String, js: &mut Value) -> Result<()> {
    let x = x01 * 2.0 - 1.0;
    let cfg = Config::load(Some(Path::new("examples/demo-adt.toml")), &[])?;
    let net = build_features(&cfg, Device::Cpu, false)?;
    let feats = |t: &Tensor| tch::no_grad(|| net.features(t));
    let f0 = feats(&x);
    let other = feats(&x.roll([1i64].as_slice(), [0i64].as_slice()));
    tch::manual_seed(0);
    let color = Policy::parse("color")?;
    let changes: Vec<(&str, Tensor)> = vec![
        ("saturation x0.5", saturate(&x, 0.5)),
        ("saturation x1.5", saturate(&x, 1.5)),
        (
            "hue rotation (R,G,B)->(G,B,R)",
            x.index_select(1, &Tensor::from_slice(&[1i64, 2, 0])),
        ),
        (
            "2-pixel shift",
            x.roll([2i64].as_slice(), [3i64].as_slice()),
        ),
        (
            "DiffAugment colour op (one draw)",
            diff_augment(&x, &color)?,
        ),
    ];
    let levels = f0.len();
    *md += &format!(
        "## 1. Discriminator features ({} at {} px, {} levels), n = {}\n\nFeature change / distance between two different held-out emoji, per level (mean over images):\n\n| change | {} |\n|---|{}\n",
        serde_json::to_value(cfg.disc.features)?.as_str().unwrap_or("?"),
        cfg.disc.resolution,
        levels,
        x01.size()[0],
        (0..levels).map(|i| format!("level {i}")).collect::<Vec<_>>().join(" | "),
        "---|".repeat(levels)
    );
    let base_d: Vec<f64> = f0
        .iter()
        .zip(&other)
        .map(|(a, b)| mean_dist(a, b))
        .collect();
    let mut rows = Vec::new();
    for (name, t) in &changes {
        let f = feats(t);
        let r: Vec<f64> = f
            .iter()
            .zip(&f0)
            .zip(&base_d)
            .map(|((a, b), d)| mean_dist(a, b) / d)
            .collect();
        *md += &format!(
            "| {name} | {} |\n",
            r.iter()
                .map(|v| format!("{v:.3}"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        rows.push(json!({ "change": name, "ratio_per_level": r }));
    }
    js["disc_features"] = json!(rows);
    Ok(())
}

/// Probe 2: FD / KID in the evaluation spaces when only the saturation moves.
fn eval_space_probe(
    x01: &Tensor,
    train: &Path,
    n: usize,
    md: &mut String,
    js: &mut Value,
) -> Result<()> {
    let t01 = load_set(train, n)?;
    let spaces = [
        FeatureSpace::EfficientNetLite1,
        FeatureSpace::EfficientNetLite2,
    ];
    let exs = spaces
        .iter()
        .map(|&s| FeatureExtractor::load(s, None, None, false, Device::Cpu))
        .collect::<Result<Vec<_>>>()?;
    let refs = exs
        .iter()
        .map(|e| pooled(e, x01))
        .collect::<Result<Vec<_>>>()?;
    *md += &format!(
        "\n## 2. Evaluation spaces: Noto training images with their saturation scaled by f, against the held-out Noto images (n = {} each; held-out mean saturation {:.3})\n\n| f | mean saturation | FD Lite1 | KID Lite1 | FD Lite2 | KID Lite2 |\n|---|---|---|---|---|---|\n",
        t01.size()[0],
        mean_saturation(x01)
    );
    let mut rows = Vec::new();
    for f in [0.75, 1.0, 1.25, 1.5] {
        let y01 = (saturate(&(&t01 * 2.0 - 1.0), f).clamp(-1.0, 1.0) + 1.0) * 0.5;
        let sat = mean_saturation(&y01);
        let mut cells = Vec::new();
        for (e, r) in exs.iter().zip(&refs) {
            let g = pooled(e, &y01)?;
            let d = fd::frechet_distance_features(&g, r)?;
            tch::manual_seed(0);
            let k = fd::kid(&g, r, 50, 100.min(g.size()[0]))?;
            cells.push((d, k.mean));
        }
        *md += &format!(
            "| {f} | {sat:.3} | {:.1} | {:.4} | {:.1} | {:.4} |\n",
            cells[0].0, cells[0].1, cells[1].0, cells[1].1
        );
        rows.push(json!({ "factor": f, "mean_saturation": sat, "fd": [cells[0].0, cells[1].0], "kid": [cells[0].1, cells[1].1] }));
    }
    js["eval_spaces"] = json!(rows);
    Ok(())
}

/// Probe 3: out-of-range values of the evaluation's samples before the clamp.
fn range_probe(
    models: &[(String, PathBuf)],
    heldout: &Path,
    n: usize,
    md: &mut String,
    js: &mut Value,
) -> Result<()> {
    let caps = captions(heldout, n)?;
    *md += &format!(
        "\n## 3. The evaluation's samples before the clamp (DDIM 10, CFG 2, n = {})\n\n| model | values outside [-1, 1] | mean overshoot of those | mean saturation (clamped) |\n|---|---|---|---|\n",
        caps.len()
    );
    let mut rows = Vec::new();
    for (name, dir) in models {
        let pipe = Pipeline::load(dir, Device::Cpu, Kind::Float, Kind::Float)
            .with_context(|| format!("loading {}", dir.display()))?;
        let plan = Plan::new(&pipe.schedule, SamplerKind::Ddim, 10)?;
        // The same chunks and seeds as the ablation's samples.
        let imgs = caps
            .chunks(64)
            .enumerate()
            .map(|(bi, c)| generate_unclamped(&pipe, &plan, c, 2.0, 1234 * 1000 + bi as i64, 32))
            .collect::<Result<Vec<_>>>()?;
        let s = Tensor::cat(&imgs, 0).to_kind(Kind::Double);
        let over = (s.abs() - 1.0).clamp_min(0.0);
        let outside = over
            .gt(0.0)
            .to_kind(Kind::Double)
            .mean(Kind::Double)
            .double_value(&[]);
        let mean_over = if outside > 0.0 {
            over.sum(Kind::Double).double_value(&[])
                / over.gt(0.0).sum(Kind::Double).double_value(&[])
        } else {
            0.0
        };
        let sat = mean_saturation(&((s.clamp(-1.0, 1.0) + 1.0) * 0.5));
        *md += &format!(
            "| {name} | {:.2}% | {mean_over:.3} | {sat:.3} |\n",
            outside * 100.0
        );
        rows.push(json!({ "model": name, "path": dir, "outside_fraction": outside, "mean_overshoot": mean_over, "mean_saturation": sat }));
    }
    js["out_of_range"] = json!(rows);
    Ok(())
}

/// The first `n` captions of the held-out set (as the ablation samples them).
fn captions(dir: &Path, n: usize) -> Result<Vec<String>> {
    let p = dir.join("metadata.jsonl");
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .take(n)
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)
                .with_context(|| format!("{}: bad line {l}", p.display()))?;
            Ok(v["text"].as_str().unwrap_or("").to_string())
        })
        .collect()
}
