//! Helpers shared by the test binaries (`mod common;` in each).
#![allow(dead_code)]

pub mod fixtures;
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

/// Two trainers hold bit-identical state: step counters, generator weights, both
/// optimisers' moments and step counts, the generator EMA, and the discriminator's
/// trainable variables, BatchNorm statistics and EMA duals.
pub fn assert_same_state(a: &Trainer, b: &Trainer) {
    assert_eq!((a.step, a.g_steps), (b.step, b.g_steps), "step counters");
    let same = |what: &str, x: Vec<(String, Tensor)>, y: Vec<(String, Tensor)>| {
        let names = |v: &[(String, Tensor)]| v.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
        assert_eq!(names(&x), names(&y), "{what}: names differ");
        assert!(!x.is_empty(), "{what}: nothing to compare");
        for ((k, s), (_, t)) in x.iter().zip(&y) {
            assert!(s.equal(t), "{what}: {k} differs");
        }
        x.len()
    };
    let sorted = |mut v: Vec<(String, Tensor)>| {
        v.sort_by(|p, q| p.0.cmp(&q.0));
        v
    };
    let mut n = same(
        "generator",
        sorted_vars(a.pipe.backbone_vs()),
        sorted_vars(b.pipe.backbone_vs()),
    );
    n += same(
        "generator optimiser",
        sorted(a.opt_g.state("g")),
        sorted(b.opt_g.state("g")),
    );
    match (&a.opt_d, &b.opt_d) {
        (Some(x), Some(y)) => {
            n += same(
                "discriminator optimiser",
                sorted(x.state("d")),
                sorted(y.state("d")),
            )
        }
        (None, None) => {}
        _ => panic!("discriminator optimiser on one side only"),
    }
    match (&a.ema, &b.ema) {
        (Some(x), Some(y)) => {
            n += same(
                "generator EMA",
                sorted(
                    x.iter()
                        .map(|(k, t)| (k.clone(), t.shallow_clone()))
                        .collect(),
                ),
                sorted(
                    y.iter()
                        .map(|(k, t)| (k.clone(), t.shallow_clone()))
                        .collect(),
                ),
            )
        }
        (None, None) => {}
        _ => panic!("generator EMA on one side only"),
    }
    match (&a.disc, &b.disc) {
        (Some(x), Some(y)) => {
            n += same("discriminator", sorted_vars(&x.vs), sorted_vars(&y.vs));
            let (dx, dy) = (sorted_vars(&x.dual_vs), sorted_vars(&y.dual_vs));
            if !dx.is_empty() || !dy.is_empty() {
                n += same("discriminator EMA duals", dx, dy);
            }
        }
        (None, None) => {}
        _ => panic!("discriminator on one side only"),
    }
    println!("{n} state tensors bit-identical");
}

/// A run of `overrides` (6 iterations with a checkpoint at 3) done whole, and done
/// again stopped after 3 iterations and resumed from its checkpoint: returns both
/// trainers (whole, resumed) after checking their step counters and that they end in
/// bit-identical state.
pub fn whole_and_resumed(overrides: &[&str]) -> (Trainer, Trainer) {
    let opts = |max: Option<usize>, resume: bool| RunOptions {
        quiet: true,
        max_iterations: max,
        resume: resume.then_some(None),
        ..Default::default()
    };
    let a = tempfile::tempdir().unwrap();
    let whole = run(tiny_config(a.path(), overrides), &opts(None, false)).unwrap();
    let b = tempfile::tempdir().unwrap();
    let tr = run(tiny_config(b.path(), overrides), &opts(Some(3), false)).unwrap();
    assert_eq!(tr.step, 3);
    drop(tr);
    let tr = run(tiny_config(b.path(), overrides), &opts(None, true)).unwrap();
    assert_eq!(tr.step, 6);
    assert_same_state(&whole, &tr);
    (whole, tr)
}
