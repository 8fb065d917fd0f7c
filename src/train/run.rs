//! `adt train`: the training loop around [`Trainer::iteration`] with progress,
//! metrics, periodic sample grids and checkpoints, resume, and the final save.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;

use crate::progress::Progress;
use crate::train::adt::Trainer;
use crate::train::checkpoint;
use crate::train::config::Config;

/// Prepare generated data when `data.path = "synthetic"` (smoke tests and the
/// examples): an image folder of simple coloured shapes with captions.
fn resolve_synthetic(cfg: &mut Config) -> Result<()> {
    if cfg.data.get("path").and_then(|v| v.as_str()) == Some("synthetic") {
        let dir = cfg.output.dir.join("synthetic-data");
        let n = cfg
            .data
            .remove("synthetic_count")
            .and_then(|v| v.as_integer())
            .unwrap_or(64) as usize;
        if !dir.join("metadata.jsonl").is_file() {
            crate::data::write_synthetic_dataset(
                &dir,
                n,
                cfg.train.resolution() as u32,
                cfg.train.seed,
            )?;
        }
        cfg.data.insert(
            "path".into(),
            toml::Value::String(dir.display().to_string()),
        );
    } else {
        cfg.data.remove("synthetic_count");
    }
    Ok(())
}

/// Options of a training run beyond the configuration.
#[derive(Default)]
pub struct RunOptions {
    /// Resume from the latest checkpoint in the output folder (or this folder).
    pub resume: Option<Option<PathBuf>>,
    /// Stop after this many iterations of this invocation (testing resume).
    pub max_iterations: Option<usize>,
    pub quiet: bool,
    /// Allow a new run into an output folder that holds checkpoints (or a resume
    /// from a checkpoint older than others in the folder): same-named checkpoints
    /// are replaced as the run reaches them; the others stay and are never pruned.
    pub overwrite: bool,
}

/// Where a run starts: the checkpoint to restore (if any) and the run id to carry.
struct Start {
    from: Option<PathBuf>,
    run_id: Option<String>,
}

fn names(found: &[PathBuf]) -> String {
    let mut v: Vec<String> = found
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    if v.len() > 4 {
        let n = v.len();
        v.drain(2..n - 1);
        v.insert(2, "...".into());
    }
    v.join(", ")
}

/// Decide where the run starts before anything in the output folder is written:
/// refuse a new run over existing checkpoints (unless `overwrite`), find the
/// checkpoint of `--resume`, compare its configuration with this one.
fn plan_start(cfg: &Config, opts: &RunOptions) -> Result<Start> {
    let out = &cfg.output.dir;
    let removed = checkpoint::clean_temporaries(out)?;
    for p in &removed {
        tracing::warn!("removed the leftover temporary checkpoint {}", p.display());
    }
    let entries = checkpoint::step_entries(out)?;
    let from = match &opts.resume {
        None => {
            if !entries.is_empty() && !opts.overwrite {
                bail!(
                    "{} holds checkpoints of an earlier run ({}); pass --resume to continue it, \
                     or --overwrite to start a new run there (its checkpoints replace same-named ones), \
                     or choose another output.dir",
                    checkpoint::checkpoints_dir(out).display(),
                    names(&entries)
                );
            }
            return Ok(Start {
                from: None,
                run_id: None,
            });
        }
        Some(Some(d)) => d.clone(),
        Some(None) => match checkpoint::find_resume(out)? {
            Some((d, note)) => {
                if let Some(n) = note {
                    tracing::warn!("--resume: {n}");
                }
                d
            }
            None => {
                if !entries.is_empty() && !opts.overwrite {
                    bail!(
                        "--resume: {} holds no complete checkpoint (only {}); pass --overwrite to start a new run there",
                        checkpoint::checkpoints_dir(out).display(),
                        names(&entries)
                    );
                }
                tracing::warn!(
                    "--resume: no checkpoint in {}, starting fresh",
                    checkpoint::checkpoints_dir(out).display()
                );
                return Ok(Start {
                    from: None,
                    run_id: None,
                });
            }
        },
    };
    let state = checkpoint::read_state(&from)
        .with_context(|| format!("--resume {}: not a complete checkpoint", from.display()))?;
    // The checkpoint's configuration against this one.
    let now = cfg.to_toml()?;
    let diffs = checkpoint::config_differences(&state.config, &now).unwrap_or_default();
    if let Some((_, a, b)) = diffs.iter().find(|(k, _, _)| k == "train.mode") {
        bail!(
            "--resume {}: the checkpoint was trained with train.mode = {a}, this configuration has {b}; \
             a resumed run cannot change mode (start a new run from its final/ pipeline instead)",
            from.display()
        );
    }
    if !diffs.is_empty() {
        let list: Vec<String> = diffs
            .iter()
            .map(|(k, a, b)| format!("{k}: {a} -> {b}"))
            .collect();
        tracing::warn!(
            "--resume {}: the configuration differs from the checkpoint's in {} field(s): {}",
            from.display(),
            diffs.len(),
            list.join("; ")
        );
    }
    // Later checkpoints in the folder would be replaced by this run.
    let later: Vec<PathBuf> = checkpoint::complete_checkpoints(out)?
        .into_iter()
        .filter(|f| f.step > state.step)
        .map(|f| f.path)
        .collect();
    if !later.is_empty() && !opts.overwrite {
        bail!(
            "--resume {} (step {}): {} holds later checkpoints ({}) that this run would replace; \
             pass --overwrite to allow it, or resume from the newest one",
            from.display(),
            state.step,
            checkpoint::checkpoints_dir(out).display(),
            names(&later)
        );
    }
    // Continuing a run keeps its id (its older checkpoints are pruned as usual); a
    // branch from an older checkpoint is a new run, which never prunes the old ones.
    let run_id = (later.is_empty() && !state.run_id.is_empty()).then(|| state.run_id.clone());
    Ok(Start {
        from: Some(from),
        run_id,
    })
}

