//! Fault and bad-input hardening of `adt train`: checkpoints are never lost, bad
//! configurations are errors, not panics.

mod common;

use adt::train::checkpoint;
use adt::train::run::{run, RunOptions};
use common::*;
use std::path::Path;

fn opts(resume: Option<Option<&Path>>, overwrite: bool, max: Option<usize>) -> RunOptions {
    RunOptions {
        resume: resume.map(|r| r.map(Path::to_path_buf)),
        max_iterations: max,
        quiet: true,
        overwrite,
    }
}

fn ckpt(dir: &Path, step: usize) -> std::path::PathBuf {
    dir.join("checkpoints").join(format!("step-{step:07}"))
}

fn latest_name(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("checkpoints/latest"))
        .unwrap()
        .trim()
        .to_string()
}

fn err_of<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

/// Defect 1: a new run into a folder that holds checkpoints is refused; with
/// --overwrite it runs, and never prunes the earlier run's checkpoints.
#[test]
fn new_run_over_checkpoints_is_refused_unless_overwrite() {
    let _guard = lock();
    tch::set_num_threads(1);
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let base = ["train.iterations=4", "output.checkpoint_every=2"];
    run(tiny_config(dir, &base), &opts(None, false, None)).unwrap();
    assert!(ckpt(dir, 2).join("state.json").is_file());
    assert!(ckpt(dir, 4).join("state.json").is_file());
    let final_before =
        std::fs::read(dir.join("final/unet/diffusion_pytorch_model.safetensors")).unwrap();

    let again = [
        "train.iterations=2",
        "output.checkpoint_every=1",
        "output.keep_checkpoints=1",
    ];
    let err = err_of(run(tiny_config(dir, &again), &opts(None, false, None)));
    assert!(
        err.contains("--resume") && err.contains("--overwrite"),
        "{err}"
    );
    assert!(err.contains("step-0000004"), "{err}");
    // Nothing was touched.
    assert!(ckpt(dir, 2).join("state.json").is_file());
    assert!(ckpt(dir, 4).join("state.json").is_file());
    assert_eq!(latest_name(dir), "step-0000004");
    assert_eq!(
        std::fs::read(dir.join("final/unet/diffusion_pytorch_model.safetensors")).unwrap(),
        final_before
    );

    // With --overwrite: step-2 is replaced by the new run's, step-4 (another run's) stays.
    let tr = run(tiny_config(dir, &again), &opts(None, true, None)).unwrap();
    assert_eq!(tr.step, 2);
    let new_id = tr.run_id.clone();
    drop(tr);
    assert_eq!(latest_name(dir), "step-0000002");
    assert_eq!(
        checkpoint::read_state(&ckpt(dir, 2)).unwrap().run_id,
        new_id
    );
    assert!(
        !ckpt(dir, 1).exists(),
        "this run's older checkpoint is pruned (keep 1)"
    );
    let old = checkpoint::read_state(&ckpt(dir, 4)).unwrap();
    assert_ne!(old.run_id, new_id, "the earlier run's checkpoint stays");
}

/// Defect 1: resuming from an older checkpoint with keep_checkpoints = 1 used to
/// delete each new checkpoint as soon as it was written (and the older ones).
#[test]
fn pruning_never_removes_the_newest_or_another_runs_checkpoint() {
    let _guard = lock();
    tch::set_num_threads(1);
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let base = [
        "train.iterations=4",
        "output.checkpoint_every=1",
        "output.keep_checkpoints=10",
    ];
    run(tiny_config(dir, &base), &opts(None, false, None)).unwrap();
    for s in 1..=4 {
        assert!(ckpt(dir, s).join("state.json").is_file(), "step {s}");
    }
    let keep1 = [
        "train.iterations=4",
        "output.checkpoint_every=1",
        "output.keep_checkpoints=1",
    ];
    let from = ckpt(dir, 2);
    let err = err_of(run(
        tiny_config(dir, &keep1),
        &opts(Some(Some(&from)), false, None),
    ));
    assert!(
        err.contains("step-0000003") && err.contains("--overwrite"),
        "{err}"
    );

    let tr = run(
        tiny_config(dir, &keep1),
        &opts(Some(Some(&from)), true, None),
    )
    .unwrap();
    assert_eq!(tr.step, 4);
    drop(tr);
    assert_eq!(latest_name(dir), "step-0000004");
    assert!(
        ckpt(dir, 4).join("state.json").is_file(),
        "the newest checkpoint is kept"
    );
    assert!(
        !ckpt(dir, 3).exists(),
        "this run's older checkpoint is pruned"
    );
    for s in [1, 2] {
        assert!(
            ckpt(dir, s).join("state.json").is_file(),
            "step {s} of the earlier run was deleted"
        );
    }
    // The resumed checkpoint is loadable.
    let tr = run(
        tiny_config(dir, &["train.iterations=5", "output.checkpoint_every=1"]),
        &opts(Some(None), false, None),
    )
    .unwrap();
    assert_eq!(tr.step, 5);
}

