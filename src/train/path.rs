//! The sampled trajectory inside training, with the backward-flowing path
//! constraint of the paper (section 3.2).
//!
//! A training trajectory starts at step index `s` (image-to-image, Eq. 7) and runs
//! the inference sampler, with classifier-free guidance, to the end. A set of kept
//! steps (always `s`, plus up to K later ones, Alg. 1 line 5) produce model outputs
//! with gradient; all other outputs are computed without a graph. Per step:
//!
//! * ADT (Eq. 11): `x <- x + (a - 1) sg(x) + b eps(sg(x))`, so that
//!   d x_hat0 / d x_t = I for every t: each kept step gets the upstream gradient
//!   with unit scale.
//! * DRTune (Eq. 4): `x <- a x + b eps(sg(x))`: the gradient reaching step i is
//!   scaled by the product of the later a's (appendix A.1).
//!
//! Multistep solvers (DPM-Solver++ 2M) add a history term `c h_prev` with
//! `h_prev = p x_prev + q out_prev` (the previous data prediction). Its part in
//! `x_prev` is part of the linear part of the update, so Eq. 11 stops its gradient
//! like that of `a x` (otherwise d x_hat0 / d x_t would not be the identity); its
//! part in the model output keeps the gradient, so that a kept output reaches
//! x_hat0 with its whole coefficient in the sampler, `b` at its own step plus
//! `c q` through the next step's history:
//!
//! * ADT: `x <- x + (a - 1) sg(x) + b eps(sg(x)) + c (p sg(x_prev) + q eps_prev)`;
//! * DRTune: `x <- a x + b eps(sg(x)) + c (p x_prev + q eps_prev)` (only the model
//!   input is stopped, Eq. 4).
//!
//! Because every kept step receives the same upstream gradient g = dL/dx_hat0
//! (times a known scalar), the generator gradient decomposes exactly (Eq. 12):
//! `sum_t w_t (d eps_t / d theta)^T g`, where `w_t = d x_hat0 / d eps_t` is a
//! scalar: under ADT `b_t` (plus `c q_t` from the next step's history), under
//! DRTune the same coefficients times the gradient scale from the states they
//! enter to x_hat0 (the product of the later a's for one-step samplers, Eq. 10). [`rollout`] runs the trajectory without
//! any graph and stores the kept steps' inputs; [`backprop_kept`] recomputes one kept
//! step at a time with grad and backpropagates `<b_t s_t eps_t, g>`, so the peak
//! memory is one model graph whatever K is. [`rollout_graph`] is the direct version
//! (everything in one graph), kept as an option and as the test oracle.

use crate::models::denoiser::{guided_output, Denoiser, Guidance};
use crate::schedule::Plan;
use crate::train::config::GradPath;
use anyhow::Result;
use tch::{Kind, Tensor};

/// What [`rollout`] records about a kept step.
pub struct KeptStep {
    /// Step index in the plan.
    pub index: usize,
    /// The (detached) state at this step: the model's input.
    pub x: Tensor,
    /// `d x_hat0 / d out` (a scalar) under the gradient path: the coefficient `b`
    /// of the output at its own step times the gradient scale from the next state
    /// to x_hat0, plus, for multistep solvers, its coefficient `c q` through the
    /// next step's history term times that step's scale.
    pub weight: f64,
}

/// The linear structure of one executed step, for [`output_weights`].
#[derive(Debug, Clone)]
pub struct StepLink {
    /// Step index in the plan.
    pub index: usize,
    /// `x_next = a x + b out + sum_j c_j h_j`.
    pub a: f64,
    pub b: f64,
    /// `(c_j, step index whose history term h_j is)`.
    pub history: Vec<(f64, usize)>,
    /// This step's history term `h = p x + q out`, if it records one.
    pub hist: Option<(f64, f64)>,
}

