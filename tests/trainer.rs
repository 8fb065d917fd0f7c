//! The ADT trainer on tiny random models of the real architectures (CPU).

use adt::models::denoiser::{guided_output, Cond, Guidance, UNetDenoiser};
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

/// Every parameter's gradient, sorted by name. A parameter without a gradient fails
/// the test: on these models every parameter reaches the output.
fn grads(vs: &tch::nn::VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v.into_iter()
        .map(|(k, t)| {
            let g = t.grad();
            assert!(g.defined(), "{k}: no gradient");
            assert!(
                g.abs().max().double_value(&[]) > 0.0,
                "{k}: the gradient is zero"
            );
            (k, g.copy())
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
        assert_eq!(full.len(), dec.len());
        let mut worst = 0.0f64;
        for ((k, a), (_, b)) in full.iter().zip(&dec) {
            let e = common::fixtures::max_rel_err(b, a);
            // float64: the two orders of summation agree to rounding.
            assert!(e < 1e-10, "{kind:?}/{path:?} {k}: rel err {e}");
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

/// Eq. 12 across a multi-step trajectory, against finite differences: the generator
/// gradient of ADT (and DRTune) is the derivative of
///
/// `Phi(theta) = L(x_final + sum_kept b_t s_t (eps_theta(x_t) - eps_theta0(x_t))) +
/// lambda mse(eps_theta^cond(x_s), target)`
///
/// with the states x_t of the sampled trajectory held fixed (the stop-gradients of
/// Eq. 11 / Eq. 4) and s_t = 1 (ADT) or the product of the later a's (DRTune). Phi is
/// evaluated here with plain forward calls at theta +- h d, so the backward machinery
/// (and the coefficients b_t, the guidance, the diffusion term) is checked from outside.
#[test]
fn kept_step_gradient_matches_finite_differences_over_a_trajectory() {
    let _guard = lock();
    let unet = tiny_unet_f64();
    let den = UNetDenoiser(&unet.model);
    let opts = (Kind::Double, Device::Cpu);
    let cond = Cond::new(Tensor::randn([1, 5, 16], opts));
    let uncond = Cond::new(Tensor::randn([1, 5, 16], opts));
    let g = Guidance::new(&uncond, &cond, 3.0);
    let vars: Vec<(String, Tensor)> = {
        let mut v: Vec<_> = unet.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    for (kind, path) in [
        (SamplerKind::Ddim, GradPath::Adt),
        (SamplerKind::DpmSolverPp2m, GradPath::Drtune),
    ] {
        let plan = Plan::new(&ScheduleConfig::sd15(), kind, 6).unwrap();
        let z0 = Tensor::randn([1, 4, 8, 8], opts);
        let eps = Tensor::randn([1, 4, 8, 8], opts);
        let w = Tensor::randn([1, 4, 8, 8], opts);
        let (start, lambda) = (1, 0.7);
        let kept = vec![1, 2, 4, 5];
        let xs = plan.add_noise(&z0, &eps, start);
        let target = plan.target(&z0, &eps, start);
        let loss = |xf: &Tensor| (xf.sin() * &w).sum(Kind::Double);

        zero_grads(&unet.vs);
        let r = rollout(&den, &plan, start, &xs, &kept, &g, path).unwrap();
        assert_eq!(r.kept.len(), kept.len());
        let leaf = r.final_x.detach().set_requires_grad(true);
        loss(&leaf).backward();
        backprop_kept(
            &den,
            &plan,
            &r.kept,
            &leaf.grad(),
            &g,
            Some((start, &target, lambda)),
        )
        .unwrap();
        let grad = grads(&unet.vs);
        zero_grads(&unet.vs);

        let out0: Vec<Tensor> = tch::no_grad(|| {
            r.kept
                .iter()
                .map(|k| {
                    guided_output(&den, &k.x, plan.timesteps[k.index], &g)
                        .unwrap()
                        .0
                })
                .collect()
        });
        let phi = || -> f64 {
            tch::no_grad(|| {
                let mut xf = r.final_x.copy();
                let mut diff = 0.0;
                for (k, o0) in r.kept.iter().zip(&out0) {
                    let (o, c) = guided_output(&den, &k.x, plan.timesteps[k.index], &g).unwrap();
                    xf += (o - o0) * k.weight;
                    if k.index == start {
                        diff = (c - &target).square().mean(Kind::Double).double_value(&[]);
                    }
                }
                loss(&xf).double_value(&[]) + lambda * diff
            })
        };
        for trial in 0..2 {
            let dirs: Vec<Tensor> = vars.iter().map(|(_, t)| t.randn_like()).collect();
            let analytic: f64 = grad
                .iter()
                .zip(&dirs)
                .map(|((_, g), d)| (g * d).sum(Kind::Double).double_value(&[]))
                .sum();
            let h = 1e-6;
            let shift = |by: f64| {
                tch::no_grad(|| {
                    for ((_, v), d) in vars.iter().zip(&dirs) {
                        let _ = v.shallow_clone().g_add_(&(d * by));
                    }
                })
            };
            shift(h);
            let up = phi();
            shift(-2.0 * h);
            let down = phi();
            shift(h);
            let fd = (up - down) / (2.0 * h);
            let rel = (fd - analytic).abs() / analytic.abs().max(1e-12);
            println!(
                "{kind:?}/{path:?} kept {kept:?} direction {trial}: analytic {analytic:.10e}, \
                 finite differences {fd:.10e}, rel err {rel:.1e}"
            );
            assert!(
                rel < 1e-6,
                "{kind:?}/{path:?}: analytic {analytic} vs finite differences {fd}"
            );
        }
    }
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

/// A run stopped after a checkpoint and resumed gives bit-identical losses and ends
/// in a bit-identical state (weights, both optimisers' moments, generator EMA,
/// discriminator variables, BatchNorm statistics and EMA duals).
#[test]
fn resume_is_bit_identical() {
    let _guard = lock();
    tch::set_num_threads(1);
    let a = tempfile::tempdir().unwrap();
    let over = [
        "train.iterations=6",
        "train.h=2",
        "train.ema_decay=0.9",
        "output.checkpoint_every=3",
    ];
    let whole = run(
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
    common::assert_same_state(&whole, &tr);
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

/// The parameter gradient of `backprop_kept` for the given kept steps, diffusion term
/// and gradient path, as (name, gradient) sorted by name (undefined -> None).
#[allow(clippy::too_many_arguments)]
fn kept_grads(
    unet: &LoadedUNet,
    plan: &Plan,
    g: &Guidance,
    xs: &Tensor,
    start: usize,
    kept: &[usize],
    only: Option<usize>,
    w: &Tensor,
    path: GradPath,
    diffusion: Option<(&Tensor, f64)>,
) -> Vec<(String, Option<Tensor>)> {
    let den = UNetDenoiser(&unet.model);
    zero_grads(&unet.vs);
    let r = rollout(&den, plan, start, xs, kept, g, path).unwrap();
    let steps: Vec<_> = r
        .kept
        .into_iter()
        .filter(|k| only.is_none_or(|i| k.index == i))
        .collect();
    let leaf = r.final_x.detach().set_requires_grad(true);
    (leaf.tanh() * w).sum(Kind::Double).backward();
    backprop_kept(
        &den,
        plan,
        &steps,
        &leaf.grad(),
        g,
        diffusion.map(|(t, l)| (start, t, l)),
    )
    .unwrap();
    let mut v: Vec<(String, Tensor)> = unet.vs.variables().into_iter().collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    let out = v
        .into_iter()
        .map(|(k, t)| {
            let g = t.grad();
            (k, g.defined().then(|| g.copy()))
        })
        .collect();
    zero_grads(&unet.vs);
    out
}

/// `max |a - c b| / max |c b|` over every parameter (both defined).
fn worst_scaled(a: &[(String, Option<Tensor>)], b: &[(String, Option<Tensor>)], c: f64) -> f64 {
    let mut worst = 0.0f64;
    for ((k, x), (_, y)) in a.iter().zip(b) {
        match (x, y) {
            (Some(x), Some(y)) => worst = worst.max(common::fixtures::max_rel_err(x, &(y * c))),
            (None, None) => {}
            _ => panic!("{k}: gradient defined on one side only"),
        }
    }
    worst
}

/// Ablation `train.grad_path = drtune` (paper Eq. 4, appendix A.1): a kept step's
/// gradient is its ADT gradient times the product of the later steps' a, which for
/// DDIM telescopes to sqrt(alpha_cumprod_final) / sqrt(alpha_cumprod(t_{i+1})) (Eq. A3)
/// -- computed here by hand from the schedule table, as is each step's own output
/// coefficient b, not from the sampler's coefficients.
#[test]
fn drtune_scales_each_kept_step_by_the_later_alphas() {
    let _guard = lock();
    let unet = tiny_unet_f64();
    let opts = (Kind::Double, Device::Cpu);
    let cond = Cond::new(Tensor::randn([1, 5, 16], opts));
    let uncond = Cond::new(Tensor::randn([1, 5, 16], opts));
    let g = Guidance::new(&uncond, &cond, 3.0);
    let plan = Plan::new(&ScheduleConfig::sd15(), SamplerKind::Ddim, 6).unwrap();
    let n = plan.len();
    let xs = Tensor::randn([1, 4, 8, 8], opts);
    let w = Tensor::randn([1, 4, 8, 8], opts);
    let (start, kept) = (1, vec![1, 3, 5]);
    let den = UNetDenoiser(&unet.model);
    let r_adt = rollout(&den, &plan, start, &xs, &kept, &g, GradPath::Adt).unwrap();
    let r_dr = rollout(&den, &plan, start, &xs, &kept, &g, GradPath::Drtune).unwrap();
    // Same sample either way: the paths differ in the gradient only.
    assert!(r_adt.final_x.equal(&r_dr.final_x));
    let ac = |i: usize| plan.alphas_cumprod[plan.timesteps[i] as usize];
    for (ka, kd) in r_adt.kept.iter().zip(&r_dr.kept) {
        let i = ka.index;
        let hand = if i + 1 < n {
            (plan.final_alpha_cumprod / ac(i + 1)).sqrt()
        } else {
            1.0
        };
        // DDIM (epsilon): x_next = sqrt(ac_prev) x0_hat + sqrt(1 - ac_prev) eps with
        // x0_hat = (x - sqrt(1 - ac) eps) / sqrt(ac), so the output's own coefficient is
        // b = sqrt(1 - ac_prev) - sqrt(ac_prev (1 - ac) / ac); ADT's weight is b, DRTune's
        // b times the product of the later a's.
        let (a_t, a_prev) = (
            ac(i),
            if i + 1 < n {
                ac(i + 1)
            } else {
                plan.final_alpha_cumprod
            },
        );
        let b = (1.0 - a_prev).sqrt() - (a_prev * (1.0 - a_t) / a_t).sqrt();
        assert!(
            (ka.weight - b).abs() <= 1e-12 * b.abs(),
            "ADT step {i}: weight {} vs hand b {b}",
            ka.weight
        );
        assert!(
            (kd.weight - b * hand).abs() <= 1e-12 * (b * hand).abs(),
            "DRTune step {i}: weight {} vs hand b * prod a = {}",
            kd.weight,
            b * hand
        );
        if i + 1 < n {
            assert!(
                hand > 1.05,
                "step {i}: scale {hand} too close to 1 to discriminate"
            );
        }
        let adt = kept_grads(
            &unet,
            &plan,
            &g,
            &xs,
            start,
            &kept,
            Some(i),
            &w,
            GradPath::Adt,
            None,
        );
        let dr = kept_grads(
            &unet,
            &plan,
            &g,
            &xs,
            start,
            &kept,
            Some(i),
            &w,
            GradPath::Drtune,
            None,
        );
        let e = worst_scaled(&dr, &adt, hand);
        println!("step {i}: DRTune scale {hand:.6}, gradient vs hand-scaled ADT: {e:.1e}");
        assert!(e < 1e-12, "step {i}: {e}");
        assert!(
            adt.iter().any(|(_, t)| t
                .as_ref()
                .is_some_and(|t| t.abs().max().double_value(&[]) > 0.0)),
            "step {i}: no gradient at all"
        );
    }
}

/// Ablation `train.lambda = 0`: the diffusion term adds nothing to the gradient; with
/// lambda > 0 it adds lambda times the gradient of the start step's mse alone.
#[test]
fn lambda_zero_removes_the_diffusion_gradient() {
    let _guard = lock();
    let unet = tiny_unet_f64();
    let opts = (Kind::Double, Device::Cpu);
    let cond = Cond::new(Tensor::randn([1, 5, 16], opts));
    let uncond = Cond::new(Tensor::randn([1, 5, 16], opts));
    let g = Guidance::new(&uncond, &cond, 3.0);
    let plan = Plan::new(&ScheduleConfig::sd15(), SamplerKind::Ddim, 5).unwrap();
    let z0 = Tensor::randn([1, 4, 8, 8], opts);
    let eps = Tensor::randn([1, 4, 8, 8], opts);
    let w = Tensor::randn([1, 4, 8, 8], opts);
    let start = 1;
    let xs = plan.add_noise(&z0, &eps, start);
    let target = plan.target(&z0, &eps, start);
    let kept = vec![1, 3];
    let grads_at = |diffusion: Option<(&Tensor, f64)>| {
        kept_grads(
            &unet,
            &plan,
            &g,
            &xs,
            start,
            &kept,
            None,
            &w,
            GradPath::Adt,
            diffusion,
        )
    };
    let none = grads_at(None);
    let zero = grads_at(Some((&target, 0.0)));
    let half = grads_at(Some((&target, 0.5)));
    let one = grads_at(Some((&target, 1.0)));
    // lambda = 0: exactly the adversarial gradient.
    for ((k, a), (_, b)) in none.iter().zip(&zero) {
        match (a, b) {
            (Some(a), Some(b)) => assert!(a.equal(b), "{k}: lambda = 0 changed the gradient"),
            (None, None) => {}
            _ => panic!("{k}: gradient defined on one side only"),
        }
    }
    // lambda > 0 adds a linear term that is not zero: (G(1) - G(0)) = 2 (G(0.5) - G(0)).
    let mut moved = 0.0f64;
    let mut worst = 0.0f64;
    for (((k, z), (_, h)), (_, o)) in zero.iter().zip(&half).zip(&one) {
        let (z, h, o) = (
            z.as_ref().unwrap(),
            h.as_ref().unwrap(),
            o.as_ref().unwrap(),
        );
        let d1 = o - z;
        let d5 = (h - z) * 2.0;
        moved = moved.max(d1.abs().max().double_value(&[]));
        if d1.abs().max().double_value(&[]) > 0.0 {
            worst = worst.max(common::fixtures::max_rel_err(&d5, &d1));
        } else {
            assert_eq!(d5.abs().max().double_value(&[]), 0.0, "{k}");
        }
    }
    println!("diffusion term: largest gradient change {moved:.3e}, linearity error {worst:.1e}");
    assert!(moved > 1e-6, "the diffusion term has no gradient");
    assert!(worst < 1e-9, "{worst}");
}

/// Ablation `train.mode = ft`: no discriminator, no discriminator optimiser, no
/// feature network, and only the diffusion loss logged; an ADT run of the same
/// configuration has all of them.
#[test]
fn ft_touches_no_discriminator() {
    let _guard = lock();
    tch::set_num_threads(1);
    for mode in ["ft", "adt"] {
        let dir = tempfile::tempdir().unwrap();
        let mode_kv = format!("train.mode={mode}");
        let tr = run_quiet(tiny_config(
            dir.path(),
            &[
                &mode_kv,
                "train.iterations=2",
                "train.h=1",
                "output.checkpoint_every=0",
            ],
        ))
        .unwrap();
        let m = read_metrics(dir.path());
        assert_eq!(m.len(), 2);
        if mode == "ft" {
            assert!(
                tr.disc.is_none() && tr.opt_d.is_none(),
                "FT built a discriminator"
            );
            for line in &m {
                assert!(line["loss_diff"].as_f64().is_some(), "{line}");
                for k in ["loss_d", "d_acc", "loss_g_adv"] {
                    assert!(line.get(k).is_none(), "FT logged {k}: {line}");
                }
            }
        } else {
            assert!(tr.disc.is_some() && tr.opt_d.is_some());
            assert!(m[1]["loss_d"].as_f64().is_some(), "{}", m[1]);
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
