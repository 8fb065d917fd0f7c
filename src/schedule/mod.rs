//! Noise schedules and samplers.
//!
//! Every sampler step is exposed as explicit linear coefficients (paper Eq. 3):
//!
//! ```text
//! x_next = a * x + b * out + sum_j c_j * h_j
//! ```
//!
//! where `out` is the model output at this step (epsilon, v or flow velocity, whatever
//! the model predicts) and `h_j` are history terms kept by multistep solvers (for
//! DPM-Solver++ 2M the previous data prediction). After the step a multistep solver
//! records `h = p * x + q * out`. Inference ([`Plan::step`]) and training (the ADT
//! path constraint of Eq. 11 / 13, which decides what is detached) use the same
//! coefficients from [`Plan::coeffs`].

mod config;
pub use config::{BetaSchedule, Prediction, SamplerKind, ScheduleConfig, Spacing};

use anyhow::{bail, Result};
use tch::{Kind, Tensor};

/// The coefficients of one sampler step, see the module docs.
#[derive(Debug, Clone, PartialEq)]
pub struct StepCoeffs {
    /// Coefficient on the current state x.
    pub a: f64,
    /// Coefficient on the current model output.
    pub b: f64,
    /// Coefficients on the history terms, most recent first.
    pub c: Vec<f64>,
    /// This step's history term h = p * x + q * out (multistep solvers only).
    pub hist: Option<(f64, f64)>,
    /// DDIM only: sqrt(alpha_t), sqrt(1 - alpha_t), sqrt(alpha_prev), sqrt(1 - alpha_prev)
    /// as float32 values, so that inference can evaluate the step in diffusers'
    /// factored order (x0 and eps predictions). The value equals a x + b out.
    pub ddim: Option<[f32; 4]>,
}

/// A discretised sampling path for a given number of inference steps: the timestep
/// list and everything needed to step along it, start from any index
/// (image-to-image) and form training targets.
#[derive(Debug, Clone)]
pub struct Plan {
    pub config: ScheduleConfig,
    pub kind: SamplerKind,
    /// Timestep value handed to the model at each step (integer-valued for DDPM
    /// schedules; sigma * num_train_timesteps for flow matching).
    pub timesteps: Vec<f64>,
    /// DDPM: cumulative alpha products of the training schedule (float32 values as
    /// diffusers computes them, held in f64).
    pub alphas_cumprod: Vec<f64>,
    /// DPM-Solver / flow: sigma per step, with the final sigma appended (len N + 1).
    pub sigmas: Vec<f64>,
    /// DDIM: alpha_cumprod used after the last step.
    pub final_alpha_cumprod: f64,
}

/// Cumulative alpha products of a DDPM beta schedule, computed in float32 exactly as
/// diffusers does (the tables are part of what the parity tests check).
pub fn alphas_cumprod(cfg: &ScheduleConfig) -> Result<Vec<f64>> {
    let n = cfg.num_train_timesteps as i64;
    let opts = (Kind::Float, tch::Device::Cpu);
    let betas = match cfg.beta_schedule {
        BetaSchedule::Linear => Tensor::linspace(cfg.beta_start, cfg.beta_end, n, opts),
        BetaSchedule::ScaledLinear => {
            Tensor::linspace(cfg.beta_start.sqrt(), cfg.beta_end.sqrt(), n, opts)
                .pow_tensor_scalar(2)
        }
        BetaSchedule::SquaredcosCapV2 => {
            // Glide cosine schedule, computed in float64 by diffusers, then float32.
            let f = |t: f64| {
                ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                    .cos()
                    .powi(2)
            };
            let v: Vec<f64> = (0..n)
                .map(|i| {
                    let t1 = i as f64 / n as f64;
                    let t2 = (i + 1) as f64 / n as f64;
                    (1.0 - f(t2) / f(t1)).min(0.999)
                })
                .collect();
            Tensor::from_slice(&v).to_kind(Kind::Float)
        }
        BetaSchedule::FlowMatching => {
            bail!("alphas_cumprod: flow-matching schedules have no betas")
        }
    };
    let alphas: Tensor = 1.0 - betas;
    let ac = alphas.cumprod(0, Kind::Float);
    Ok(Vec::<f32>::try_from(&ac)?
        .into_iter()
        .map(f64::from)
        .collect())
}