/// The scalar gradient of the final state with respect to each step's model
/// output, `d x_hat0 / d out_i`, under the stop-gradients of `path` (see the module
/// documentation). `links` are the executed steps in order; returns one weight per
/// link.
pub fn output_weights(links: &[StepLink], path: GradPath) -> Vec<f64> {
    let n = links.len();
    let pos = |index: usize| links.iter().position(|l| l.index == index);
    // scale[k] = d x_hat0 / d x_k (state before step k), scale[n] = 1 (x_hat0).
    let mut scale = vec![1.0; n + 1];
    // Contributions of each step's history term: (d x_hat0 / d h_k).
    let mut dh = vec![0.0; n];
    for k in (0..n).rev() {
        let l = &links[k];
        for &(c, src) in &l.history {
            if let Some(j) = pos(src) {
                dh[j] += c * scale[k + 1];
            }
        }
        scale[k] = match path {
            GradPath::Adt => 1.0,
            GradPath::Drtune => l.a * scale[k + 1] + l.hist.map(|(p, _)| p * dh[k]).unwrap_or(0.0),
        };
    }
    links
        .iter()
        .enumerate()
        .map(|(k, l)| l.b * scale[k + 1] + l.hist.map(|(_, q)| q * dh[k]).unwrap_or(0.0))
        .collect()
}

/// The result of a trajectory run without a graph.
pub struct Rollout {
    pub final_x: Tensor,
    pub kept: Vec<KeptStep>,
}

/// Run the sampler from step `start` (state `x_start`) to the end without a graph,
/// recording the inputs of the `kept` step indices.
pub fn rollout(
    model: &dyn Denoiser,
    plan: &Plan,
    start: usize,
    x_start: &Tensor,
    kept: &[usize],
    g: &Guidance,
    path: GradPath,
) -> Result<Rollout> {
    tch::no_grad(|| {
        let mut x = x_start.detach();
        let mut history: Vec<Tensor> = Vec::new();
        // Step index of each history term, most recent first (as `history`).
        let mut history_src: Vec<usize> = Vec::new();
        let mut inputs = Vec::new();
        let mut links = Vec::new();
        for i in start..plan.len() {
            let c = plan.coeffs(i, history.len());
            if kept.contains(&i) {
                inputs.push((i, x.shallow_clone()));
            }
            links.push(StepLink {
                index: i,
                a: c.a,
                b: c.b,
                history: c
                    .c
                    .iter()
                    .copied()
                    .zip(history_src.iter().copied())
                    .collect(),
                hist: c.hist,
            });
            let (out, _) = guided_output(model, &x, plan.timesteps[i], g)?;
            let next = plan.apply(&c, &x, &out, &history);
            plan.push_history(&c, &x, &out, &mut history);
            if c.hist.is_some() {
                history_src.insert(0, i);
                history_src.truncate(history.len());
            }
            x = next;
        }
        let weights = output_weights(&links, path);
        let kept_steps = inputs
            .into_iter()
            .map(|(i, x)| KeptStep {
                index: i,
                x,
                weight: weights[i - start],
            })
            .collect();
        Ok(Rollout {
            final_x: x,
            kept: kept_steps,
        })
    })
}

/// Backpropagate the generator gradient of the kept steps, one step at a time
/// (Eq. 12): for each kept step, recompute the guided output with grad and call
/// backward on `<b s eps, g_final>`; at the start step also add
/// `lambda * mse(cond_output, target)` (the diffusion loss of Eq. 8).
/// Returns the diffusion-loss value (if a start step with a target was given).
pub fn backprop_kept(
    model: &dyn Denoiser,
    plan: &Plan,
    kept: &[KeptStep],
    g_final: &Tensor,
    guidance: &Guidance,
    diffusion: Option<(usize, &Tensor, f64)>,
) -> Result<Option<f64>> {
    let mut diff_value = None;
    for k in kept {
        let (out, cond_out) = guided_output(model, &k.x, plan.timesteps[k.index], guidance)?;
        let mut loss = (&out * g_final.detach()).sum(Kind::Double) * k.weight;
        if let Some((start, target, lambda)) = diffusion {
            if start == k.index {
                let kind = loss_kind(&cond_out);
                let d = (cond_out.to_kind(kind) - target.to_kind(kind))
                    .square()
                    .mean(kind);
                diff_value = Some(d.double_value(&[]));
                loss += d.to_kind(Kind::Double) * lambda;
            }
        }
        loss.backward();
    }
    Ok(diff_value)
}

