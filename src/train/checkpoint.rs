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
    /// Identifies the run (kept across resumes): pruning removes only checkpoints
    /// of the run that wrote them.
    #[serde(default)]
    pub run_id: String,
}

pub fn checkpoints_dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

/// The step of a checkpoint folder name `step-NNNNNNN`.
fn step_of(name: &str) -> Option<usize> {
    name.strip_prefix("step-")?.parse().ok()
}

/// A complete checkpoint found in an output folder.
#[derive(Debug, Clone)]
pub struct Found {
    pub path: PathBuf,
    pub step: usize,
    /// The run that wrote it (empty for checkpoints older than run ids).
    pub run_id: String,
}

/// Read the `state.json` of a checkpoint folder.
pub fn read_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join("state.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Every `step-*` entry of `out/checkpoints`, complete or not, sorted by name.
pub fn step_entries(out: &Path) -> Result<Vec<PathBuf>> {
    let root = checkpoints_dir(out);
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let mut all: Vec<PathBuf> = std::fs::read_dir(&root)
        .with_context(|| format!("listing {}", root.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(step_of)
                .is_some()
        })
        .collect();
    all.sort();
    Ok(all)
}

/// The complete checkpoints (a `step-*` folder whose `state.json` parses), by step.
pub fn complete_checkpoints(out: &Path) -> Result<Vec<Found>> {
    let mut found = Vec::new();
    for path in step_entries(out)? {
        if let Ok(state) = read_state(&path) {
            found.push(Found {
                path,
                step: state.step,
                run_id: state.run_id,
            });
        }
    }
    found.sort_by_key(|f| f.step);
    Ok(found)
}

/// Remove the temporary folders (`.tmp-step-*`) that a killed or failed save left
/// behind; returns what was removed.
pub fn clean_temporaries(out: &Path) -> Result<Vec<PathBuf>> {
    let root = checkpoints_dir(out);
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let mut removed = Vec::new();
    for e in std::fs::read_dir(&root).with_context(|| format!("listing {}", root.display()))? {
        let e = e.with_context(|| format!("listing {}", root.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with(".tmp-step-") && !is_atomic_temp(&name) {
            continue;
        }
        let p = e.path();
        let r = if p.is_dir() && !p.is_symlink() {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.with_context(|| format!("removing the leftover temporary checkpoint {}", p.display()))?;
        removed.push(p);
    }
    Ok(removed)
}

/// A temporary file of [`atomic_write`] (`.NAME.tmp-PID`).
fn is_atomic_temp(name: &str) -> bool {
    name.starts_with('.')
        && name
            .rsplit_once(".tmp-")
            .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

/// Remove the temporary files of interrupted atomic writes (`.NAME.tmp-PID`) under
/// `dir` (a pipeline folder being rewritten); returns what was removed.
pub fn clean_atomic_temps(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    if !dir.is_dir() {
        return Ok(removed);
    }
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e.with_context(|| format!("listing {}", dir.display()))?;
        let p = e.path();
        let ft = e
            .file_type()
            .with_context(|| format!("reading {}", p.display()))?;
        if ft.is_dir() {
            removed.extend(clean_atomic_temps(&p)?);
        } else if ft.is_file() && is_atomic_temp(&e.file_name().to_string_lossy()) {
            std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            removed.push(p);
        }
    }
    Ok(removed)
}

/// The tensors of a trainer that go into a checkpoint, by name.
fn state_tensors(tr: &Trainer) -> Vec<(String, Tensor)> {
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
    tensors
}

/// The first tensor of the training state (generator weights, optimiser moments,
/// EMA, discriminator) holding a NaN or an infinity, by name.
pub fn first_nonfinite(tr: &Trainer) -> Option<String> {
    let finite = |t: &Tensor| -> bool {
        if !t.is_floating_point() {
            return true;
        }
        tch::no_grad(|| t.isfinite().all().int64_value(&[]) != 0)
    };
    let mut vars: Vec<(String, Tensor)> = tr.pipe.backbone_vs().variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (k, t) in &vars {
        if !finite(t) {
            return Some(format!("{} weight {k}", tr.pipe.backbone.folder()));
        }
    }
    for (k, t) in state_tensors(tr) {
        if !finite(&t) {
            return Some(format!("optimiser/EMA tensor {k}"));
        }
    }
    if let Some(d) = &tr.disc {
        for (prefix, vs) in [("discriminator", &d.vs), ("discriminator dual", &d.dual_vs)] {
            let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
            vars.sort_by(|a, b| a.0.cmp(&b.0));
            for (k, t) in &vars {
                if !finite(t) {
                    return Some(format!("{prefix} tensor {k}"));
                }
            }
        }
    }
    None
}

/// Save a checkpoint of `tr` as `checkpoints/step-NNNNNNN`.
///
/// The training state is checked first: a NaN or infinity anywhere refuses the
/// checkpoint (the error names the tensor), so every checkpoint written holds finite
/// numbers. After the save, older checkpoints of this run (same run id) beyond the
/// newest `output.keep_checkpoints` are removed; the one just written and
/// checkpoints of other runs are never removed.
pub fn save(tr: &Trainer) -> Result<PathBuf> {
    if let Some(bad) = first_nonfinite(tr) {
        bail!(NonFiniteState {
            step: tr.step,
            what: bad,
        });
    }
    let root = checkpoints_dir(&tr.out_dir);
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let name = format!("step-{:07}", tr.step);
    let final_dir = root.join(&name);
    let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let r = write_into(tr, &tmp);
    if let Err(e) = r {
        // Do not leave a half-written folder behind (a full disk, for one).
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!("writing checkpoint {}", final_dir.display())));
    }
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)
            .with_context(|| format!("replacing {}", final_dir.display()))?;
    }
    std::fs::rename(&tmp, &final_dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), final_dir.display()))?;
    atomic_write(&root.join("latest"), name.as_bytes())?;
    prune(tr, &final_dir)?;
    Ok(final_dir)
}