fn ddpm_timesteps(cfg: &ScheduleConfig, n: usize, kind: SamplerKind) -> Result<Vec<f64>> {
    let t_train = cfg.num_train_timesteps;
    if n == 0 || n > t_train {
        bail!("num_inference_steps must be in 1..={t_train}, got {n}");
    }
    let off = cfg.steps_offset as f64;
    Ok(match cfg.timestep_spacing {
        Spacing::Leading => {
            if kind == SamplerKind::DpmSolverPp2m {
                // diffusers' multistep solver spaces N + 1 points and drops the last.
                let ratio = (t_train / (n + 1)) as f64;
                (0..=n)
                    .rev()
                    .take(n)
                    .map(|i| (i as f64 * ratio).round() + off)
                    .collect()
            } else {
                let ratio = (t_train / n) as f64;
                (0..n)
                    .rev()
                    .map(|i| (i as f64 * ratio).round() + off)
                    .collect()
            }
        }
        Spacing::Trailing => {
            let ratio = t_train as f64 / n as f64;
            (0..n)
                .map(|i| (t_train as f64 - i as f64 * ratio).round() - 1.0)
                .collect()
        }
        Spacing::Linspace => {
            let last = (t_train - 1) as f64;
            (0..n)
                .rev()
                .map(|i| (i as f64 * last / (n - 1).max(1) as f64).round())
                .collect()
        }
    })
}

fn shift_sigma(s: f64, shift: f64) -> f64 {
    shift * s / (1.0 + (shift - 1.0) * s)
}

impl Plan {
    /// Build the path for `n` inference steps.
    pub fn new(config: &ScheduleConfig, kind: SamplerKind, n: usize) -> Result<Plan> {
        config.validate_for(kind)?;
        let cfg = config.clone();
        match kind {
            SamplerKind::Ddim | SamplerKind::DpmSolverPp2m => {
                let ac = alphas_cumprod(&cfg)?;
                let timesteps = ddpm_timesteps(&cfg, n, kind)?;
                for &t in &timesteps {
                    if t < 0.0 || t as usize >= ac.len() {
                        bail!(
                            "timestep {t} outside the training schedule (steps_offset too large?)"
                        );
                    }
                }
                let final_alpha_cumprod = if cfg.set_alpha_to_one { 1.0 } else { ac[0] };
                let mut sigmas = Vec::new();
                if kind == SamplerKind::DpmSolverPp2m {
                    // sqrt((1 - ac) / ac) at the timesteps, rounded to float32 as diffusers.
                    for &t in &timesteps {
                        let a = ac[t as usize] as f32;
                        let s = ((1.0f32 - a) / a).powf(0.5);
                        sigmas.push(s as f64);
                    }
                    sigmas.push(0.0);
                }
                Ok(Plan {
                    config: cfg,
                    kind,
                    timesteps,
                    alphas_cumprod: ac,
                    sigmas,
                    final_alpha_cumprod,
                })
            }
            SamplerKind::FlowEuler => {
                let t_train = cfg.num_train_timesteps as f64;
                let shift = cfg.shift;
                // Training sigmas are shifted once at construction (in float32) ...
                let shift32 = |s: f32| (shift as f32) * s / (1.0 + (shift as f32 - 1.0) * s);
                let sigma_min = shift32(1.0 / t_train as f32) as f64;
                let sigma_max = shift32(1.0) as f64;
                let (t_max, t_min) = (sigma_max * t_train, sigma_min * t_train);
                // ... and the inference grid, spaced linearly in t, is shifted again.
                let sig: Vec<f64> = (0..n)
                    .map(|i| {
                        // np.linspace: start + i * step, the last point exactly `stop`.
                        let t = if n == 1 {
                            t_max
                        } else if i == n - 1 {
                            t_min
                        } else {
                            i as f64 * ((t_min - t_max) / (n - 1) as f64) + t_max
                        };
                        shift_sigma(t / t_train, shift) as f32 as f64
                    })
                    .collect();
                let timesteps: Vec<f64> = sig
                    .iter()
                    .map(|s| (*s as f32 * t_train as f32) as f64)
                    .collect();
                let mut sigmas = sig;
                sigmas.push(0.0);
                Ok(Plan {
                    config: cfg,
                    kind,
                    timesteps,
                    alphas_cumprod: vec![],
                    sigmas,
                    final_alpha_cumprod: 1.0,
                })
            }
        }
    }

    /// Number of inference steps.
    pub fn len(&self) -> usize {
        self.timesteps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.timesteps.is_empty()
    }

    /// What the model predicts.
    pub fn prediction(&self) -> Prediction {
        if self.kind == SamplerKind::FlowEuler {
            Prediction::Flow
        } else {
            self.config.prediction_type
        }
    }

    /// (alpha, sigma) of the forward process at step index `i`:
    /// x_t = alpha * x0 + sigma * eps (flow: alpha = 1 - t, sigma = t).
    pub fn alpha_sigma(&self, i: usize) -> (f64, f64) {
        match self.kind {
            SamplerKind::FlowEuler => {
                let s = self.sigmas[i];
                (1.0 - s, s)
            }
            _ => {
                let ac = self.alphas_cumprod[self.timesteps[i] as usize];
                (ac.sqrt(), (1.0 - ac).sqrt())
            }
        }
    }

