//! `adt train`: the training loop around [`Trainer::iteration`] with progress,
//! metrics, periodic sample grids and checkpoints, resume, and the final save.

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

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
                cfg.train.resolution as u32,
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
}

/// Train to the configured number of iterations; returns the trainer.
pub fn run(mut cfg: Config, opts: &RunOptions) -> Result<Trainer> {
    resolve_synthetic(&mut cfg)?;
    let mut tr = Trainer::new(cfg.clone())?;
    if let Some(which) = &opts.resume {
        let dir = match which {
            Some(d) => Some(d.clone()),
            None => checkpoint::latest(&tr.out_dir)?,
        };
        match dir {
            Some(d) => {
                checkpoint::restore(&mut tr, &d)
                    .with_context(|| format!("resuming from {}", d.display()))?;
                tracing::info!("resumed from {} at step {}", d.display(), tr.step);
            }
            None => tracing::warn!(
                "--resume: no checkpoint in {}, starting fresh",
                tr.out_dir.display()
            ),
        }
    }
    let total = cfg.train.iterations;
    let pb = if opts.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(total as u64)
    };
    pb.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}, {per_sec}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_position(tr.step as u64);
    let mut done = 0;
    let started = std::time::Instant::now();
    let mut out_of_time = false;
    while tr.step < total {
        if let Some(limit) = cfg.train.time_limit_minutes {
            if started.elapsed().as_secs_f64() > limit * 60.0 {
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
        let log = tr.iteration()?;
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
        {
            let imgs = crate::sample::generate(
                &tr.pipe,
                &tr.plan,
                &cfg.output.validation_prompts,
                cfg.sampler.cfg,
                cfg.train.seed as i64,
                cfg.train.resolution,
            )?;
            crate::sample::save_grid(
                &imgs,
                &tr.out_dir.join("samples").join(format!("step-{s:07}.png")),
                4,
            )?;
        }
        if cfg.output.checkpoint_every > 0 && s % cfg.output.checkpoint_every == 0 && s < total {
            checkpoint::save(&tr)?;
        }
    }
    pb.finish();
    if tr.step >= total || out_of_time {
        let out = cfg
            .model
            .save_to
            .clone()
            .unwrap_or_else(|| tr.out_dir.join("final"));
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
    Ok(tr)
}