/// Ordinary pruning within one run still keeps the newest `keep_checkpoints`.
#[test]
fn pruning_keeps_the_newest_of_the_run() {
    let _guard = lock();
    tch::set_num_threads(1);
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let c = [
        "train.iterations=4",
        "output.checkpoint_every=1",
        "output.keep_checkpoints=2",
    ];
    run(tiny_config(dir, &c), &opts(None, false, Some(2))).unwrap();
    run(tiny_config(dir, &c), &opts(Some(None), false, None)).unwrap();
    let left: Vec<String> = checkpoint::step_entries(dir)
        .unwrap()
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["step-0000003", "step-0000004"]);
}

/// Defect 2: a missing `latest` falls back to the newest complete checkpoint.
#[test]
fn missing_latest_falls_back_to_the_newest_complete_checkpoint() {
    let _guard = lock();
    tch::set_num_threads(1);
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let c = ["train.iterations=6", "output.checkpoint_every=2"];
    run(tiny_config(dir, &c), &opts(None, false, Some(4))).unwrap();
    std::fs::remove_file(dir.join("checkpoints/latest")).unwrap();
    // An incomplete folder (no state.json) is not a candidate.
    std::fs::create_dir_all(ckpt(dir, 5).join("unet")).unwrap();
    let (found, note) = checkpoint::find_resume(dir).unwrap().unwrap();
    assert_eq!(found, ckpt(dir, 4));
    let note = note.expect("the fallback is reported");
    assert!(
        note.contains("missing") && note.contains("step-0000004"),
        "{note}"
    );
    let tr = run(tiny_config(dir, &c), &opts(Some(None), false, Some(1))).unwrap();
    assert_eq!(tr.step, 5, "resumed at step 4, ran one iteration");
    drop(tr);
    assert!(ckpt(dir, 2).join("state.json").is_file());
    assert!(ckpt(dir, 4).join("state.json").is_file());
}

/// Defect 3: leftover temporary checkpoint folders are removed at start, and I/O
/// errors name the path.
#[test]
fn leftover_temporaries_are_removed_and_io_errors_name_paths() {
    let _guard = lock();
    tch::set_num_threads(1);
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let tmp = dir.join("checkpoints/.tmp-step-0000002-4242");
    std::fs::create_dir_all(tmp.join("unet")).unwrap();
    std::fs::write(tmp.join("unet/config.json"), "{").unwrap();
    let c = ["train.iterations=1", "output.checkpoint_every=0"];
    run(tiny_config(dir, &c), &opts(None, false, None)).unwrap();
    assert!(!tmp.exists(), "leftover {} not removed", tmp.display());

    let d2 = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d2.path().join("config.toml")).unwrap();
    let err = err_of(run(tiny_config(d2.path(), &c), &opts(None, false, None)));
    assert!(err.contains("config.toml"), "{err}");
}