/// The kind a loss on `t` is computed in: float64 for float64 tensors, float32
/// otherwise (also for bfloat16 / half outputs).
pub fn loss_kind(t: &Tensor) -> Kind {
    if t.kind() == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// The same trajectory as [`rollout`] with everything in one graph: the returned
/// final state carries the gradient of the kept steps (and of `x_start`, if it
/// requires grad) with the stop-gradients of `path`. Also returns the conditional
/// output at the start step (for the diffusion loss).
pub fn rollout_graph(
    model: &dyn Denoiser,
    plan: &Plan,
    start: usize,
    x_start: &Tensor,
    kept: &[usize],
    g: &Guidance,
    path: GradPath,
) -> Result<(Tensor, Option<Tensor>)> {
    let mut x = x_start.shallow_clone();
    // History terms with their graph (see the module documentation), most recent
    // first.
    let mut history: Vec<Tensor> = Vec::new();
    let mut start_cond = None;
    for i in start..plan.len() {
        let c = plan.coeffs(i, history.len());
        let xd = x.detach();
        let (out, cond_out) = if kept.contains(&i) {
            let (o, co) = guided_output(model, &xd, plan.timesteps[i], g)?;
            (o, Some(co))
        } else {
            let (o, _) = tch::no_grad(|| guided_output(model, &xd, plan.timesteps[i], g))?;
            (o, None)
        };
        if i == start {
            start_cond = cond_out;
        }
        let linear = match path {
            // x + (a - 1) sg(x): value a x, gradient identity.
            GradPath::Adt => &x + &xd * (c.a - 1.0),
            GradPath::Drtune => &x * c.a,
        };
        let mut next = linear + &out * c.b;
        for (cj, h) in c.c.iter().zip(history.iter()) {
            next += h * *cj;
        }
        if let Some((p, q)) = c.hist {
            let xh = match path {
                GradPath::Adt => &xd,
                GradPath::Drtune => &x,
            };
            history.insert(0, xh * p + &out * q);
            history.truncate(plan.config.solver_order.max(1) - 1);
        }
        x = next;
    }
    Ok((x, start_cond))
}

/// Choose the kept steps: the start step plus `min(k, remaining)` distinct later
/// steps drawn uniformly (Alg. 1 line 5), sorted.
pub fn choose_kept(rng: &mut impl rand::Rng, start: usize, n_steps: usize, k: usize) -> Vec<usize> {
    let later: Vec<usize> = (start + 1..n_steps).collect();
    let take = k.min(later.len());
    let mut chosen = rand::seq::index::sample(rng, later.len(), take)
        .into_iter()
        .map(|j| later[j])
        .collect::<Vec<_>>();
    chosen.push(start);
    chosen.sort_unstable();
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::denoiser::Cond;
    use crate::schedule::{SamplerKind, ScheduleConfig};
    use tch::{nn, nn::Module, Device};

    /// A small convolutional denoiser with trainable weights (float64) whose output
    /// depends on x, t and the context.
    struct Toy {
        conv: nn::Conv2D,
        lin: nn::Linear,
    }

    impl Toy {
        fn new(vs: &nn::VarStore) -> Toy {
            let p = vs.root();
            let conv = nn::conv2d(
                &p / "conv",
                2,
                2,
                3,
                nn::ConvConfig {
                    padding: 1,
                    ..Default::default()
                },
            );
            let lin = nn::linear(&p / "lin", 3, 2, Default::default());
            Toy { conv, lin }
        }
    }

    impl Denoiser for Toy {
        fn predict(&self, x: &Tensor, t: &Tensor, cond: &Cond) -> Result<Tensor> {
            let ctx = self
                .lin
                .forward(&cond.context.mean_dim(1, false, Kind::Double)); // [B, 2]
            let h = self.conv.forward(x).tanh();
            let tt = (t.to_kind(Kind::Double) / 1000.0).view([-1, 1, 1, 1]);
            Ok(h + ctx.view([-1, 2, 1, 1]) * 0.3 + tt * 0.1)
        }
    }

    fn setup(kind: SamplerKind) -> (nn::VarStore, Toy, Plan, Cond, Cond) {
        tch::manual_seed(0);
        let mut vs = nn::VarStore::new(Device::Cpu);
        let toy = Toy::new(&vs);
        vs.double();
        let cfg = if kind == SamplerKind::FlowEuler {
            ScheduleConfig::sd3()
        } else {
            ScheduleConfig::sd15()
        };
        let plan = Plan::new(&cfg, kind, 8).unwrap();
        let opts = (Kind::Double, Device::Cpu);
        let cond = Cond::new(Tensor::randn([2, 4, 3], opts));
        let uncond = Cond::new(Tensor::randn([2, 4, 3], opts));
        (vs, toy, plan, cond, uncond)
    }

    fn grads(vs: &nn::VarStore) -> Vec<Tensor> {
        let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.into_iter().map(|(_, t)| t.grad().copy()).collect()
    }

    fn zero(vs: &nn::VarStore) {
        for (_, t) in vs.variables() {
            let mut g = t.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// Under Eq. 11, d x_hat0 / d x_{t_i} is the identity; under DRTune it is the
    /// product of the later a's (appendix A.1, Eq. A1).
    #[test]
    fn unit_scale_gradient_property() {
        for kind in [
            SamplerKind::Ddim,
            SamplerKind::DpmSolverPp2m,
            SamplerKind::FlowEuler,
        ] {
            let (_vs, toy, plan, cond, uncond) = setup(kind);
            let g = Guidance::new(&uncond, &cond, 3.0);
            for start in [0, 3, plan.len() - 1] {
                let opts = (Kind::Double, Device::Cpu);
                let x = Tensor::randn([2, 2, 4, 4], opts).set_requires_grad(true);
                let v = Tensor::randn([2, 2, 4, 4], opts);
                let kept: Vec<usize> = (start..plan.len()).collect();
                let (xf, _) =
                    rollout_graph(&toy, &plan, start, &x, &kept, &g, GradPath::Adt).unwrap();
                (&xf * &v).sum(Kind::Double).backward();
                let e = crate::fixtures::max_rel_err(&x.grad(), &v);
                assert!(
                    e < 1e-12,
                    "{kind:?} start {start}: ADT input gradient is not the identity ({e})"
                );

                let x = Tensor::randn([2, 2, 4, 4], opts).set_requires_grad(true);
                let (xf, _) =
                    rollout_graph(&toy, &plan, start, &x, &kept, &g, GradPath::Drtune).unwrap();
                (&xf * &v).sum(Kind::Double).backward();
                // Oracle: with the model inputs stopped, x_hat0 is linear in x_t with
                // the model outputs held fixed; replay the inference steps
                // (`Plan::step`, history included) on x_t and on x_t + d with the
                // outputs of the first run. For one-step samplers this is prod(a)
                // (Eq. A1).
                let outs: Vec<Tensor> = tch::no_grad(|| {
                    let mut xs = x.detach();
                    let mut hist = Vec::new();
                    let mut outs = Vec::new();
                    for i in start..plan.len() {
                        let (o, _) = guided_output(&toy, &xs, plan.timesteps[i], &g).unwrap();
                        xs = plan.step(i, &xs, &o, &mut hist);
                        outs.push(o);
                    }
                    outs
                });
                let replay = |x0: &Tensor| {
                    let mut xs = x0.shallow_clone();
                    let mut hist = Vec::new();
                    for (i, o) in (start..plan.len()).zip(&outs) {
                        xs = plan.step(i, &xs, o, &mut hist);
                    }
                    xs
                };
                let d = Tensor::randn([2, 2, 4, 4], opts);
                let (f1, f0) = tch::no_grad(|| (replay(&(x.detach() + &d)), replay(&x.detach())));
                // <grad, d> = <v, J d> for the linear map J.
                let lhs = (x.grad() * &d).sum(Kind::Double).double_value(&[]);
                let rhs = ((f1 - f0) * &v).sum(Kind::Double).double_value(&[]);
                assert!(
                    (lhs - rhs).abs() <= 1e-9 * rhs.abs().max(1.0),
                    "{kind:?} start {start}: DRTune input gradient {lhs} vs linear replay {rhs}"
                );
                if kind != SamplerKind::DpmSolverPp2m {
                    let prod: f64 = (start..plan.len()).map(|i| plan.coeffs(i, 0).a).product();
                    let e = crate::fixtures::max_rel_err(&x.grad(), &(&v * prod));
                    assert!(
                        e < 1e-12,
                        "{kind:?} start {start}: DRTune gradient is not prod(a) ({e})"
                    );
                }
            }
        }
    }

    /// DRTune's gradient scale grows without bound towards t = T (appendix A.1).
    #[test]
    fn drtune_scale_explodes_for_early_steps() {
        let plan = Plan::new(&ScheduleConfig::sd15(), SamplerKind::Ddim, 50).unwrap();
        let prod: f64 = (0..plan.len()).map(|i| plan.coeffs(i, 0).a).product();
        // Eq. A3: prod a = alpha_final / alpha_T for DDIM.
        let (alpha_t, _) = plan.alpha_sigma(0);
        let want = plan.final_alpha_cumprod.sqrt() / alpha_t;
        assert!((prod - want).abs() / want < 1e-9, "{prod} vs {want}");
        assert!(prod > 10.0, "{prod}");
    }

    /// The per-step decomposition (Eq. 12) gives the same parameter gradient as the
    /// whole trajectory in one graph, for every sampler and both paths.
    #[test]
    fn decomposed_gradient_equals_full_graph() {
        for kind in [
            SamplerKind::Ddim,
            SamplerKind::DpmSolverPp2m,
            SamplerKind::FlowEuler,
        ] {
            for path in [GradPath::Adt, GradPath::Drtune] {
                let (vs, toy, plan, cond, uncond) = setup(kind);
                let g = Guidance::new(&uncond, &cond, 2.5);
                let opts = (Kind::Double, Device::Cpu);
                let x0 = Tensor::randn([2, 2, 4, 4], opts);
                let eps = Tensor::randn([2, 2, 4, 4], opts);
                let w = Tensor::randn([2, 2, 4, 4], opts);
                let start = 2;
                let xs = plan.add_noise(&x0, &eps, start);
                let target = plan.target(&x0, &eps, start);
                let kept = vec![2, 4, 7];
                let lambda = 0.5;
                // A non-linear loss on the final state.
                let loss_of = |xf: &Tensor| (xf.sin() * &w).sum(Kind::Double);

                let (xf, start_cond) =
                    rollout_graph(&toy, &plan, start, &xs, &kept, &g, path).unwrap();
                let diff = (start_cond.unwrap() - &target).square().mean(Kind::Double);
                (loss_of(&xf) + diff * lambda).backward();
                let full = grads(&vs);
                zero(&vs);

                let r = rollout(&toy, &plan, start, &xs, &kept, &g, path).unwrap();
                assert!(crate::fixtures::max_rel_err(&r.final_x, &xf.detach()) < 1e-12);
                let leaf = r.final_x.detach().set_requires_grad(true);
                loss_of(&leaf).backward();
                let gf = leaf.grad();
                backprop_kept(
                    &toy,
                    &plan,
                    &r.kept,
                    &gf,
                    &g,
                    Some((start, &target, lambda)),
                )
                .unwrap();
                let dec = grads(&vs);
                for (a, b) in full.iter().zip(&dec) {
                    let e = crate::fixtures::max_rel_err(b, a);
                    assert!(
                        e < 1e-6,
                        "{kind:?} {path:?}: decomposed vs full gradient rel err {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn kept_steps_include_the_start_and_respect_k() {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for _ in 0..100 {
            let s = rand::Rng::gen_range(&mut rng, 0..10);
            let kept = choose_kept(&mut rng, s, 10, 3);
            assert_eq!(kept[0], s);
            assert_eq!(kept.len(), 1 + 3.min(9 - s));
            assert!(kept.windows(2).all(|w| w[0] < w[1]));
            assert!(kept.iter().all(|&i| i < 10));
        }
    }
}
