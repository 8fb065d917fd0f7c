//! The configs of a pipeline written from memory (`adt init-pipeline --preset tiny |
//! tiny-sd3 | demo`, the same writer as the tiny-random presets' `final/`) against the
//! configs the Python libraries themselves save for those classes
//! (`tests/fixtures/pipeline_configs`, written by
//! `scripts/fixtures/make_pipeline_configs.py` with diffusers 0.42.1 and transformers
//! 5.17.0), key by key:
//!
//! * diffusers components (`model_index.json`, the UNet / transformer / VAE
//!   `config.json`, `scheduler_config.json`): the same keys with the same values, so
//!   diffusers loads them as written (no default filled in: e.g. DDIM's `clip_sample`,
//!   which diffusers would default to true, and a VAE `sample_size` that is not null);
//! * transformers text encoders, whose own files list only non-default keys: the file
//!   over the class defaults (`defaults.json`) gives every key of the full config.

mod common;

use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

fn read(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn obj(v: &Value) -> &Map<String, Value> {
    v.as_object().expect("a JSON object")
}

/// Values equal, numbers compared as numbers (1 == 1.0).
fn same_value(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| same_value(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_value(v, w)))
        }
        _ => a == b,
    }
}

/// Every difference between adt's file and the reference, as lines.
fn diff(ours: &Map<String, Value>, reference: &Map<String, Value>) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in reference {
        match ours.get(k) {
            None => out.push(format!("missing {k} (diffusers writes {v})")),
            Some(o) if !same_value(o, v) => out.push(format!("{k}: {o}, the library writes {v}")),
            _ => {}
        }
    }
    for k in ours.keys() {
        if !reference.contains_key(k) {
            out.push(format!("{k}: not a key of this class"));
        }
    }
    out
}

fn check_pipeline(dir: &Path, reference: &Path) -> usize {
    let mut problems = Vec::new();
    let mut checked = 0;
    let index = read(&dir.join("model_index.json"));
    let want_index = read(&reference.join("model_index.json"));
    for d in diff(obj(&index), obj(&want_index)) {
        problems.push(format!("model_index.json: {d}"));
    }
    checked += 1;
    for (comp, entry) in obj(&index) {
        let Some([lib, _class]) = entry.as_array().map(|a| [a[0].clone(), a[1].clone()]) else {
            continue;
        };
        if lib.is_null() || comp.starts_with("tokenizer") {
            continue;
        }
        let file = if comp == "scheduler" {
            "scheduler_config.json"
        } else {
            "config.json"
        };
        let ours = read(&dir.join(comp).join(file));
        let want = read(&reference.join(comp).join(file));
        let lines = if lib == "diffusers" {
            diff(obj(&ours), obj(&want))
        } else {
            // transformers: the file over the class defaults.
            let mut full = obj(&read(&reference.join(comp).join("defaults.json"))).clone();
            for (k, v) in obj(&ours) {
                full.insert(k.clone(), v.clone());
            }
            diff(&full, obj(&want))
        };
        problems.extend(lines.into_iter().map(|l| format!("{comp}/{file}: {l}")));
        checked += 1;
    }
    assert!(
        problems.is_empty(),
        "{} differs from what the libraries save ({}):\n{}",
        dir.display(),
        reference.display(),
        problems.join("\n")
    );
    checked
}

fn fixture(preset: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pipeline_configs")
        .join(preset)
}

#[test]
fn init_pipeline_configs_are_what_diffusers_saves() {
    for preset in ["tiny", "tiny-sd3", "demo"] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join(preset);
        let status = std::process::Command::new(env!("CARGO_BIN_EXE_adt"))
            .args(["init-pipeline", "--preset", preset, "--seed", "0", "--out"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            status.status.success(),
            "{}",
            String::from_utf8_lossy(&status.stderr)
        );
        let n = check_pipeline(&out, &fixture(preset));
        println!("{preset}: {n} config files identical to the libraries' key by key");
    }
}

/// The tiny-random presets' `final/` (a training run on a pipeline built in memory) is
/// written by the same code: one iteration of each, compared with the same fixtures.
#[test]
fn tiny_random_final_configs_are_what_diffusers_saves() {
    let _guard = common::lock();
    tch::set_num_threads(1);
    for (model, preset) in [("tiny-random", "tiny"), ("tiny-random-sd3", "tiny-sd3")] {
        let dir = tempfile::tempdir().unwrap();
        let model_kv = format!("model.path={model:?}");
        let mut o = vec![
            model_kv.as_str(),
            "train.iterations=1",
            "train.h=1",
            "output.checkpoint_every=0",
        ];
        if preset == "tiny-sd3" {
            o.extend(["sampler.kind=\"flow\"", "sampler.steps=4"]);
        }
        common::run_quiet(common::tiny_config(dir.path(), &o)).unwrap();
        let n = check_pipeline(&dir.path().join("final"), &fixture(preset));
        println!("{model} final/: {n} config files identical to the libraries' key by key");
    }
}
