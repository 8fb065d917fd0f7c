//! The demo's second evaluation space: FD and KID of every model's samples in
//! EfficientNet-Lite2 features as well (the main table uses Lite1; the discriminator
//! uses neither), and whether the two spaces agree on the direction of ADT vs FT. A
//! claim about ADT vs FT needs both spaces to agree. Also the colour statistics of
//! every model's samples (mean HSV saturation, saturation-weighted hue histogram
//! distance to the held-out images), for the colour-drift question.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tch::Device;

use super::ablation::{colour_stats, hue_l1};
use super::{mean_sd, DemoReport, Evaluator};
use crate::eval::metrics::{compare, EvalOptions, FeatureExtractor, FeatureSpace};

/// FD / KID of one model in the second space.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SpaceResult {
    pub name: String,
    pub seed: Option<u64>,
    pub fd: f64,
    pub kid: f64,
    /// Mean HSV saturation of the samples.
    #[serde(default)]
    pub mean_saturation: f64,
    /// L1 distance between the samples' and the reference's hue histograms
    /// ([`super::ablation::ColourStats`]).
    #[serde(default)]
    pub hue_l1: f64,
}

/// The second feature space's results.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SecondSpace {
    pub features: String,
    pub models: Vec<SpaceResult>,
    /// Mean HSV saturation of the held-out reference images.
    #[serde(default)]
    pub reference_saturation: f64,
}

/// "lower" / "higher" / "equal": ADT's mean against FT's.
fn direction(adt: f64, ft: f64) -> &'static str {
    if adt < ft {
        "lower"
    } else if adt > ft {
        "higher"
    } else {
        "equal"
    }
}

fn mean_of(v: Vec<f64>) -> Option<f64> {
    (!v.is_empty()).then(|| mean_sd(&v).0)
}

impl DemoReport {
    /// ADT's mean FD and KID against FT's in each space, and whether the spaces agree:
    /// `None` without both FT and ADT runs.
    pub fn agreement(&self) -> Option<String> {
        let s2 = self.second_space.as_ref()?;
        let m1 = |name: &str, f: fn(&super::ModelResult) -> f64| {
            mean_of(
                self.models
                    .iter()
                    .filter(|m| m.name == name)
                    .map(f)
                    .collect(),
            )
        };
        let m2 = |name: &str, f: fn(&SpaceResult) -> f64| {
            mean_of(s2.models.iter().filter(|m| m.name == name).map(f).collect())
        };
        let mut lines = Vec::new();
        for (metric, a1, f1, a2, f2) in [
            (
                "FD",
                m1("adt", |m| m.fd)?,
                m1("ft", |m| m.fd)?,
                m2("adt", |m| m.fd)?,
                m2("ft", |m| m.fd)?,
            ),
            (
                "KID",
                m1("adt", |m| m.kid)?,
                m1("ft", |m| m.kid)?,
                m2("adt", |m| m.kid)?,
                m2("ft", |m| m.kid)?,
            ),
        ] {
            let (d1, d2) = (direction(a1, f1), direction(a2, f2));
            lines.push(format!(
                "{metric}: ADT's mean is {d1} than FT's in {} ({a1:.4} vs {f1:.4}) and {d2} in {} ({a2:.4} vs {f2:.4}): {}.",
                self.features,
                s2.features,
                if d1 == d2 {
                    "the spaces agree"
                } else {
                    "the spaces DISAGREE, so no claim can be made on this metric"
                }
            ));
        }
        Some(lines.join(" "))
    }

    /// The second space's table and the agreement line (empty without a second space).
    pub fn second_space_markdown(&self) -> String {
        let Some(s2) = &self.second_space else {
            return String::new();
        };
        let mut s = format!(
            "\nThe same samples in {} features, and their colours (mean HSV saturation; L1 between saturation-weighted hue histograms of the samples and of the held-out images, whose mean saturation is {:.3}):\n\n| model | seed | FD | KID | mean saturation | hue hist. L1 |\n|---|---|---|---|---|---|\n",
            s2.features, s2.reference_saturation
        );
        for m in &s2.models {
            s += &format!(
                "| {} | {} | {:.1} | {:.4} | {:.3} | {:.3} |\n",
                m.name,
                m.seed.map(|x| x.to_string()).unwrap_or_else(|| "-".into()),
                m.fd,
                m.kid,
                m.mean_saturation,
                m.hue_l1
            );
        }
        if let Some(a) = self.agreement() {
            s += &format!("\n{a}\n");
        }
        s
    }
}

