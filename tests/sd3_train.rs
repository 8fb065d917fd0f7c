//! SD3 (flow matching) in the pipeline, the trainer and the sampler, on tiny random
//! models of the real architectures (CPU).

use adt::models::pipeline::{Backbone, Family, Pipeline, PipelineOptions, RandomSpec};
use adt::models::sd3_text::Sd3TextOptions;
use adt::schedule::{Plan, SamplerKind, ScheduleConfig};
use adt::train::adt::{flow_training_sigma, Trainer};
use adt::train::config::Config;
use adt::train::run::{run, RunOptions};
use std::path::Path;
use std::sync::Mutex;
use tch::{Device, Kind, Tensor};

/// libtorch's random generator is global to the process: tests that seed it run one
/// at a time.
static RNG: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

fn sd3_config(dir: &Path, overrides: &[&str]) -> Config {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tiny-random.toml");
    let mut o: Vec<String> = vec![
        format!("output.dir={:?}", dir.display().to_string()),
        "model.path=\"tiny-random-sd3\"".into(),
        "sampler.kind=\"flow\"".into(),
        "sampler.steps=4".into(),
        "output.sample_every=0".into(),
        "data.num_workers=1".into(),
    ];
    o.extend(overrides.iter().map(|s| s.to_string()));
    Config::load(Some(&example), &o).unwrap()
}

