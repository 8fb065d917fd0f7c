//! The benchmark runner: timing with device synchronisation, peak-memory probes, the
//! variants (lever sets) of each workload and the trajectory denoisers they use.

use anyhow::{Context, Result};
use std::panic::AssertUnwindSafe;
use std::time::Instant;
use tch::{Device, Kind};

use super::options::{BenchOptions, Lever};
use super::table::{fmt_opt, BenchReport, Row};
use crate::models::mmdit::Sd3TrajectoryCopy;
use crate::models::pipeline::{Backbone, Pipeline};
use crate::models::unet::LoadedUNet;
use crate::train::fast::{gpu, FastDenoiser, FastOptions};

pub(crate) fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Peak-memory probe for one device.
pub(crate) struct Memory {
    device: Device,
    pub(crate) kind: String,
    /// Bytes in use when the peak was last reset (resident set on CPU, allocated
    /// bytes on CUDA): the peak less this is what the measured runs added.
    pub(crate) before: std::cell::Cell<Option<i64>>,
}

impl Memory {
    pub(crate) fn new(device: Device) -> Memory {
        let kind = match device {
            Device::Cuda(_) if gpu::available() => "cuda_max_allocated".to_string(),
            Device::Cuda(_) => "unavailable (binary without the CUDA shim)".to_string(),
            _ if Self::reset_rss() => "cpu_max_rss".to_string(),
            _ => "cpu_max_rss_unreset".to_string(),
        };
        Memory {
            device,
            kind,
            before: std::cell::Cell::new(None),
        }
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
                    self.before.set(gpu::memory(i).ok().map(|m| m.allocated));
                }
            }
            _ => {
                // Hand freed heap memory back to the system first, so that the
                // resident set is what is live (glibc keeps freed blocks otherwise).
                #[cfg(all(target_os = "linux", target_env = "gnu"))]
                unsafe {
                    libc::malloc_trim(0);
                }
                self.before
                    .set(if Self::reset_rss() { vm_hwm() } else { None });
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
pub(crate) struct Bench {
    pub(crate) opts: BenchOptions,
    pub(crate) device: Device,
    pub(crate) mem: Memory,
    pub(crate) report: BenchReport,
}

impl Bench {
    /// The variants to measure: baseline, each lever, the combinations.
    pub(crate) fn variants(&self) -> Vec<Vec<Lever>> {
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
    pub(crate) fn unsupported(&self, levers: &[Lever]) -> Option<String> {
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
    pub(crate) fn measure(
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

    pub(crate) fn skip(&mut self, workload: &str, levers: &[Lever], note: String) -> Result<()> {
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
        self.write_json()
    }

    /// Rewrite the JSON report (`--json`), if one was asked for.
    pub(crate) fn write_json(&self) -> Result<()> {
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
pub(crate) fn trajectory_for(
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