fn write_into(tr: &Trainer, tmp: &Path) -> Result<()> {
    let backbone = &tr.pipe.backbone;
    backbone.save_pretrained(&tmp.join(backbone.folder()), tch::Kind::Float)?;
    save_safetensors(
        &state_tensors(tr),
        &tmp.join("optimizer.safetensors"),
        None,
        None,
    )?;
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
        run_id: tr.run_id.clone(),
    };
    atomic_write(
        &tmp.join("state.json"),
        serde_json::to_string_pretty(&state)?.as_bytes(),
    )
}

/// Remove this run's checkpoints older than the newest `keep` (never `newest`).
fn prune(tr: &Trainer, newest: &Path) -> Result<()> {
    let keep = tr.cfg.output.keep_checkpoints.max(1);
    let ours: Vec<Found> = complete_checkpoints(&tr.out_dir)?
        .into_iter()
        .filter(|f| f.run_id == tr.run_id && f.step < tr.step && f.path != newest)
        .collect();
    // The newest is one of the `keep`.
    let n_old = keep - 1;
    if ours.len() > n_old {
        for f in &ours[..ours.len() - n_old] {
            std::fs::remove_dir_all(&f.path)
                .with_context(|| format!("removing old checkpoint {}", f.path.display()))?;
        }
    }
    Ok(())
}

/// A NaN or infinity in the training state: the checkpoint is not written.
#[derive(Debug)]
pub struct NonFiniteState {
    pub step: usize,
    pub what: String,
}

impl std::fmt::Display for NonFiniteState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "step {}: {} holds a NaN or an infinity; the checkpoint of this step was not written",
            self.step, self.what
        )
    }
}

impl std::error::Error for NonFiniteState {}

/// The checkpoint folder `latest` points at, if any.
pub fn latest(out: &Path) -> Result<Option<PathBuf>> {
    let root = checkpoints_dir(out);
    let ptr = root.join("latest");
    if !ptr.is_file() {
        return Ok(None);
    }
    let name =
        std::fs::read_to_string(&ptr).with_context(|| format!("reading {}", ptr.display()))?;
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

/// The checkpoint `--resume` (without a folder) continues from, and a note when it
/// is not simply the one `latest` points at: `latest` missing, unreadable or
/// pointing at an incomplete folder falls back to the newest complete `step-*`; a
/// newer complete checkpoint of the same run than `latest` (a stop between the
/// rename and the pointer update) is preferred.
pub fn find_resume(out: &Path) -> Result<Option<(PathBuf, Option<String>)>> {
    let all = complete_checkpoints(out)?;
    let ptr = checkpoints_dir(out).join("latest");
    let pointed = if ptr.is_file() {
        match std::fs::read_to_string(&ptr) {
            Ok(name) => {
                let dir = checkpoints_dir(out).join(name.trim());
                match all.iter().find(|f| f.path == dir) {
                    Some(f) => Ok(f.clone()),
                    None => Err(format!(
                        "{} points at {}, which is not a complete checkpoint",
                        ptr.display(),
                        dir.display()
                    )),
                }
            }
            Err(e) => Err(format!("{} is unreadable ({e})", ptr.display())),
        }
    } else {
        Err(format!("{} is missing", ptr.display()))
    };
    match pointed {
        Ok(p) => {
            let newer = all
                .iter()
                .rfind(|f| f.run_id == p.run_id && f.step > p.step);
            Ok(Some(match newer {
                Some(n) => (
                    n.path.clone(),
                    Some(format!(
                        "{} points at {}, but {} of the same run is newer and complete; resuming from it",
                        ptr.display(),
                        p.path.display(),
                        n.path.display()
                    )),
                ),
                None => (p.path, None),
            }))
        }
        Err(why) => Ok(all.last().map(|f| {
            (
                f.path.clone(),
                Some(format!(
                    "{why}; resuming from the newest complete checkpoint, {}",
                    f.path.display()
                )),
            )
        })),
    }
}

/// Restore the trainer from a checkpoint folder.
pub fn restore(tr: &mut Trainer, dir: &Path) -> Result<()> {
    let state = read_state(dir)?;
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

/// The fields (dotted keys) whose values differ between two effective
/// configurations (TOML text): `(key, old value, new value)`, "(unset)" for a key
/// only one side has.
pub fn config_differences(old: &str, new: &str) -> Result<Vec<(String, String, String)>> {
    fn flatten(
        prefix: &str,
        v: &toml::Value,
        out: &mut std::collections::BTreeMap<String, String>,
    ) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flatten(&key, v, out);
                }
            }
            v => {
                out.insert(prefix.to_string(), v.to_string());
            }
        }
    }
    let parse = |s: &str| -> Result<std::collections::BTreeMap<String, String>> {
        let t: toml::Table = s.parse().context("parsing a configuration")?;
        let mut m = Default::default();
        flatten("", &toml::Value::Table(t), &mut m);
        Ok(m)
    };
    let (a, b) = (parse(old)?, parse(new)?);
    let unset = || "(unset)".to_string();
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    Ok(keys
        .into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| {
            (
                k.clone(),
                a.get(k).cloned().unwrap_or_else(unset),
                b.get(k).cloned().unwrap_or_else(unset),
            )
        })
        .collect())
}