/// Train to the configured number of iterations; returns the trainer.
pub fn run(mut cfg: Config, opts: &RunOptions) -> Result<Trainer> {
    // One rank of a data-parallel run (torchrun, SLURM, `adt train --nproc`)?
    let pg = crate::train::ddp::setup(&mut cfg)?;
    cfg.check_device()?;
    let rank0 = crate::dist::is_rank0();
    let barrier = || -> Result<()> {
        match &pg {
            Some(g) => g.barrier(),
            None => Ok(()),
        }
    };
    // Rank 0 prepares the output folder first (synthetic data, leftovers); the
    // others then find it ready and reach the same decision about where to start.
    let mut start = None;
    if rank0 {
        resolve_synthetic(&mut cfg)?;
        start = Some(plan_start(&cfg, opts)?);
    }
    barrier()?;
    let start = match start {
        Some(s) => s,
        None => {
            resolve_synthetic(&mut cfg)?;
            plan_start(&cfg, opts)?
        }
    };
    let mut tr = Trainer::new(cfg.clone())?;
    if let Some(id) = start.run_id {
        tr.run_id = id;
    }
    let mut last_ckpt: Option<(PathBuf, usize)> = None;
    if let Some(d) = &start.from {
        checkpoint::restore(&mut tr, d)
            .with_context(|| format!("resuming from {}", d.display()))?;
        tracing::info!("resumed from {} at step {}", d.display(), tr.step);
        last_ckpt = Some((d.clone(), tr.step));
    }
    // A resumed run logs the steps after its checkpoint again; a new one starts empty.
    tr.truncate_metrics(tr.step)?;
    if let Some(g) = &pg {
        crate::train::ddp::attach(&mut tr, g)?;
    }
    let total = cfg.train.iterations;
    let mut pb = if opts.quiet || !rank0 {
        Progress::hidden(total as u64)
    } else {
        let name = tr
            .out_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
        Progress::new(format!("train {}", name.unwrap_or_default()), total as u64)
    };
    pb.set_position(tr.step as u64);
    let mut done = 0;
    let started = std::time::Instant::now();
    let mut out_of_time = false;
    while tr.step < total {
        if let Some(limit) = cfg.train.time_limit_minutes {
            let mut over = started.elapsed().as_secs_f64() > limit * 60.0;
            if let Some(g) = &pg {
                // Every rank stops at the same iteration.
                let f = tch::Tensor::from_slice(&[over as i32]).to_device(g.device);
                g.all_reduce_max(std::slice::from_ref(&f))?;
                over = f.int64_value(&[0]) != 0;
            }
            if over {
                tracing::warn!(
                    "train.time_limit_minutes = {limit} reached at step {}",
                    tr.step
                );
                out_of_time = true;
                break;
            }
        }
        if let Some(m) = opts.max_iterations {
            if done >= m {
                break;
            }
        }
        if cfg.train.dist_shared_start && pg.is_some() {
            tr.force_start = Some(crate::dist::shared_start(
                cfg.train.seed,
                tr.step,
                tr.plan.len(),
            ));
        }
        let log = match tr.iteration() {
            Ok(l) => l,
            Err(e) => return Err(explain_stop(e, &tr, &last_ckpt)),
        };
        if log.step % cfg.output.log_every.max(1) == 0 || tr.step == total {
            tr.log(&log)?;
        }
        let mut msg = String::new();
        if let Some(v) = log.loss_d {
            msg += &format!("D {v:.3} acc {:.2} ", log.d_acc.unwrap_or(0.0));
        }
        if let Some(v) = log.loss_g_adv {
            msg += &format!("G_adv {v:.3} ");
        }
        if let Some(v) = log.loss_diff {
            msg += &format!("diff {v:.4}");
        }
        pb.set_message(msg);
        pb.inc(1);
        done += 1;
        let s = tr.step;
        if cfg.output.sample_every > 0
            && s % cfg.output.sample_every == 0
            && !cfg.output.validation_prompts.is_empty()
            && rank0
        {
            let imgs = crate::sample::generate(
                &tr.pipe,
                &tr.plan,
                &cfg.output.validation_prompts,
                cfg.sampler.cfg,
                cfg.train.seed as i64,
                tr.cfg.train.resolution(),
            )?;
            crate::sample::save_grid(
                &imgs,
                &tr.out_dir.join("samples").join(format!("step-{s:07}.png")),
                4,
            )?;
        }
        if cfg.output.checkpoint_every > 0 && s % cfg.output.checkpoint_every == 0 && s < total {
            // After a barrier: every rank has finished the step being saved.
            barrier()?;
            if rank0 {
                match checkpoint::save(&tr) {
                    Ok(p) => last_ckpt = Some((p, s)),
                    Err(e) => return Err(explain_stop(e, &tr, &last_ckpt)),
                }
            }
            barrier()?;
        }
    }
    pb.finish();
    if let Some(d) = &tr.ddp {
        tracing::info!(
            "{} over {done} iterations of {:.1} s in all",
            d.summary(),
            started.elapsed().as_secs_f64()
        );
    }
    barrier()?;
    if (tr.step >= total || out_of_time) && rank0 {
        let out = cfg
            .model
            .save_to
            .clone()
            .unwrap_or_else(|| tr.out_dir.join("final"));
        if let Some(bad) = checkpoint::first_nonfinite(&tr) {
            let e = anyhow::Error::new(checkpoint::NonFiniteState {
                step: tr.step,
                what: bad,
            });
            return Err(explain_stop(e, &tr, &last_ckpt));
        }
        // A save interrupted earlier may have left temporary files there.
        checkpoint::clean_atomic_temps(&out)?;
        tr.save_final(&out)?;
        checkpoint::save(&tr)?;
        if cfg.train.lora.is_some() {
            tracing::info!(
                "LoRA adapters written to {}",
                out.join(crate::models::lora::LORA_FILE).display()
            );
        } else {
            tracing::info!("tuned pipeline written to {}", out.display());
        }
    }
    barrier()?;
    Ok(tr)
}

