//! The ADT trainer on tiny random models of the real architectures (CPU).

use adt::models::denoiser::{Cond, Guidance, UNetDenoiser};
use adt::models::unet::{LoadedUNet, UNetConfig};
use adt::schedule::{Plan, SamplerKind, ScheduleConfig};
use adt::train::config::GradPath;
use adt::train::path::{backprop_kept, rollout, rollout_graph};
use adt::train::run::{run, RunOptions};

mod common;
use common::{lock, read_metrics, run_quiet, tiny_config};
use tch::{Device, Kind, Tensor};

fn tiny_unet_f64() -> LoadedUNet {
    tch::manual_seed(7);
    let mut cfg = UNetConfig::tiny_sd15();
    cfg.cross_attention_dim = adt::models::unet::PerBlock::One(16);
    LoadedUNet::from_config(&cfg, Device::Cpu, Kind::Double).unwrap()
}

fn grads(vs: &tch::nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v.into_iter()
        .map(|(k, t)| {
            let g = t.grad();
            (
                k,
                if g.defined() {
                    g.copy()
                } else {
                    t.zeros_like()
                },
            )
        })
        .collect()
}

fn zero_grads(vs: &tch::nn::VarStore) {
    for (_, t) in vs.variables() {
        let mut g = t.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

/// Eq. 12 on the real UNet architecture in float64: the per-step decomposition
/// gives the same parameter gradient as the whole trajectory in one graph.
#[test]
fn decomposed_gradient_equals_full_graph_on_tiny_unet() {
    let _guard = lock();
    let unet = tiny_unet_f64();
    let den = UNetDenoiser(&unet.model);
    let opts = (Kind::Double, Device::Cpu);
    let cond = Cond::new(Tensor::randn([2, 5, 16], opts));
    let uncond = Cond::new(Tensor::randn([2, 5, 16], opts));
    for (kind, path) in [
        (SamplerKind::Ddim, GradPath::Adt),
        (SamplerKind::DpmSolverPp2m, GradPath::Drtune),
    ] {
        let plan = Plan::new(&ScheduleConfig::sd15(), kind, 6).unwrap();
        let g = Guidance::new(&uncond, &cond, 4.0);
        let z0 = Tensor::randn([2, 4, 8, 8], opts);
        let eps = Tensor::randn([2, 4, 8, 8], opts);
        let w = Tensor::randn([2, 4, 8, 8], opts);
        let start = 1;
        let xs = plan.add_noise(&z0, &eps, start);
        let target = plan.target(&z0, &eps, start);
        let kept = vec![1, 3, 5];
        let (xf, sc) = rollout_graph(&den, &plan, start, &xs, &kept, &g, path).unwrap();
        let diff = (sc.unwrap() - &target).square().mean(Kind::Double);
        ((xf.tanh() * &w).sum(Kind::Double) + diff * 0.5).backward();
        let full = grads(&unet.vs);
        zero_grads(&unet.vs);
        let r = rollout(&den, &plan, start, &xs, &kept, &g, path).unwrap();
        let leaf = r.final_x.detach().set_requires_grad(true);
        (leaf.tanh() * &w).sum(Kind::Double).backward();
        backprop_kept(
            &den,
            &plan,
            &r.kept,
            &leaf.grad(),
            &g,
            Some((start, &target, 0.5)),
        )
        .unwrap();
        let dec = grads(&unet.vs);
        zero_grads(&unet.vs);
        let mut worst = 0.0f64;
        for ((k, a), (_, b)) in full.iter().zip(&dec) {
            let e = adt::fixtures::max_rel_err(b, a);
            assert!(e < 1e-6, "{kind:?}/{path:?} {k}: rel err {e}");
            worst = worst.max(e);
        }
        println!("{kind:?}/{path:?}: decomposed vs full gradient, worst rel err {worst:.2e}");
    }
}

/// With the last step as the only (kept) step the ADT gradient is the true gradient
/// of the loss; compare it with central finite differences along a random direction.
#[test]
fn generator_gradient_matches_finite_differences() {
    let _guard = lock();
    let unet = tiny_unet_f64();
    let den = UNetDenoiser(&unet.model);
    let opts = (Kind::Double, Device::Cpu);
    let cond = Cond::new(Tensor::randn([1, 5, 16], opts));
    let uncond = Cond::new(Tensor::randn([1, 5, 16], opts));
    let g = Guidance::new(&uncond, &cond, 3.0);
    let plan = Plan::new(&ScheduleConfig::sd15(), SamplerKind::Ddim, 5).unwrap();
    let s = plan.len() - 1;
    let x = Tensor::randn([1, 4, 8, 8], opts);
    let w = Tensor::randn([1, 4, 8, 8], opts);
    let loss = |xf: &Tensor| (xf.sin() * &w).sum(Kind::Double);
    let r = rollout(&den, &plan, s, &x, &[s], &g, GradPath::Adt).unwrap();
    let leaf = r.final_x.detach().set_requires_grad(true);
    loss(&leaf).backward();
    backprop_kept(&den, &plan, &r.kept, &leaf.grad(), &g, None).unwrap();
    let grad = grads(&unet.vs);
    let vars: Vec<(String, Tensor)> = {
        let mut v: Vec<_> = unet.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let dirs: Vec<Tensor> = vars.iter().map(|(_, t)| t.randn_like()).collect();
    let analytic: f64 = grad
        .iter()
        .zip(&dirs)
        .map(|((_, g), d)| (g * d).sum(Kind::Double).double_value(&[]))
        .sum();
    let h = 1e-5;
    let eval_at = |sign: f64| -> f64 {
        tch::no_grad(|| {
            for ((_, v), d) in vars.iter().zip(&dirs) {
                let _ = v.shallow_clone().g_add_(&(d * (sign * h)));
            }
            let r = rollout(&den, &plan, s, &x, &[], &g, GradPath::Adt).unwrap();
            let l = loss(&r.final_x).double_value(&[]);
            for ((_, v), d) in vars.iter().zip(&dirs) {
                let _ = v.shallow_clone().g_sub_(&(d * (sign * h)));
            }
            l
        })
    };
    let fd = (eval_at(1.0) - eval_at(-1.0)) / (2.0 * h);
    let rel = (fd - analytic).abs() / analytic.abs().max(1e-12);
    println!("directional derivative: analytic {analytic:.10e}, finite differences {fd:.10e}, rel err {rel:.2e}");
    assert!(rel < 1e-5, "analytic {analytic} vs finite differences {fd}");
}

const LOSS_KEYS: [&str; 6] = [
    "loss_d",
    "d_acc",
    "real_score",
    "fake_score",
    "loss_g_adv",
    "loss_diff",
];

/// The committed smoke-test config runs and logs what it promises; the generator
/// steps come every H iterations.
#[test]
fn tiny_random_example_runs_with_h_cadence() {
    let _guard = lock();
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(
        dir.path(),
        &[
            "train.iterations=6",
            "train.h=3",
            "output.checkpoint_every=0",
        ],
    );
    let tr = run_quiet(cfg).unwrap();
    assert_eq!(tr.step, 6);
    let m = read_metrics(dir.path());
    assert_eq!(m.len(), 6);
    for (i, line) in m.iter().enumerate() {
        assert_eq!(line["step"], i);
        assert!(line["loss_d"].as_f64().unwrap().is_finite());
        let g_step = (i + 1) % 3 == 0;
        assert_eq!(line.get("loss_g_adv").is_some(), g_step, "step {i}: {line}");
        assert_eq!(line.get("loss_diff").is_some(), g_step, "step {i}: {line}");
    }
    // The tuned pipeline is written in the diffusers layout.
    for f in [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/config.json",
    ] {
        assert!(
            dir.path().join("final").join(f).is_file(),
            "missing final/{f}"
        );
    }
    // TensorBoard events carry the same losses.
    let ev = std::fs::read_dir(dir.path().join("tensorboard"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let scalars = adt::train::logging::read_scalars(&ev).unwrap();
    assert!(scalars.iter().any(|(s, t, _)| *s == 2 && t == "loss_g_adv"));
}

/// A run stopped after a checkpoint and resumed gives bit-identical losses.
#[test]
fn resume_is_bit_identical() {
    let _guard = lock();
    tch::set_num_threads(1);
    let a = tempfile::tempdir().unwrap();
    let over = [
        "train.iterations=6",
        "train.h=2",
        "output.checkpoint_every=3",
    ];
    run(
        tiny_config(a.path(), &over),
        &RunOptions {
            quiet: true,
            ..Default::default()
        },
    )
    .unwrap();
    let b = tempfile::tempdir().unwrap();
    let tr = run(
        tiny_config(b.path(), &over),
        &RunOptions {
            quiet: true,
            max_iterations: Some(3),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(tr.step, 3);
    drop(tr);
    let tr = run(
        tiny_config(b.path(), &over),
        &RunOptions {
            quiet: true,
            resume: Some(None),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(tr.step, 6);
    let (ma, mb) = (read_metrics(a.path()), read_metrics(b.path()));
    assert_eq!(ma.len(), 6);
    assert_eq!(mb.len(), 6);
    for (x, y) in ma.iter().zip(&mb) {
        for k in LOSS_KEYS {
            assert_eq!(
                x.get(k),
                y.get(k),
                "step {}: {k} differs after resume",
                x["step"]
            );
        }
    }
}

/// FT and the ablation switches run; the FT run logs only the diffusion loss.
#[test]
fn ft_and_ablations_run() {
    let _guard = lock();
    tch::set_num_threads(1);
    for over in [
        &["train.mode=ft", "train.grad_accum=2"][..],
        &[
            "train.grad_path=drtune",
            "disc.kind=stylegan_t",
            "train.lambda=0",
        ][..],
        &[
            "train.decompose=false",
            "sampler.kind=dpmpp",
            "sampler.steps=5",
        ][..],
        &["train.ema_decay=0.9", "train.grad_accum=2"][..],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut o = vec![
            "train.iterations=2",
            "train.h=1",
            "output.checkpoint_every=0",
        ];
        o.extend_from_slice(over);
        let tr = run(
            tiny_config(dir.path(), &o),
            &RunOptions {
                quiet: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(tr.step, 2, "{over:?}");
        let m = read_metrics(dir.path());
        if over[0] == "train.mode=ft" {
            assert!(m[0].get("loss_d").is_none() && m[0]["loss_diff"].as_f64().is_some());
        } else {
            assert!(
                m[1]["loss_g_adv"].as_f64().unwrap().is_finite(),
                "{over:?}: {}",
                m[1]
            );
        }
    }
}

/// A diverging run stops with an error naming the step and the loss, and the last
/// checkpoint stays loadable.
#[test]
fn nan_loss_stops_with_a_clear_error() {
    let _guard = lock();
    tch::set_num_threads(1);
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(
        dir.path(),
        &[
            "train.mode=ft",
            "train.iterations=50",
            "train.lr_g=1e30",
            "train.warmup_g=0",
            "train.grad_clip=0",
            "output.checkpoint_every=1",
        ],
    );
    let err = match run_quiet(cfg) {
        Ok(_) => panic!("a learning rate of 1e30 must diverge"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("step ") && (err.contains("loss_diff") || err.contains("gradient norm")),
        "{err}"
    );
    let latest = adt::train::checkpoint::latest(dir.path())
        .unwrap()
        .expect("a checkpoint before the divergence");
    assert!(latest
        .join("unet/diffusion_pytorch_model.safetensors")
        .is_file());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("checkpoints"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary checkpoint folders left behind"
    );
}
