//! Parity with diffusers 0.42.1 schedulers (fixtures in tests/fixtures/schedulers) and
//! algebraic properties of the coefficient form.

use super::*;
use crate::fixtures;
use tch::Tensor;

/// The fixtures' stand-in model: eps(x, t) = 0.3 tanh(x) + 0.01 t / 1000.
fn standin(x: &Tensor, t: f64) -> Tensor {
    x.tanh() * 0.3 + 0.01 * (t / 1000.0)
}

/// Unconditional branch for CFG: 0.2 tanh(0.5 x) - 0.005 t / 1000.
fn standin_u(x: &Tensor, t: f64) -> Tensor {
    (x * 0.5).tanh() * 0.2 - 0.005 * (t / 1000.0)
}

fn plan_for(
    name: &str,
) -> (
    Plan,
    std::collections::HashMap<String, Tensor>,
    serde_json::Value,
) {
    let dir = fixtures::dir(&format!("schedulers/{name}"));
    let cfg = ScheduleConfig::from_file(&dir.join("scheduler_config.json")).unwrap();
    let case = fixtures::case(&format!("schedulers/{name}")).unwrap();
    let n = case["num_inference_steps"].as_u64().unwrap() as usize;
    let kind = match case["class_name"].as_str().unwrap() {
        "diffusers.DDIMScheduler" => SamplerKind::Ddim,
        "diffusers.DPMSolverMultistepScheduler" => SamplerKind::DpmSolverPp2m,
        _ => SamplerKind::FlowEuler,
    };
    let plan = Plan::new(&cfg, kind, n).unwrap();
    let io = fixtures::io(&format!("schedulers/{name}")).unwrap();
    (plan, io, case)
}

fn run(plan: &Plan, start: usize, x: Tensor, guidance: Option<f64>) -> Vec<Tensor> {
    let mut traj = Vec::new();
    let _ = sample_loop(
        plan,
        start,
        x,
        |x, t, _| match guidance {
            None => standin(x, t),
            Some(g) => cfg_combine(&standin_u(x, t), &standin(x, t), g),
        },
        |_, x| traj.push(x.shallow_clone()),
    );
    traj
}

/// Max relative error over the whole trajectory and the worst per-step error.
fn traj_err(ours: &[Tensor], reference: &Tensor) -> (f64, f64) {
    let ours = Tensor::stack(ours, 0);
    let whole = fixtures::max_rel_err(&ours, reference);
    let per_step = (0..reference.size()[0])
        .map(|i| fixtures::max_rel_err(&ours.get(i), &reference.get(i)))
        .fold(0.0, f64::max);
    (whole, per_step)
}

const TOL: f64 = 1e-6;

fn check_case(name: &str) {
    let (plan, io, case) = plan_for(name);
    // Timesteps exactly.
    let ts = &io["timesteps"];
    let ref_ts: Vec<f64> = Vec::<f64>::try_from(&ts.to_kind(tch::Kind::Double)).unwrap();
    assert_eq!(plan.timesteps, ref_ts, "{name}: timesteps differ");
    // Tables.
    if let Some(ac) = io.get("alphas_cumprod") {
        let ours = Tensor::from_slice(&plan.alphas_cumprod);
        let e = fixtures::max_rel_err(&ours, ac);
        println!("{name}: alphas_cumprod rel err {e:.2e}");
        assert!(e <= 1e-7, "{name}: alphas_cumprod rel err {e}");
    }
    if let Some(sig) = io.get("sigmas") {
        let ours = Tensor::from_slice(&plan.sigmas);
        let e = fixtures::max_rel_err(&ours, sig);
        println!("{name}: sigmas rel err {e:.2e}");
        assert!(e <= 1e-7, "{name}: sigmas rel err {e}");
    }
    // Full trajectory.
    let traj = run(&plan, 0, io["x_T"].shallow_clone(), None);
    let (whole, step) = traj_err(&traj, &io["full.traj"]);
    println!("{name}: full trajectory rel err {whole:.2e} (worst step {step:.2e})");
    assert!(whole <= TOL, "{name}: full trajectory rel err {whole}");
    // Image-to-image from step s.
    let s = case["calls"][1]["s"].as_u64().unwrap() as usize;
    let x_s = plan.add_noise(&io["img2img.x0"], &io["img2img.noise"], s);
    let e = fixtures::max_rel_err(&x_s, &io["img2img.x_s"]);
    println!("{name}: img2img x_s rel err {e:.2e}");
    assert!(e <= TOL, "{name}: img2img x_s rel err {e}");
    let traj = run(&plan, s, x_s, None);
    let (whole, step) = traj_err(&traj, &io["img2img.traj"]);
    println!("{name}: img2img trajectory rel err {whole:.2e} (worst step {step:.2e})");
    assert!(whole <= TOL, "{name}: img2img trajectory rel err {whole}");
    // Classifier-free guidance.
    let traj = run(&plan, 0, io["x_T"].shallow_clone(), Some(7.0));
    let (whole, step) = traj_err(&traj, &io["cfg.traj"]);
    println!("{name}: cfg trajectory rel err {whole:.2e} (worst step {step:.2e})");
    assert!(whole <= TOL, "{name}: cfg trajectory rel err {whole}");
}

#[test]
fn parity_ddim_eps() {
    check_case("ddim_eps");
}

