//! SD3 (flow matching) in the pipeline, the trainer and the sampler, on tiny random
//! models of the real architectures (CPU).

use adt::models::pipeline::{Backbone, Family, Pipeline, PipelineOptions, RandomSpec};
use adt::models::sd3_text::Sd3TextOptions;
use adt::schedule::{Plan, SamplerKind, ScheduleConfig};
use adt::train::adt::{flow_training_sigma, Trainer};
use adt::train::config::Config;
use adt::train::run::{run, RunOptions};
use std::path::Path;

mod common;
use common::{lock, read_metrics, run_quiet, sorted_vars, tiny_config};
use tch::{Device, Kind, Tensor};

fn sd3_config(dir: &Path, overrides: &[&str]) -> Config {
    let mut o = vec![
        "model.path=\"tiny-random-sd3\"",
        "sampler.kind=\"flow\"",
        "sampler.steps=4",
    ];
    o.extend_from_slice(overrides);
    tiny_config(dir, &o)
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
    let tr = run_quiet(cfg).unwrap();
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
        ..Default::default()
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
/// generator weights move, the VAE does not, and no discriminator is built.
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
    // The starting weights: the random pipeline the trainer builds from its seed.
    let mut spec = RandomSpec::tiny_sd3().unwrap();
    if let RandomSpec::Sd3(s) = &mut spec {
        s.with_t5 = cfg.model.use_t5;
    }
    let init = Pipeline::random(&spec, Device::Cpu, cfg.train.seed as i64).unwrap();
    let before = sorted_vars(init.backbone_vs());
    let vae_before = sorted_vars(&init.vae.as_ref().unwrap().vs);
    drop(init);
    let tr = run_quiet(cfg).unwrap();
    assert_eq!(tr.step, 3);
    assert!(
        tr.disc.is_none() && tr.opt_d.is_none(),
        "FT built a discriminator"
    );
    let after = sorted_vars(tr.pipe.backbone_vs());
    assert_eq!(before.len(), after.len());
    let moved = before
        .iter()
        .zip(&after)
        .filter(|((ka, a), (kb, b))| {
            assert_eq!(ka, kb);
            max_abs_diff(a, b) > 0.0
        })
        .count();
    println!("FT moved {moved} of {} transformer tensors", after.len());
    assert!(
        moved * 2 > after.len(),
        "only {moved} of {} tensors moved",
        after.len()
    );
    for ((k, a), (_, b)) in vae_before
        .iter()
        .zip(&sorted_vars(&tr.pipe.vae.as_ref().unwrap().vs))
    {
        assert_eq!(max_abs_diff(a, b), 0.0, "FT changed the frozen VAE's {k}");
    }
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
/// and resumed gives bit-identical losses and a bit-identical final state (weights,
/// optimiser moments, discriminator).
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
    let whole = run(
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
    common::assert_same_state(&whole, &tr);
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

    // Without T5: max_sequence_length (default 256) zero tokens replace it, as in
    // diffusers' encode_prompt.
    let no_t5 = PipelineOptions {
        sd3_text: Sd3TextOptions {
            use_t5: false,
            ..Default::default()
        },
        ..Default::default()
    };
    let small =
        Pipeline::load_with(dir.path(), Device::Cpu, Kind::Float, Kind::Float, &no_t5).unwrap();
    let (c, _) = small.encode_text(&p, None).unwrap();
    assert_eq!(c.context.size(), vec![2, 77 + 256, 32]);
    assert_eq!(
        c.context.narrow(1, 77, 256).abs().max().double_value(&[]),
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

// ---------------------------------------------------------------------------
// Logit-normal timesteps and the bfloat16 trajectory on SD3

/// `logit_normal_sigma`: sigma = shift(sigmoid(n)), n ~ N(mean, std^2). Undoing the
/// shift (u = sigma / (shift - (shift - 1) sigma)) and the sigmoid gives back normal
/// samples with the requested mean and standard deviation (and about 68.3 % of them
/// within one standard deviation); all sigmas lie in (0, 1); the median is the
/// shifted sigmoid of the mean. The shift is the one of the uniform draw's table.
#[test]
fn logit_normal_sigmas_have_the_requested_statistics() {
    use adt::train::adt::logit_normal_sigma;
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let n = 200_000;
    for (mean, std, shift) in [
        (0.0, 1.0, 1.0),
        (0.0, 1.0, 3.0),
        (-0.5, 1.5, 3.0),
        (1.0, 0.5, 3.0),
    ] {
        let sig: Vec<f64> = (0..n)
            .map(|_| logit_normal_sigma(&mut rng, mean, std, shift))
            .collect();
        assert!(
            sig.iter().all(|&s| s > 0.0 && s < 1.0),
            "a sigma outside (0, 1)"
        );
        let logits: Vec<f64> = sig
            .iter()
            .map(|&s| {
                let u = s / (shift - (shift - 1.0) * s);
                (u / (1.0 - u)).ln()
            })
            .collect();
        let m = logits.iter().sum::<f64>() / n as f64;
        let sd = (logits.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt();
        let within = logits.iter().filter(|x| (*x - mean).abs() < std).count() as f64 / n as f64;
        let mut sorted = sig.clone();
        sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let median = sorted[n / 2];
        let u_med = 1.0 / (1.0 + (-mean).exp());
        let want_median = shift * u_med / (1.0 + (shift - 1.0) * u_med);
        let (lo, hi) = (sorted[0], sorted[n - 1]);
        println!(
            "mean {mean}, std {std}, shift {shift}: logit mean {m:.4}, std {sd:.4}, within 1 sd \
             {within:.4}; sigma median {median:.4} (want {want_median:.4}), range [{lo:.2e}, {hi:.6}]"
        );
        // Standard errors: std / sqrt(n) = 2.2e-3 std for the mean, 1.6e-3 std for the sd.
        assert!((m - mean).abs() < 0.012 * std, "mean {m} vs {mean}");
        assert!((sd - std).abs() < 0.01 * std, "std {sd} vs {std}");
        assert!((within - 0.6827).abs() < 0.005, "{within}");
        assert!(
            (median - want_median).abs() < 0.005,
            "{median} vs {want_median}"
        );
    }
    // With a vanishing spread the draw is the shift of sigmoid(mean): at u = (i + 1) / T
    // it equals the uniform draw's training sigma.
    let s = ScheduleConfig::sd3();
    for i in [0usize, 99, 499, 998] {
        let u = (i + 1) as f64 / s.num_train_timesteps as f64;
        let logit = (u / (1.0 - u)).ln();
        let got = logit_normal_sigma(&mut rng, logit, 1e-12, s.shift);
        let want = flow_training_sigma(&s, i);
        assert!((got - want).abs() < 1e-6, "i {i}: {got} vs {want}");
    }
}

/// FT on the tiny SD3 pipeline with `train.flow_timestep = "logit_normal"`: finite
/// losses, the transformer moves, and the logged timesteps (round(sigma * 1000))
/// are not those of the uniform draw. On a UNet model the key is refused by name.
#[test]
fn sd3_ft_with_logit_normal_timesteps() {
    let _guard = lock();
    tch::set_num_threads(1);
    let over = [
        "train.mode=\"ft\"",
        "train.iterations=4",
        "train.warmup_g=0",
        "output.checkpoint_every=0",
    ];
    let mut ts = Vec::new();
    for mode in ["uniform", "logit_normal"] {
        let dir = tempfile::tempdir().unwrap();
        let mut o = over.to_vec();
        let key = format!("train.flow_timestep=\"{mode}\"");
        o.push(&key);
        o.push("train.logit_mean=0.3");
        let cfg = sd3_config(dir.path(), &o);
        let initial = {
            let p = Pipeline::tiny_random_sd3(Device::Cpu, cfg.train.seed as i64).unwrap();
            sorted_vars(p.backbone_vs())
                .into_iter()
                .map(|(k, t)| (k, t.detach().copy()))
                .collect::<Vec<_>>()
        };
        let tr = run_quiet(cfg).unwrap();
        assert_eq!(tr.step, 4);
        let moved = sorted_vars(tr.pipe.backbone_vs())
            .iter()
            .zip(&initial)
            .filter(|((_, a), (_, b))| max_abs_diff(a, b) > 0.0)
            .count();
        assert!(moved > initial.len() / 2, "{mode}: {moved} tensors moved");
        let m = read_metrics(dir.path());
        let mut t_mode = Vec::new();
        for line in &m {
            let v = line["loss_diff"].as_f64().unwrap();
            assert!(v.is_finite() && v > 0.0, "{mode}: {line}");
            let t = line["t_start"].as_i64().unwrap();
            assert!((0..=1000).contains(&t), "{mode}: t_start {t}");
            println!("FT {mode} step {}: t {t}, loss_diff {v:.4}", line["step"]);
            t_mode.push(t);
        }
        ts.push(t_mode);
    }
    assert_ne!(
        ts[0], ts[1],
        "the logit-normal draw gave the uniform timesteps"
    );

    let dir = tempfile::tempdir().unwrap();
    let cfg = sd3_config(
        dir.path(),
        &[
            "train.mode=\"ft\"",
            "model.path=\"tiny-random\"",
            "sampler.kind=\"ddim\"",
            "train.flow_timestep=\"logit_normal\"",
        ],
    );
    let err = match Trainer::with_parts(cfg, Pipeline::tiny_random(Device::Cpu, 0).unwrap(), None) {
        Ok(_) => panic!("logit-normal timesteps on a DDPM model must be refused"),
        Err(e) => e.to_string(),
    };
    println!("{err}");
    assert!(err.contains("train.flow_timestep"), "{err}");
}

/// Eq. 12 on the tiny SD3 transformer (flow matching, Euler) in float64: with three
/// kept steps and the diffusion term, the per-step decomposition gives the gradient of
/// the whole trajectory in one graph to 1e-10, and every parameter that should get a
/// gradient has a non-zero one (the context-pre-only last block's text query
/// projections, whose output diffusers discards, get none on either side).
#[test]
fn sd3_decomposed_gradient_equals_full_graph_in_float64() {
    use adt::models::denoiser::{Cond, Guidance};
    use adt::models::mmdit::{LoadedSd3Transformer, Sd3Config};
    use adt::train::config::GradPath;
    use adt::train::path::{backprop_kept, rollout, rollout_graph};
    let _guard = lock();
    tch::manual_seed(11);
    let cfg = Sd3Config::tiny();
    let tiny = LoadedSd3Transformer::from_config(&cfg, Device::Cpu, Kind::Double).unwrap();
    let opts = (Kind::Double, Device::Cpu);
    let cond_of = || Cond {
        context: Tensor::randn([2, 6, cfg.joint_attention_dim], opts),
        pooled: Some(Tensor::randn([2, cfg.pooled_projection_dim], opts)),
        time_ids: None,
    };
    let (cond, uncond) = (cond_of(), cond_of());
    let g = Guidance::new(&uncond, &cond, 4.0);
    let plan = Plan::new(&ScheduleConfig::sd3(), SamplerKind::FlowEuler, 6).unwrap();
    let z0 = Tensor::randn([2, 16, 8, 8], opts);
    let eps = Tensor::randn([2, 16, 8, 8], opts);
    let w = Tensor::randn([2, 16, 8, 8], opts);
    let start = 1;
    let xs = plan.add_noise(&z0, &eps, start);
    let target = plan.target(&z0, &eps, start);
    let kept = vec![1, 3, 4];
    let lambda = 0.5;
    let trainable = || -> Vec<(String, Tensor)> {
        sorted_vars(&tiny.vs)
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect()
    };
    let take = || -> Vec<(String, Option<Tensor>)> {
        trainable()
            .into_iter()
            .map(|(k, t)| {
                let gr = t.grad();
                let out = gr.defined().then(|| gr.copy());
                if gr.defined() {
                    let _ = t.grad().zero_();
                }
                (k, out)
            })
            .collect()
    };
    let (xf, sc) = rollout_graph(&tiny.model, &plan, start, &xs, &kept, &g, GradPath::Adt).unwrap();
    let diff = (sc.unwrap() - &target).square().mean(Kind::Double);
    ((xf.tanh() * &w).sum(Kind::Double) + diff * lambda).backward();
    let full = take();
    let r = rollout(&tiny.model, &plan, start, &xs, &kept, &g, GradPath::Adt).unwrap();
    assert_eq!(max_abs_diff(&r.final_x, &xf.detach()), 0.0);
    let leaf = r.final_x.detach().set_requires_grad(true);
    (leaf.tanh() * &w).sum(Kind::Double).backward();
    backprop_kept(
        &tiny.model,
        &plan,
        &r.kept,
        &leaf.grad(),
        &g,
        Some((start, &target, lambda)),
    )
    .unwrap();
    let dec = take();
    let last = cfg.num_layers - 1;
    let no_grad_expected = |k: &str| {
        k.starts_with(&format!("transformer_blocks.{last}.attn.add_q_proj"))
            || k.starts_with(&format!("transformer_blocks.{last}.attn.norm_added_q"))
    };
    let mut worst = 0.0f64;
    let mut checked = 0;
    for ((k, a), (_, b)) in full.iter().zip(&dec) {
        match (a, b) {
            (Some(a), Some(b)) => {
                assert!(!no_grad_expected(k), "{k}: has a gradient");
                assert!(a.abs().max().double_value(&[]) > 0.0, "{k}: zero gradient");
                let e = common::fixtures::max_rel_err(b, a);
                assert!(e < 1e-10, "{k}: decomposed vs one graph {e}");
                worst = worst.max(e);
                checked += 1;
            }
            (None, None) => assert!(no_grad_expected(k), "{k}: no gradient"),
            _ => panic!("{k}: gradient defined on one side only"),
        }
    }
    println!("SD3 flow, kept {kept:?}: {checked} gradients, decomposed vs one graph worst rel err {worst:.2e}");
    assert!(checked + 2 >= full.len(), "{checked} of {}", full.len());
}

/// One ADT iteration (G + D, K = 2: three kept steps of four from t_s = 1) on the
/// tiny SD3 pipeline from `overrides`; the log and the generator's gradients (every
/// trainable tensor has one, except the text queries of the context-pre-only last
/// block, whose output is discarded).
fn adt_sd3_step(overrides: &[&str]) -> (adt::train::adt::StepLog, Vec<(String, Tensor)>) {
    let dir = tempfile::tempdir().unwrap();
    let mut o = vec![
        "train.h=1",
        "train.k=2",
        "train.warmup_g=0",
        "train.warmup_d=0",
        "train.batch_size=1",
    ];
    o.extend_from_slice(overrides);
    let cfg = sd3_config(dir.path(), &o);
    let pipe = Pipeline::tiny_random_sd3(Device::Cpu, 3).unwrap();
    let features = adt::train::adt::build_features(&cfg, Device::Cpu, true).unwrap();
    let mut tr = Trainer::with_parts(cfg, pipe, Some(features)).unwrap();
    tr.force_start = Some(1);
    tch::manual_seed(9);
    let images = Tensor::rand([1, 3, 32, 32], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
    let ids = Tensor::zeros([1, 6], (Kind::Float, Device::Cpu));
    let log = tr
        .iteration_on(&images, &["a red circle".to_string()], &ids)
        .unwrap();
    let grads: Vec<(String, Tensor)> = sorted_vars(tr.pipe.backbone_vs())
        .into_iter()
        .filter(|(_, t)| t.requires_grad())
        .filter_map(|(k, t)| {
            let g = t.grad();
            let pre_only = k.contains(".attn.add_q_proj.") || k.contains(".attn.norm_added_q.");
            if !g.defined() {
                assert!(pre_only, "{k}: no gradient");
                return None;
            }
            assert!(g.abs().max().double_value(&[]) > 0.0, "{k}: zero gradient");
            Some((k, g.copy()))
        })
        .collect();
    assert!(grads.len() > 60, "{} gradients", grads.len());
    (log, grads)
}

/// Gradient checkpointing of the MMDiT's joint blocks (and the VAE decoder) gives
/// the generator gradient of the run without it.
#[test]
fn sd3_gradient_checkpointing_gives_the_same_gradient() {
    let _guard = lock();
    tch::set_num_threads(1);
    let (log, plain) = adt_sd3_step(&[]);
    let before = adt::models::checkpoint::checkpointed_total();
    let (log_ck, ck) = adt_sd3_step(&["train.gradient_checkpointing=true"]);
    assert!(adt::models::checkpoint::checkpointed_total() > before);
    assert_eq!(log.loss_g_adv, log_ck.loss_g_adv);
    let worst = worst_rel(&ck, &plain);
    println!(
        "SD3 checkpointing: worst rel err {worst:.2e} over {} gradients",
        plain.len()
    );
    assert!(worst < 1e-5, "{worst:e}");
}

fn worst_rel(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> f64 {
    a.iter()
        .zip(b)
        .map(|((ka, x), (kb, y))| {
            assert_eq!(ka, kb);
            common::fixtures::max_rel_err(y, x)
        })
        .fold(0.0, f64::max)
}

/// ADT's diffusion-loss term with logit-normal noise levels: the per-step gradient
/// decomposition gives the gradient of the whole graph (the term is added the same
/// way in both), the term contributes to the gradient (lambda = 0 differs), and its
/// value is not the start-step loss of the uniform setting.
#[test]
fn sd3_adt_logit_normal_diffusion_term() {
    let _guard = lock();
    tch::set_num_threads(1);
    let ln = "train.flow_timestep=\"logit_normal\"";
    let (dec_log, dec) = adt_sd3_step(&[ln, "train.lambda=2.0"]);
    let (full_log, full) = adt_sd3_step(&[ln, "train.lambda=2.0", "train.decompose=false"]);
    let (_, no_term) = adt_sd3_step(&[ln, "train.lambda=0"]);
    let (uni_log, _) = adt_sd3_step(&["train.lambda=2.0"]);
    let (dd, fd, ud) = (
        dec_log.loss_diff.unwrap(),
        full_log.loss_diff.unwrap(),
        uni_log.loss_diff.unwrap(),
    );
    let e_dec = worst_rel(&full, &dec);
    let e_term = worst_rel(&dec, &no_term);
    println!(
        "loss_diff: decomposed {dd:.6}, one graph {fd:.6}, uniform (at t_s) {ud:.6}; \
         gradient decomposed vs one graph {e_dec:.2e}, lambda 2 vs 0 {e_term:.2e}"
    );
    assert!(dd.is_finite() && dd > 0.0);
    assert!((dd - fd).abs() <= 1e-6 * dd, "{dd} vs {fd}");
    assert!(
        (dec_log.loss_g_adv.unwrap() - full_log.loss_g_adv.unwrap()).abs() < 1e-5,
        "adversarial loss differs"
    );
    // float32 trainer: rounding of two summation orders.
    assert!(e_dec < 1e-5, "decomposed vs one-graph gradient: {e_dec}");
    assert!(
        e_term > 1e-2,
        "the diffusion term does not reach the gradient: {e_term}"
    );
    assert!(
        (dd - ud).abs() > 1e-4 * ud,
        "logit-normal term equals the t_s loss"
    );
}

/// `train.bf16_trajectory` on an SD3 pipeline: the trainer runs the trajectory on a
/// bfloat16 copy of the transformer, refreshed after each generator step.
#[test]
fn sd3_trainer_uses_and_refreshes_the_bf16_copy() {
    let _guard = lock();
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let cfg = sd3_config(
        dir.path(),
        &[
            "train.bf16_trajectory=true",
            "train.h=1",
            "train.k=1",
            "train.warmup_g=0",
            "train.lr_g=1e-3",
            "train.batch_size=1",
        ],
    );
    let pipe = Pipeline::tiny_random_sd3(Device::Cpu, 0).unwrap();
    let features = adt::train::adt::build_features(&cfg, Device::Cpu, true).unwrap();
    let mut tr = Trainer::with_parts(cfg, pipe, Some(features)).unwrap();
    assert!(tr.fast.is_none());
    let copy = tr.fast_sd3.as_ref().expect("an SD3 trajectory copy");
    assert_eq!(copy.kind(), Kind::BFloat16);
    assert_eq!(copy.weights().refreshes(), 1);
    tch::manual_seed(1);
    let images = Tensor::rand([1, 3, 32, 32], (Kind::Float, Device::Cpu)) * 2.0 - 1.0;
    let captions = vec!["a red square".to_string()];
    let ids = Tensor::zeros([1, 6], (Kind::Float, Device::Cpu));
    let log = tr.iteration_on(&images, &captions, &ids).unwrap();
    assert!(log.loss_g_adv.unwrap().is_finite() && log.loss_d.unwrap().is_finite());
    assert_eq!(tr.fast_sd3.as_ref().unwrap().weights().refreshes(), 1);
    // The G step moved the master weights (and their version counters, the fused
    // AdamW kernel included): the next trajectory refreshes the copy first.
    tr.iteration_on(&images, &captions, &ids).unwrap();
    assert_eq!(tr.fast_sd3.as_ref().unwrap().weights().refreshes(), 2);
    let copy = tr.fast_sd3.as_mut().unwrap();
    copy.weights_mut().refresh();
    let name = "proj_out.weight";
    let master = &tr.pipe.backbone_vs().variables()[name];
    let e = common::fixtures::max_rel_err(
        &copy.weights().copy_of(name).unwrap().to_kind(Kind::Float),
        master,
    );
    assert!(e < 1e-2, "copy vs master after sync: {e}");
}
