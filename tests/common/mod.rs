//! Helpers shared by the test binaries (`mod common;` in each).
#![allow(dead_code)]

pub mod inputs;

use adt::train::adt::Trainer;
use adt::train::config::Config;
use adt::train::run::{run, RunOptions};
use std::path::Path;
use std::sync::Mutex;
use tch::Tensor;

/// libtorch's random generator is global to the process: tests that seed it run one
/// at a time.
static RNG: Mutex<()> = Mutex::new(());

pub fn lock() -> std::sync::MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

/// `examples/tiny-random.toml` writing into `dir`, without sample grids, one loader
/// worker, then `overrides` (`key=value`).
pub fn tiny_config(dir: &Path, overrides: &[&str]) -> Config {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tiny-random.toml");
    let mut o: Vec<String> = vec![
        format!("output.dir={:?}", dir.display().to_string()),
        "output.sample_every=0".into(),
        "data.num_workers=1".into(),
    ];
    o.extend(overrides.iter().map(|s| s.to_string()));
    Config::load(Some(&example), &o).unwrap()
}

/// A training run without progress output.
pub fn run_quiet(cfg: Config) -> anyhow::Result<Trainer> {
    run(
        cfg,
        &RunOptions {
            quiet: true,
            ..Default::default()
        },
    )
}

/// The lines of a run's metrics.jsonl.
pub fn read_metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The variables of a VarStore, sorted by name.
pub fn sorted_vars(vs: &tch::nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}