/// Defect 4: a checkpoint with a NaN anywhere in the training state is refused,
/// naming the tensor; nothing is left half-written.
#[test]
fn a_nonfinite_state_is_never_checkpointed() {
    let _guard = lock();
    tch::set_num_threads(1);
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let c = ["train.iterations=1", "output.checkpoint_every=0"];
    let mut tr = run(tiny_config(dir, &c), &opts(None, false, None)).unwrap();
    let mut vars: Vec<(String, tch::Tensor)> =
        tr.pipe.backbone_vs().variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let (name, t) = &vars[3];
    tch::no_grad(|| {
        let _ = t.shallow_clone().fill_(f64::NAN);
    });
    tr.step = 2;
    let err = err_of(checkpoint::save(&tr));
    assert!(err.contains(name.as_str()) && err.contains("NaN"), "{err}");
    assert!(!ckpt(dir, 2).exists());
    let leftovers = std::fs::read_dir(dir.join("checkpoints"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
        .count();
    assert_eq!(leftovers, 0);
    assert_eq!(latest_name(dir), "step-0000001");
}

/// Defect 4: a diverging run names the last checkpoint with finite numbers, and
/// every checkpoint it left holds finite numbers.
#[test]
fn a_diverging_run_reports_the_last_finite_checkpoint() {
    let _guard = lock();
    tch::set_num_threads(1);
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let c = [
        "train.mode=ft",
        "train.iterations=50",
        "train.lr_g=1e30",
        "train.warmup_g=0",
        "train.grad_clip=0",
        "output.checkpoint_every=1",
        "output.keep_checkpoints=50",
    ];
    let err = err_of(run(tiny_config(dir, &c), &opts(None, false, None)));
    assert!(!err.contains("is intact"), "{err}");
    let found = checkpoint::complete_checkpoints(dir).unwrap();
    match found.last() {
        Some(f) => assert!(err.contains(&f.path.display().to_string()), "{err}"),
        None => assert!(err.contains("no checkpoint"), "{err}"),
    }
    for f in &found {
        for file in [
            "unet/diffusion_pytorch_model.safetensors",
            "optimizer.safetensors",
        ] {
            for (k, t) in adt::weights::read_safetensors(&f.path.join(file)).unwrap() {
                if t.is_floating_point() {
                    assert!(
                        t.isfinite().all().int64_value(&[]) != 0,
                        "{}/{file}: {k} is not finite",
                        f.path.display()
                    );
                }
            }
        }
    }
}

/// Defect 5: a resumed run's metrics.jsonl has each step once.
#[test]
fn resumed_metrics_have_each_step_once() {
    let _guard = lock();
    tch::set_num_threads(1);
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let c = ["train.iterations=6", "output.checkpoint_every=3"];
    run(tiny_config(dir, &c), &opts(None, false, Some(5))).unwrap();
    // A line torn by a kill.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join("metrics.jsonl"))
        .unwrap();
    std::io::Write::write_all(&mut f, b"{\"step\": 5, \"loss").unwrap();
    drop(f);
    run(tiny_config(dir, &c), &opts(Some(None), false, None)).unwrap();
    let steps: Vec<u64> = read_metrics(dir)
        .iter()
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [0, 1, 2, 3, 4, 5]);
}

/// A resumed run refuses a changed mode and reports the changed fields.
#[test]
fn resume_refuses_a_changed_mode() {
    let _guard = lock();
    tch::set_num_threads(1);
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let c = ["train.iterations=2", "output.checkpoint_every=1"];
    run(tiny_config(dir, &c), &opts(None, false, Some(1))).unwrap();
    let mut ft = c.to_vec();
    ft.push("train.mode=ft");
    let err = err_of(run(tiny_config(dir, &ft), &opts(Some(None), false, None)));
    assert!(err.contains("train.mode"), "{err}");
    let state = checkpoint::read_state(&ckpt(dir, 1)).unwrap();
    let mut b4 = c.to_vec();
    b4.push("train.batch_size=4");
    let now = tiny_config(dir, &b4).to_toml().unwrap();
    let diffs = checkpoint::config_differences(&state.config, &now).unwrap();
    // (data.path differs too: the checkpoint records the generated folder.)
    let train: Vec<_> = diffs
        .iter()
        .filter(|(k, _, _)| k.starts_with("train."))
        .collect();
    assert_eq!(
        train,
        [&(
            "train.batch_size".to_string(),
            "2".to_string(),
            "4".to_string()
        )],
        "{diffs:?}"
    );
}

/// Values that used to panic are configuration errors naming the key.
#[test]
fn bad_values_are_config_errors() {
    use adt::train::config::Config;
    for (set, key) in [
        ("disc.resolution=7", "disc.resolution"),
        ("disc.resolution=0", "disc.resolution"),
        ("disc.resolution=-3", "disc.resolution"),
        ("train.k=0", "train.k"),
    ] {
        let e = format!("{:#}", Config::load(None, &[set.to_string()]).unwrap_err());
        assert!(e.contains(key), "{set}: {e}");
    }
    if !tch::Cuda::is_available() {
        let c = Config::load(None, &["train.device=cuda".to_string()]).unwrap();
        let e = format!("{:#}", c.check_device().unwrap_err());
        assert!(e.contains("train.device") && e.contains("CUDA"), "{e}");
        let d = tempfile::tempdir().unwrap();
        let e = err_of(adt::train::run::run(
            tiny_config(d.path(), &["train.device=cuda"]),
            &opts(None, false, None),
        ));
        assert!(e.contains("train.device"), "{e}");
    }
}

fn adt_cmd(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_adt"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `adt sample` refuses a non-finite guidance scale and non-finite outputs (NaN
/// weights), naming the model, instead of writing black images.
#[test]
fn sample_refuses_nonfinite_outputs() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("pipe");
    let m = model.to_str().unwrap();
    let (ok, err) = adt_cmd(&["init-pipeline", "--preset", "tiny", "--out", m]);
    assert!(ok, "{err}");
    let out = d.path().join("samples");
    let o = out.to_str().unwrap();
    let base = [
        "sample", "--model", m, "--prompt", "a cat", "--steps", "2", "--out", o,
    ];
    let (ok, err) = adt_cmd(&[&base[..], &["--cfg", "nan"]].concat());
    assert!(!ok && err.contains("--cfg NaN"), "{err}");
    let (ok, err) = adt_cmd(&[&base[..], &["--cfg", "2"]].concat());
    assert!(ok, "{err}");
    // NaN weights.
    let f = model.join("unet/diffusion_pytorch_model.safetensors");
    let mut ts = adt::weights::read_safetensors(&f).unwrap();
    let _ = ts[0].1.fill_(f64::NAN);
    adt::weights::save_safetensors(&ts, &f, None, None).unwrap();
    std::fs::remove_dir_all(&out).unwrap();
    let (ok, err) = adt_cmd(&[&base[..], &["--cfg", "2"]].concat());
    assert!(!ok, "{err}");
    assert!(err.contains(m) && err.contains("NaN"), "{err}");
    let pngs = std::fs::read_dir(&out).map(|r| r.count()).unwrap_or(0);
    assert_eq!(pngs, 0, "images were written");
}

/// `adt inspect` of a truncated safetensors file fails naming it and the offsets.
#[test]
fn inspect_checks_data_offsets() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("w.safetensors");
    let t = tch::Tensor::ones([64, 64], (tch::Kind::Float, tch::Device::Cpu));
    adt::weights::save_safetensors(&[("w".to_string(), t)], &p, None, None).unwrap();
    assert!(adt::inspect::inspect(&p).is_ok());
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() - 100]).unwrap();
    let e = format!("{:#}", adt::inspect::inspect(&p).unwrap_err());
    assert!(
        e.contains("w.safetensors") && e.contains("data_offsets"),
        "{e}"
    );
}

