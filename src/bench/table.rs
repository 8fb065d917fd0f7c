//! The rows of `adt bench`, the report and its printed table.

use serde::Serialize;
use std::fmt;

use super::options::{BenchConfig, Lever};

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
    pub(crate) fn peak_gib(&self) -> Option<f64> {
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

pub(crate) fn fmt_opt(v: Option<f64>, prec: usize) -> String {
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