fn read_metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn sorted_vars(vs: &tch::nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

fn prompts() -> Vec<String> {
    vec![
        "a red circle on a blue background".to_string(),
        "a green square".to_string(),
    ]
}

/// The flow-matching FT draw uses diffusers' training sigmas, (i + 1) / T shifted
/// once. Cross-check with the sampler, whose inference grid runs from the largest to
/// the smallest training sigma and is shifted a second time (as diffusers does).
#[test]
fn flow_training_sigmas_match_the_shifted_table() {
    let s = ScheduleConfig::sd3();
    let top = flow_training_sigma(&s, s.num_train_timesteps - 1);
    assert_eq!(top, 1.0);
    let low = flow_training_sigma(&s, 0);
    // shift 3 at 1/1000: 3 s / (1 + 2 s).
    assert!((low - 0.003 / 1.002).abs() < 1e-7, "{low}");
    let plan = Plan::new(&s, SamplerKind::FlowEuler, 1000).unwrap();
    let plan_low = plan.sigmas[plan.len() - 1];
    let shifted_again = 3.0 * low / (1.0 + 2.0 * low);
    println!(
        "sigma(0) = {low:.8}, shifted again {shifted_again:.8}, sampler's last sigma {plan_low:.8}"
    );
    assert!(
        (shifted_again - plan_low).abs() < 1e-6,
        "{shifted_again} vs {plan_low}"
    );
    assert_eq!(plan.sigmas[0], top);
    // Monotone in the index.
    let all: Vec<f64> = (0..s.num_train_timesteps)
        .map(|i| flow_training_sigma(&s, i))
        .collect();
    assert!(all.windows(2).all(|w| w[0] < w[1]));
}

/// ADT on the tiny SD3 pipeline: D every iteration, G every iteration (h = 1), the
/// flow sampler; finite losses, the generator weights move, and the tuned transformer
/// is written back under `transformer/` and reloads bit-exactly; the reloaded
/// pipeline samples.
#[test]
fn sd3_adt_trains_saves_reloads_and_samples() {
    let _guard = lock();
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let cfg = sd3_config(
        dir.path(),
        &[
            "train.iterations=3",
            "train.h=1",
            "train.k=1",
            "output.checkpoint_every=0",
        ],
    );
    let initial = {
        let p = Pipeline::tiny_random_sd3(Device::Cpu, cfg.train.seed as i64).unwrap();
        sorted_vars(p.backbone_vs())
            .into_iter()
            .map(|(k, t)| (k, t.detach().copy()))
            .collect::<Vec<_>>()
    };
    let tr = run(
        cfg,
        &RunOptions {
            quiet: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(tr.step, 3);
    assert_eq!(tr.pipe.family, Family::Sd3);
    assert_eq!(tr.plan.kind, SamplerKind::FlowEuler);
    let m = read_metrics(dir.path());
    assert_eq!(m.len(), 3);
    for line in &m {
        for k in ["loss_d", "loss_g_adv", "loss_diff", "grad_norm_g"] {
            let v = line[k].as_f64().unwrap_or(f64::NAN);
            assert!(v.is_finite(), "{k} = {v} in {line}");
        }
        let f = |k: &str| line[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "step {}: loss_d {:.4}, loss_g_adv {:.4}, loss_diff {:.4}",
            line["step"],
            f("loss_d"),
            f("loss_g_adv"),
            f("loss_diff")
        );
    }
    // The transformer was trained (the position grid is a frozen buffer).
    let trained = sorted_vars(tr.pipe.backbone_vs());
    let moved = trained
        .iter()
        .zip(&initial)
        .filter(|((_, a), (_, b))| max_abs_diff(a, b) > 0.0)
        .count();
    let grid = trained
        .iter()
        .zip(&initial)
        .find(|((k, _), _)| k == "pos_embed.pos_embed")
        .expect("the position grid is a variable");
    assert_eq!(max_abs_diff(&(grid.0).1, &(grid.1).1), 0.0);
    println!("{moved} of {} transformer tensors changed", trained.len());
    assert!(moved > trained.len() / 2);

    // The tuned pipeline in the SD3 layout.
    let out = dir.path().join("final");
    for f in [
        "model_index.json",
        "transformer/config.json",
        "transformer/diffusion_pytorch_model.safetensors",
        "vae/config.json",
        "text_encoder/model.safetensors",
        "text_encoder_2/model.safetensors",
        "text_encoder_3/model.safetensors",
        "tokenizer_3/tokenizer.json",
        "scheduler/scheduler_config.json",
    ] {
        assert!(out.join(f).is_file(), "missing final/{f}");
    }
    assert!(!out.join("unet").exists());
    let opts = PipelineOptions {
        sd3_text: Sd3TextOptions {
            use_t5: true,
            max_sequence_length: 32,
        },
    };
    let back = Pipeline::load_with(&out, Device::Cpu, Kind::Float, Kind::Float, &opts).unwrap();
    assert_eq!(back.family, Family::Sd3);
    assert!(matches!(back.backbone, Backbone::Sd3(_)));
    assert_eq!(back.schedule, tr.pipe.schedule);
    let reloaded = sorted_vars(back.backbone_vs());
    assert_eq!(reloaded.len(), trained.len());
    for ((ka, a), (kb, b)) in trained.iter().zip(&reloaded) {
        assert_eq!(ka, kb);
        assert_eq!(max_abs_diff(a, b), 0.0, "{ka} differs after reload");
    }
    // The frozen parts round-trip too: the same conditioning and the same samples.
    let p = prompts();
    let (c0, _) = tr.pipe.encode_text(&p, None).unwrap();
    let (c1, _) = back.encode_text(&p, None).unwrap();
    assert_eq!(c0.context.size(), vec![2, 77 + 32, 32]);
    assert_eq!(max_abs_diff(&c0.context, &c1.context), 0.0);
    assert_eq!(
        max_abs_diff(c0.pooled.as_ref().unwrap(), c1.pooled.as_ref().unwrap()),
        0.0
    );
    let plan = Plan::new(&back.schedule, SamplerKind::FlowEuler, 4).unwrap();
    let a = adt::sample::generate(&tr.pipe, &plan, &p, 3.0, 5, 32).unwrap();
    let b = adt::sample::generate(&back, &plan, &p, 3.0, 5, 32).unwrap();
    assert_eq!(a.size(), vec![2, 3, 32, 32]);
    assert!(bool::try_from(a.isfinite().all()).unwrap());
    assert_eq!(max_abs_diff(&a, &b), 0.0);
}

/// FT on the tiny SD3 pipeline: the flow-matching diffusion loss, finite, the
/// generator weights move.
#[test]
fn sd3_ft_trains() {
    let _guard = lock();
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let cfg = sd3_config(
        dir.path(),
        &[
            "train.mode=\"ft\"",
            "train.iterations=3",
            "train.warmup_g=0",
            "output.checkpoint_every=0",
        ],
    );
    let tr = run(
        cfg,
        &RunOptions {
            quiet: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(tr.step, 3);
    let m = read_metrics(dir.path());
    assert_eq!(m.len(), 3);
    for line in &m {
        assert!(line.get("loss_d").is_none());
        let v = line["loss_diff"].as_f64().unwrap();
        // A random velocity predictor: the loss is of the order of E|eps - z0|^2.
        assert!(v.is_finite() && v > 0.0, "{line}");
        println!("FT step {}: loss_diff {v:.4}", line["step"]);
    }
    assert!(dir
        .path()
        .join("final/transformer/diffusion_pytorch_model.safetensors")
        .is_file());
}

/// Checkpoints of an SD3 run hold the transformer; a run stopped after a checkpoint
/// and resumed gives bit-identical losses.
#[test]
fn sd3_resume_is_bit_identical() {
    let _guard = lock();
    tch::set_num_threads(1);
    let over = [
        "train.iterations=4",
        "train.h=2",
        "train.k=1",
        "output.checkpoint_every=2",
    ];
    let a = tempfile::tempdir().unwrap();
    run(
        sd3_config(a.path(), &over),
        &RunOptions {
            quiet: true,
            ..Default::default()
        },
    )
    .unwrap();
    let b = tempfile::tempdir().unwrap();
    let tr = run(
        sd3_config(b.path(), &over),
        &RunOptions {
            quiet: true,
            max_iterations: Some(2),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(tr.step, 2);
    drop(tr);
    let ckpt = adt::train::checkpoint::latest(b.path()).unwrap().unwrap();
    assert!(ckpt
        .join("transformer/diffusion_pytorch_model.safetensors")
        .is_file());
    let tr = run(
        sd3_config(b.path(), &over),
        &RunOptions {
            quiet: true,
            resume: Some(None),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(tr.step, 4);
    let (ma, mb) = (read_metrics(a.path()), read_metrics(b.path()));
    assert_eq!(ma.len(), 4);
    assert_eq!(mb.len(), 4);
    for (x, y) in ma.iter().zip(&mb) {
        for k in ["loss_d", "loss_g_adv", "loss_diff"] {
            assert_eq!(x.get(k), y.get(k), "step {}: {k} differs", x["step"]);
        }
    }
}

/// A DDPM sampler on the flow model (and the flow sampler on a UNet model) is
/// refused with an error naming `sampler.kind`.
#[test]
fn sampler_kind_mismatch_names_the_key() {
    let _guard = lock();
    let dir = tempfile::tempdir().unwrap();
    let cfg = sd3_config(dir.path(), &["train.mode=\"ft\"", "sampler.kind=\"ddim\""]);
    let pipe = Pipeline::tiny_random_sd3(Device::Cpu, 0).unwrap();
    let err = match Trainer::with_parts(cfg, pipe, None) {
        Ok(_) => panic!("DDIM on a flow-matching model must be refused"),
        Err(e) => e.to_string(),
    };
    println!("{err}");
    assert!(
        err.contains("sampler.kind") && err.contains("flow"),
        "{err}"
    );
    let cfg = sd3_config(
        dir.path(),
        &[
            "train.mode=\"ft\"",
            "model.path=\"tiny-random\"",
            "sampler.kind=\"flow\"",
        ],
    );
    let pipe = Pipeline::tiny_random(Device::Cpu, 0).unwrap();
    let err = match Trainer::with_parts(cfg, pipe, None) {
        Ok(_) => panic!("the flow sampler on a DDPM model must be refused"),
        Err(e) => e.to_string(),
    };
    println!("{err}");
    assert!(
        err.contains("sampler.kind") && err.contains("ddim"),
        "{err}"
    );
}

/// `adt init-pipeline --preset tiny-sd3`: the tiny SD3 pipeline written to disk loads
/// with `Pipeline::load` (with and without T5) and samples with the flow sampler;
/// a DDPM sampler is refused.
#[test]
fn tiny_sd3_pipeline_on_disk_loads_and_samples() {
    let _guard = lock();
    tch::set_num_threads(1);
    let spec = RandomSpec::by_name("tiny-sd3").unwrap();
    let pipe = Pipeline::random(&spec, Device::Cpu, 3).unwrap();
    assert_eq!(pipe.latent_channels(), 16);
    assert_eq!(pipe.vae_scale(), 2);
    let dir = tempfile::tempdir().unwrap();
    pipe.save(dir.path()).unwrap();
    let mi = adt::models::config::read_json(&dir.path().join("model_index.json")).unwrap();
    assert_eq!(mi["_class_name"], "StableDiffusion3Pipeline");
    assert_eq!(mi["scheduler"][1], "FlowMatchEulerDiscreteScheduler");

    let loaded = Pipeline::load(dir.path(), Device::Cpu, Kind::Float, Kind::Float).unwrap();
    assert_eq!(loaded.family, Family::Sd3);
    assert!(loaded.is_flow());
    assert_eq!(loaded.default_resolution(), 16);
    let p = prompts();
    // Default options: T5 with 256 tokens.
    let (c, _) = loaded.encode_text(&p, None).unwrap();
    assert_eq!(c.context.size(), vec![2, 77 + 256, 32]);
    let plan = Plan::new(&loaded.schedule, SamplerKind::FlowEuler, 3).unwrap();
    let x = adt::sample::generate(&loaded, &plan, &p, 4.0, 11, 32).unwrap();
    assert_eq!(x.size(), vec![2, 3, 32, 32]);
    assert!(bool::try_from(x.isfinite().all()).unwrap());
    let again = adt::sample::generate(&loaded, &plan, &p, 4.0, 11, 32).unwrap();
    assert_eq!(max_abs_diff(&x, &again), 0.0);
    assert!(x.std(true).double_value(&[]) > 0.0);

    // Without T5: 77 zero tokens replace it.
    let no_t5 = PipelineOptions {
        sd3_text: Sd3TextOptions {
            use_t5: false,
            ..Default::default()
        },
    };
    let small =
        Pipeline::load_with(dir.path(), Device::Cpu, Kind::Float, Kind::Float, &no_t5).unwrap();
    let (c, _) = small.encode_text(&p, None).unwrap();
    assert_eq!(c.context.size(), vec![2, 154, 32]);
    assert_eq!(
        c.context.narrow(1, 77, 77).abs().max().double_value(&[]),
        0.0
    );
    let y = adt::sample::generate(&small, &plan, &p, 4.0, 11, 32).unwrap();
    assert!(bool::try_from(y.isfinite().all()).unwrap());

    let ddim = Plan::new(&ScheduleConfig::sd15(), SamplerKind::Ddim, 3).unwrap();
    let err = adt::sample::generate(&loaded, &ddim, &p, 4.0, 11, 32)
        .expect_err("DDIM on a flow model must be refused")
        .to_string();
    assert!(err.contains("flow"), "{err}");
}
