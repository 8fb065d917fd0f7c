//! Checkpoints: the backbone (UNet or SD3 transformer) in the diffusers layout plus
//! the whole trainer state (both optimisers, discriminator heads with their spectral-norm state and EMA
//! duals, generator EMA, data position, step counters).
//!
//! A checkpoint is written into a temporary folder and renamed into place, then the
//! `latest` pointer is replaced atomically; a kill at any moment leaves the previous
//! checkpoint intact and `latest` pointing at a complete one.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

use crate::data::DataState;
use crate::train::adt::Trainer;
use crate::weights::{atomic_write, read_safetensors, save_safetensors};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    pub step: usize,
    pub g_steps: usize,
    pub data: DataState,
    /// The effective configuration the run was started with.
    pub config: String,
}

pub fn checkpoints_dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

/// Save a checkpoint of `tr` as `checkpoints/step-NNNNNNN`; keep the newest `keep`.
pub fn save(tr: &Trainer) -> Result<PathBuf> {
    let root = checkpoints_dir(&tr.out_dir);
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let name = format!("step-{:07}", tr.step);
    let final_dir = root.join(&name);
    let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    let backbone = &tr.pipe.backbone;
    backbone.save_pretrained(&tmp.join(backbone.folder()), tch::Kind::Float)?;
    let mut tensors: Vec<(String, Tensor)> = tr.opt_g.state("opt_g");
    if let Some(o) = &tr.opt_d {
        tensors.extend(o.state("opt_d"));
    }
    if let Some(ema) = &tr.ema {
        tensors.extend(
            ema.iter()
                .map(|(k, t)| (format!("ema.{k}"), t.shallow_clone())),
        );
    }
    save_safetensors(&tensors, &tmp.join("optimizer.safetensors"), None, None)?;
    if let Some(d) = &tr.disc {
        d.save(&tmp.join("discriminator"))?;
    }
    let state = TrainerState {
        step: tr.step,
        g_steps: tr.g_steps,
        data: tr
            .loader
            .as_ref()
            .context("checkpointing a trainer without data")?
            .state(),
        config: tr.cfg.to_toml()?,
    };
    atomic_write(
        &tmp.join("state.json"),
        serde_json::to_string_pretty(&state)?.as_bytes(),
    )?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)?;
    }
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("renaming {} into place", tmp.display()))?;
    atomic_write(&root.join("latest"), name.as_bytes())?;
    // Prune old checkpoints.
    let mut all: Vec<PathBuf> = std::fs::read_dir(&root)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .map(|n| n.starts_with("step-"))
                .unwrap_or(false)
        })
        .collect();
    all.sort();
    let keep = tr.cfg.output.keep_checkpoints.max(1);
    if all.len() > keep {
        for p in &all[..all.len() - keep] {
            let _ = std::fs::remove_dir_all(p);
        }
    }
    Ok(final_dir)
}

/// The checkpoint folder `latest` points at, if any.
pub fn latest(out: &Path) -> Result<Option<PathBuf>> {
    let root = checkpoints_dir(out);
    let ptr = root.join("latest");
    if !ptr.is_file() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&ptr)?;
    let dir = root.join(name.trim());
    if !dir.join("state.json").is_file() {
        bail!(
            "{}: points at {}, which is not a complete checkpoint",
            ptr.display(),
            dir.display()
        );
    }
    Ok(Some(dir))
}

/// Restore the trainer from a checkpoint folder.
pub fn restore(tr: &mut Trainer, dir: &Path) -> Result<()> {
    let text = std::fs::read_to_string(dir.join("state.json"))
        .with_context(|| format!("reading {}", dir.join("state.json").display()))?;
    let state: TrainerState = serde_json::from_str(&text)
        .with_context(|| format!("parsing {}/state.json", dir.display()))?;
    // The backbone weights (`unet/` or `transformer/`).
    let folder = tr.pipe.backbone.folder();
    let files = vec![dir.join(folder).join("diffusion_pytorch_model.safetensors")];
    crate::weights::load_into(tr.pipe.backbone_vs_mut(), &files, &Default::default())?;
    let opt: HashMap<String, Tensor> = read_safetensors(&dir.join("optimizer.safetensors"))?
        .into_iter()
        .collect();
    tr.opt_g.load_state("opt_g", &opt)?;
    if let Some(o) = &mut tr.opt_d {
        o.load_state("opt_d", &opt)?;
    }
    if let Some(ema) = &mut tr.ema {
        tch::no_grad(|| -> Result<()> {
            for (k, t) in ema.iter_mut() {
                let src = opt
                    .get(&format!("ema.{k}"))
                    .with_context(|| format!("checkpoint has no EMA weight {k}"))?;
                t.copy_(src);
            }
            Ok(())
        })?;
    }
    if let Some(d) = &mut tr.disc {
        d.load_state(&dir.join("discriminator"))?;
    }
    tr.loader
        .as_mut()
        .context("restoring a trainer without data")?
        .restore(&state.data)?;
    tr.step = state.step;
    tr.g_steps = state.g_steps;
    Ok(())
}