/// Score every model's samples of `report` in `space` against the same held-out
/// reference (statistics cached under `cache`) and store them in the report.
pub fn add_second_space(
    report: &mut DemoReport,
    space: FeatureSpace,
    reference: &Path,
    eval_images: usize,
    cache: &Path,
    device: Device,
) -> Result<()> {
    let mut opts = EvalOptions::new(reference.join("unused"), reference);
    opts.features = space;
    opts.max_images = Some(eval_images);
    opts.device = device;
    opts.kid_subset_size = 100;
    opts.kid_subsets = 50;
    let extractor = FeatureExtractor::load(space, None, None, false, device)
        .with_context(|| format!("loading {space} (run scripts/setup_efficientnet.sh)"))?;
    let resolution = extractor.resolution();
    let mut ev = Evaluator {
        extractor,
        opts,
        reference: super::placeholder_stats(),
    };
    ev.reference = ev.cached_stats(reference, cache)?;
    let ref_colour = colour_stats(reference, eval_images)?;
    let mut models = Vec::new();
    for m in &report.models {
        let dir = Path::new(&m.samples);
        let r = compare(&ev.stats(dir)?, &ev.reference, &ev.extractor, &ev.opts)?;
        let c = colour_stats(dir, eval_images)?;
        tracing::info!(
            "{} {:?} in {space}: FD {:.1} KID {:.4}",
            m.name,
            m.seed,
            r.fd,
            r.kid
        );
        models.push(SpaceResult {
            name: m.name.clone(),
            seed: m.seed,
            fd: r.fd,
            kid: r.kid,
            mean_saturation: c.mean_saturation,
            hue_l1: hue_l1(&c.hue_histogram, &ref_colour.hue_histogram),
        });
    }
    report.second_space = Some(SecondSpace {
        features: format!("{} (pooled, {resolution} px)", space.name()),
        models,
        reference_saturation: ref_colour.mean_saturation,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::ModelResult;

    fn model(name: &str, seed: u64, fd: f64, kid: f64) -> ModelResult {
        ModelResult {
            name: name.into(),
            seed: Some(seed),
            fd,
            kid,
            histogram_l1: 0.5,
            mean_rgb: [0.5; 3],
            train_seconds: 1.0,
            samples: String::new(),
        }
    }

    fn space(name: &str, seed: u64, fd: f64, kid: f64) -> SpaceResult {
        SpaceResult {
            name: name.into(),
            seed: Some(seed),
            fd,
            kid,
            mean_saturation: 0.5,
            hue_l1: 0.25,
        }
    }

    fn report(second: Vec<SpaceResult>) -> DemoReport {
        DemoReport {
            iterations: 1,
            seeds: vec![0, 1],
            eval_images: 4,
            features: "lite1".into(),
            style_gap_fd: 1.0,
            floor_fd: 1.0,
            models: vec![
                model("ft", 0, 100.0, 0.20),
                model("ft", 1, 110.0, 0.22),
                model("adt", 0, 90.0, 0.18),
                model("adt", 1, 95.0, 0.30),
            ],
            wall_seconds: 0.0,
            second_space: Some(SecondSpace {
                features: "lite2".into(),
                models: second,
                reference_saturation: 0.4,
            }),
            preparation_seconds: None,
            stages: Vec::new(),
        }
    }

    /// Means over seeds decide the direction: FD (ADT 92.5 vs FT 105) is lower in
    /// Lite1; KID (ADT 0.24 vs FT 0.21) is higher.
    #[test]
    fn agreement_compares_seed_means_in_both_spaces() {
        let r = report(vec![
            space("ft", 0, 80.0, 0.1),
            space("ft", 1, 80.0, 0.1),
            space("adt", 0, 70.0, 0.2),
            space("adt", 1, 72.0, 0.2),
        ]);
        let a = r.agreement().unwrap();
        assert!(
            a.starts_with("FD: ADT's mean is lower than FT's in lite1 (92.5000 vs 105.0000) and lower in lite2"),
            "{a}"
        );
        assert!(
            a.contains("KID: ADT's mean is higher than FT's in lite1"),
            "{a}"
        );
        assert!(!a.contains("DISAGREE"), "{a}");
        let r = report(vec![space("ft", 0, 80.0, 0.1), space("adt", 0, 90.0, 0.2)]);
        let a = r.agreement().unwrap();
        assert!(
            a.contains("and higher in lite2 (90.0000 vs 80.0000): the spaces DISAGREE"),
            "{a}"
        );
        assert!(r
            .second_space_markdown()
            .contains("| adt | 0 | 90.0 | 0.2000 |"));
        // Without FT runs there is nothing to compare.
        let r = report(vec![space("adt", 0, 90.0, 0.2)]);
        assert!(r.agreement().is_none());
    }
}