    /// Noise `x0` to step index `i` (image-to-image start, paper Eq. 7 / Alg. 1 line 4).
    /// Computed in the tensor's dtype in the same order as diffusers' `add_noise` /
    /// `scale_noise`.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, i: usize) -> Tensor {
        match self.kind {
            SamplerKind::FlowEuler => {
                let s = self.sigmas[i] as f32 as f64;
                noise * s + x0 * (1.0 - s)
            }
            _ => {
                let ac = self.alphas_cumprod[self.timesteps[i] as usize] as f32;
                let sa = ac.sqrt() as f64;
                let sb = (1.0f32 - ac).sqrt() as f64;
                x0 * sa + noise * sb
            }
        }
    }

    /// The diffusion-loss target for noise `eps` added to `x0` at step index `i`
    /// (epsilon: eps; v: alpha eps - sigma x0; flow: eps - x0).
    pub fn target(&self, x0: &Tensor, eps: &Tensor, i: usize) -> Tensor {
        let (alpha, sigma) = self.alpha_sigma(i);
        match self.prediction() {
            Prediction::Epsilon => eps.shallow_clone(),
            Prediction::VPrediction => eps * alpha - x0 * sigma,
            Prediction::Flow => eps - x0,
        }
    }

    /// Coefficients of step `i`; `history_len` is the number of history terms the
    /// run has accumulated (0 for the first step of a run, which is why an
    /// image-to-image run starts with a first-order DPM step).
    pub fn coeffs(&self, i: usize, history_len: usize) -> StepCoeffs {
        let pred = self.prediction();
        match self.kind {
            SamplerKind::Ddim => {
                let t = self.timesteps[i] as usize;
                let at = self.alphas_cumprod[t];
                let prev = t as i64 - (self.config.num_train_timesteps / self.len()) as i64;
                let ap = if prev >= 0 {
                    self.alphas_cumprod[prev as usize]
                } else {
                    self.final_alpha_cumprod
                };
                // x0 = p x + q out; eps = r x + s out; x_prev = sqrt(ap) x0 + sqrt(1 - ap) eps.
                let (p, q, r, s) = match pred {
                    Prediction::Epsilon => {
                        (1.0 / at.sqrt(), -(1.0 - at).sqrt() / at.sqrt(), 0.0, 1.0)
                    }
                    Prediction::VPrediction => {
                        (at.sqrt(), -(1.0 - at).sqrt(), (1.0 - at).sqrt(), at.sqrt())
                    }
                    Prediction::Flow => unreachable!("validated"),
                };
                let (sap, sbp) = (ap.sqrt(), (1.0 - ap).sqrt());
                let (at32, ap32) = (at as f32, ap as f32);
                let ddim = [
                    at32.sqrt(),
                    (1.0 - at32).sqrt(),
                    ap32.sqrt(),
                    (1.0 - ap32).sqrt(),
                ];
                StepCoeffs {
                    a: sap * p + sbp * r,
                    b: sap * q + sbp * s,
                    c: vec![],
                    hist: None,
                    ddim: Some(ddim),
                }
            }
            SamplerKind::DpmSolverPp2m => {
                let n = self.len();
                let (s0, st) = (self.sigmas[i], self.sigmas[i + 1]);
                let alpha_of = |s: f64| 1.0 / (s * s + 1.0).sqrt();
                let (a0, sg0) = (alpha_of(s0), s0 * alpha_of(s0));
                let (at, sgt) = (alpha_of(st), st * alpha_of(st));
                // Data prediction x0 = p x + q out.
                let (p, q) = match pred {
                    Prediction::Epsilon => (1.0 / a0, -sg0 / a0),
                    Prediction::VPrediction => (a0, -sg0),
                    Prediction::Flow => unreachable!("validated"),
                };
                // exp(-h) = (sigma_t / alpha_t) / (sigma_s / alpha_s); zero at the final sigma 0.
                let ratio_sigma = if st == 0.0 { 0.0 } else { sgt / sg0 };
                let em1 = if st == 0.0 {
                    -1.0
                } else {
                    (sgt / at) / (sg0 / a0) - 1.0
                };
                let k = -at * em1; // x_t = ratio * x + k * D0 (+ 0.5 k D1)
                let lower_final = i == n - 1
                    && (self.config.euler_at_final
                        || (self.config.lower_order_final && n < 15)
                        || self.config.final_sigmas_zero());
                let order2 = self.config.solver_order >= 2 && history_len >= 1 && !lower_final;
                if order2 {
                    let s1 = self.sigmas[i - 1];
                    let lam = |s: f64| alpha_of(s).ln() - (s * alpha_of(s)).ln();
                    let h = lam(st) - lam(s0);
                    let h0 = lam(s0) - lam(s1);
                    let r0 = h0 / h;
                    // D0 = m0, D1 = (m0 - m1) / r0: x_t = ratio x + k m0 + 0.5 k (m0 - m1) / r0.
                    let km0 = k * (1.0 + 0.5 / r0);
                    let km1 = -0.5 * k / r0;
                    StepCoeffs {
                        a: ratio_sigma + km0 * p,
                        b: km0 * q,
                        c: vec![km1],
                        hist: Some((p, q)),
                        ddim: None,
                    }
                } else {
                    StepCoeffs {
                        a: ratio_sigma + k * p,
                        b: k * q,
                        c: vec![],
                        hist: Some((p, q)),
                        ddim: None,
                    }
                }
            }
            SamplerKind::FlowEuler => {
                // dt = sigma_next - sigma, a float32 difference as in diffusers.
                let dt = (self.sigmas[i + 1] as f32 - self.sigmas[i] as f32) as f64;
                StepCoeffs {
                    a: 1.0,
                    b: dt,
                    c: vec![],
                    hist: None,
                    ddim: None,
                }
            }
        }
    }

    /// One inference step: x_next from x and the model output at step index `i`.
    /// `history` holds the multistep history (most recent first) and is updated.
    pub fn step(&self, i: usize, x: &Tensor, out: &Tensor, history: &mut Vec<Tensor>) -> Tensor {
        let c = self.coeffs(i, history.len());
        let next = self.apply(&c, x, out, history);
        self.push_history(&c, x, out, history);
        next
    }

    /// x_next = a x + b out + sum c_j h_j.
    pub fn apply(&self, c: &StepCoeffs, x: &Tensor, out: &Tensor, history: &[Tensor]) -> Tensor {
        if self.kind == SamplerKind::FlowEuler {
            // Euler: x + dt * v, computed in this order as diffusers does.
            return x + out * c.b;
        }
        if let (Some([sa, sb, sap, sbp]), Kind::Float) = (c.ddim, x.kind()) {
            // Float32 DDIM in diffusers' order: the same value as a x + b out.
            let (sa, sb, sap, sbp) = (sa as f64, sb as f64, sap as f64, sbp as f64);
            return match self.prediction() {
                Prediction::VPrediction => {
                    let x0 = x * sa - out * sb;
                    let eps = out * sa + x * sb;
                    x0 * sap + eps * sbp
                }
                _ => {
                    let x0 = (x - out * sb) / sa;
                    x0 * sap + out * sbp
                }
            };
        }
        // Evaluated in float64 (at least) to keep rounding below the reference's.
        let kind = x.kind();
        let wide = |t: &Tensor| {
            if kind == Kind::Float {
                t.to_kind(Kind::Double)
            } else {
                t.shallow_clone()
            }
        };
        let mut next = wide(x) * c.a + wide(out) * c.b;
        for (cj, h) in c.c.iter().zip(history.iter()) {
            next += wide(h) * *cj;
        }
        next.to_kind(kind)
    }

    /// Record this step's history term (detached: history terms carry no gradient).
    pub fn push_history(
        &self,
        c: &StepCoeffs,
        x: &Tensor,
        out: &Tensor,
        history: &mut Vec<Tensor>,
    ) {
        if let Some((p, q)) = c.hist {
            let h = (x.detach() * p + out.detach() * q).detach();
            history.insert(0, h);
            history.truncate(self.config.solver_order.max(1) - 1);
        }
    }
}

/// Classifier-free guidance: uncond + g (cond - uncond), in that order.
pub fn cfg_combine(uncond: &Tensor, cond: &Tensor, scale: f64) -> Tensor {
    uncond + (cond - uncond) * scale
}

/// Run the sampler from step index `start` (with x at that step) to the end.
/// `model(x, t, i)` returns the (already guided) model output.
pub fn sample_loop(
    plan: &Plan,
    start: usize,
    x: Tensor,
    mut model: impl FnMut(&Tensor, f64, usize) -> Tensor,
    mut on_step: impl FnMut(usize, &Tensor),
) -> Tensor {
    let mut history = Vec::new();
    let mut x = x;
    for i in start..plan.len() {
        let out = model(&x, plan.timesteps[i], i);
        x = plan.step(i, &x, &out, &mut history);
        on_step(i, &x);
    }
    x
}

#[cfg(test)]
mod tests;