/// `adt eval` warns below the feature dimension and says what count to use.
#[test]
fn eval_warns_about_small_samples() {
    use adt::eval::metrics::sample_count_warnings;
    let w = sample_count_warnings(2, 300, 1280, 1000);
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(
        w[0].contains("FD from 2 images") && w[0].contains("at least 1280"),
        "{w:?}"
    );
    assert!(sample_count_warnings(2000, 3000, 1280, 1000).is_empty());
}

/// A feature map smaller than the head's circular padding is an error naming the
/// cause (it panicked in libtorch: EfficientNet features at disc.resolution = 32).
#[test]
fn a_too_small_feature_map_is_an_error() {
    use adt::disc::heads::{Head, HeadConfig, Mode};
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let head = Head::new(
        &vs.root(),
        &HeadConfig {
            in_channels: 3,
            channels: 4,
            kernel: 9,
            out_channels: Some(1),
            spectral_norm: true,
            virtual_batch: 8,
            bn_eps: 1e-5,
        },
    )
    .unwrap();
    let x = tch::Tensor::randn([2, 3, 1], (tch::Kind::Float, tch::Device::Cpu));
    let e = format!("{:#}", head.forward(&x, Mode::Train).unwrap_err());
    assert!(e.contains("disc.resolution"), "{e}");
    let x = tch::Tensor::randn([2, 3, 4], (tch::Kind::Float, tch::Device::Cpu));
    assert!(head.forward(&x, Mode::Train).is_ok());
}