/// Add to a NaN stop which checkpoint holds the last finite state, truthfully: every
/// checkpoint is checked for finiteness before it is written, and one written just
/// before the failing step holds the weights that produced the non-finite value.
fn explain_stop(e: anyhow::Error, tr: &Trainer, last: &Option<(PathBuf, usize)>) -> anyhow::Error {
    let failing_step = if let Some(n) = e.downcast_ref::<crate::train::adt::NonFiniteLoss>() {
        n.step
    } else if e.downcast_ref::<checkpoint::NonFiniteState>().is_some() {
        tr.step
    } else {
        return e;
    };
    let note = match last {
        None => format!(
            "no checkpoint of this run holds finite numbers before step {failing_step}; \
             nothing was written after the non-finite value"
        ),
        Some((p, s)) if *s == failing_step => {
            let earlier = checkpoint::complete_checkpoints(&tr.out_dir)
                .unwrap_or_default()
                .into_iter()
                .rfind(|f| f.step < *s);
            format!(
                "the last checkpoint, {} (step {s}), holds finite numbers, but its weights produced \
                 this value at the very next step, so resuming from it will stop again; {}",
                p.display(),
                match earlier {
                    Some(f) => format!(
                        "the checkpoint before it is {} (step {}): resume from it with lower learning rates",
                        f.path.display(),
                        f.step
                    ),
                    None => "no earlier checkpoint is kept: start again with lower learning rates".into(),
                }
            )
        }
        Some((p, s)) => format!(
            "the last checkpoint, {} (step {s}), holds finite numbers and every loss up to it was \
             finite; resume from it with lower learning rates",
            p.display()
        ),
    };
    anyhow::anyhow!("{e:#}\n{note}")
}
