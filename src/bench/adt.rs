//! ADT iteration workloads: G+D and D-only iterations from step 0 (`adt_gd_s0`,
//! `adt_d_s0`), the mean over an H = 5 cycle (`adt_h5_mean`), and the peak memory of
//! the G+D iteration against K, with the per-step decomposition and in one graph.

use anyhow::Result;

use super::options::{Inputs, Lever, Workload};
use super::runner::{trajectory_for, Bench};

/// Measure workload `w` (`AdtGd`, `AdtD` or `AdtH5`) for each lever set.
pub(crate) fn run_iterations(
    b: &mut Bench,
    cx: &mut Inputs,
    w: Workload,
    variants: &[Vec<Lever>],
) -> Result<()> {
    let Inputs {
        tr,
        images,
        captions,
        time_ids,
        ..
    } = cx;
    let name = match w {
        Workload::AdtGd => "adt_gd_s0",
        Workload::AdtD => "adt_d_s0",
        _ => "adt_h5_mean",
    };
    for levers in variants {
        if let Some(why) = b.unsupported(levers) {
            b.skip(name, levers, why)?;
            continue;
        }
        (tr.fast, tr.fast_sd3) = trajectory_for(&tr.pipe, levers)?;
        tr.cfg.train.k = 3;
        tr.cfg.train.decompose = true;
        let per_call = match w {
            Workload::AdtGd => {
                tr.cfg.train.h = 1;
                tr.force_start = Some(0);
                1
            }
            Workload::AdtD => {
                tr.cfg.train.h = usize::MAX;
                tr.force_start = Some(0);
                1
            }
            _ => {
                tr.cfg.train.h = 5;
                tr.force_start = None;
                5
            }
        };
        if per_call == 5 {
            // Align to an H-cycle (four D-only iterations, then G+D),
            // untimed.
            while tr.step % 5 != 0 {
                tr.iteration_on(images, captions, time_ids)?;
            }
        }
        // Phase times of the last timed G+D (or D-only) iteration.
        tr.cfg.train.profile_phases = true;
        let mut phases = None;
        let trr = &mut *tr;
        let (images, captions, time_ids) = (&*images, &*captions, &*time_ids);
        b.measure(name, levers, || {
            for _ in 0..per_call {
                let log = trr.iteration_on(images, captions, time_ids)?;
                if log.phases_ms.is_some() {
                    phases = log.phases_ms;
                }
            }
            Ok(())
        })?;
        tr.cfg.train.profile_phases = false;
        if let (Some(ph), Some(r)) = (phases, b.report.rows.last_mut()) {
            if r.median_ms.is_some() {
                let text = ph
                    .iter()
                    .map(|(k, v)| format!("{k} {v:.0}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                r.note = Some(format!("last iteration, ms: {text}"));
            }
        }
        if per_call == 5 {
            // Per iteration.
            if let Some(r) = b.report.rows.last_mut() {
                for v in [
                    &mut r.mean_ms,
                    &mut r.median_ms,
                    &mut r.min_ms,
                    &mut r.max_ms,
                ] {
                    *v = v.map(|x| x / 5.0);
                }
                r.note = Some(match r.note.take() {
                    Some(n) => format!("per iteration, H = 5 cycle; {n}"),
                    None => "per iteration, H = 5 cycle".into(),
                });
            }
            let base = b.report.row(name, "baseline").and_then(|r| r.median_ms);
            if let (Some(r), Some(base)) = (b.report.rows.last_mut(), base) {
                r.ratio = r.median_ms.map(|m| m / base);
            }
        }
        tr.fast = None;
        tr.fast_sd3 = None;
    }
    Ok(())
}

/// Peak memory of the G+D iteration from step 0 for each K in `ks` (baseline levers).
pub(crate) fn run_memory(b: &mut Bench, cx: &mut Inputs, ks: &[usize]) -> Result<()> {
    let Inputs {
        tr,
        images,
        captions,
        time_ids,
        ..
    } = cx;
    tr.fast = None;
    tr.fast_sd3 = None;
    tr.force_start = Some(0);
    tr.cfg.train.h = 1;
    for &k in ks {
        for decompose in [true, false] {
            let name = if decompose {
                format!("adt_gd_s0_k{k}")
            } else {
                format!("adt_gd_s0_k{k}_onegraph")
            };
            tr.cfg.train.k = k;
            tr.cfg.train.decompose = decompose;
            let trr = &mut *tr;
            let (images, captions, time_ids) = (&*images, &*captions, &*time_ids);
            b.measure(&name, &[], || {
                trr.iteration_on(images, captions, time_ids).map(|_| ())
            })?;
        }
    }
    tr.cfg.train.k = 3;
    tr.cfg.train.decompose = true;
    Ok(())
}