#[test]
fn parity_ddim_v() {
    check_case("ddim_v");
}

#[test]
fn parity_dpmpp2m_eps() {
    check_case("dpmpp2m_eps");
}

#[test]
fn parity_dpmpp2m_v() {
    check_case("dpmpp2m_v");
}

#[test]
fn parity_flow_euler_sd3() {
    check_case("flow_euler_sd3");
}

/// The table recomputed from the config alone (not read from the fixture) matches.
#[test]
fn alphas_cumprod_recomputed_from_config() {
    let (plan, io, _) = plan_for("ddim_eps");
    let fresh = alphas_cumprod(&plan.config).unwrap();
    let e = fixtures::max_rel_err(&Tensor::from_slice(&fresh), &io["alphas_cumprod"]);
    assert!(e == 0.0, "rel err {e}");
}

#[test]
fn other_beta_schedules_are_sane() {
    for sched in [BetaSchedule::Linear, BetaSchedule::SquaredcosCapV2] {
        let cfg = ScheduleConfig {
            beta_schedule: sched,
            beta_start: 1e-4,
            beta_end: 0.02,
            ..ScheduleConfig::sd15()
        };
        let ac = alphas_cumprod(&cfg).unwrap();
        assert_eq!(ac.len(), 1000);
        assert!(
            ac.windows(2).all(|w| w[1] < w[0]),
            "{sched:?}: not decreasing"
        );
        assert!(
            ac[0] < 1.0 && ac[0] > 0.99 && ac[999] < 0.01,
            "{sched:?}: {} {}",
            ac[0],
            ac[999]
        );
    }
    // Linear: first beta = beta_start exactly (float32).
    let cfg = ScheduleConfig {
        beta_schedule: BetaSchedule::Linear,
        beta_start: 1e-4,
        beta_end: 0.02,
        ..ScheduleConfig::sd15()
    };
    let ac = alphas_cumprod(&cfg).unwrap();
    assert!((ac[0] - (1.0 - 1e-4f32 as f64)).abs() < 1e-7);
}

/// A step applied to x0 noised to t_i with the exact noise as model output must land
/// exactly on x0 noised to t_{i-1} (DDIM is exact for a perfect epsilon model), for
/// epsilon and v prediction alike.
#[test]
fn ddim_is_exact_for_a_perfect_model() {
    for pred in [Prediction::Epsilon, Prediction::VPrediction] {
        let cfg = ScheduleConfig {
            prediction_type: pred,
            ..ScheduleConfig::sd15()
        };
        let plan = Plan::new(&cfg, SamplerKind::Ddim, 20).unwrap();
        let x0 = Tensor::randn([2, 3], (tch::Kind::Double, tch::Device::Cpu));
        let eps = Tensor::randn([2, 3], (tch::Kind::Double, tch::Device::Cpu));
        for i in 0..plan.len() - 1 {
            let (a, s) = plan.alpha_sigma(i);
            let x = &x0 * a + &eps * s;
            let out = plan.target(&x0, &eps, i);
            let c = plan.coeffs(i, 0);
            let next = plan.apply(&c, &x, &out, &[]);
            let (a1, s1) = plan.alpha_sigma(i + 1);
            let want = &x0 * a1 + &eps * s1;
            let e = fixtures::max_rel_err(&next, &want);
            assert!(e < 1e-10, "{pred:?} step {i}: {e}");
        }
    }
}

/// The flow Euler step is exact along the straight path x_t = (1 - t) x0 + t eps.
#[test]
fn flow_euler_is_exact_on_straight_paths() {
    let plan = Plan::new(&ScheduleConfig::sd3(), SamplerKind::FlowEuler, 10).unwrap();
    let x0 = Tensor::randn([4], (tch::Kind::Double, tch::Device::Cpu));
    let eps = Tensor::randn([4], (tch::Kind::Double, tch::Device::Cpu));
    let x = plan.add_noise(&x0, &eps, 0);
    let out = plan.target(&x0, &eps, 0);
    let final_x = sample_loop(&plan, 0, x, |_, _, _| out.shallow_clone(), |_, _| {});
    assert!(fixtures::max_rel_err(&final_x, &x0) < 1e-6);
}

/// Samplers refuse schedules of the other family, with a message naming the sampler.
#[test]
fn sampler_schedule_mismatch_is_an_error() {
    let e = Plan::new(&ScheduleConfig::sd15(), SamplerKind::FlowEuler, 10).unwrap_err();
    assert!(e.to_string().contains("flow"), "{e}");
    let e = Plan::new(&ScheduleConfig::sd3(), SamplerKind::Ddim, 10).unwrap_err();
    assert!(e.to_string().contains("DDPM"), "{e}");
    let e = Plan::new(&ScheduleConfig::sd15(), SamplerKind::Ddim, 0).unwrap_err();
    assert!(e.to_string().contains("num_inference_steps"), "{e}");
}

#[test]
fn unsupported_scheduler_fields_are_named() {
    let v = serde_json::json!({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"});
    let e = ScheduleConfig::from_json(&v).unwrap_err().to_string();
    assert!(e.contains("algorithm_type"), "{e}");
    let v = serde_json::json!({"_class_name": "DDIMScheduler", "prediction_type": "sample"});
    let e = ScheduleConfig::from_json(&v).unwrap_err().to_string();
    assert!(e.contains("prediction_type"), "{e}");
}
