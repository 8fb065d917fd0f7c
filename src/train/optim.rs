//! AdamW with inspectable state (tch's optimisers do not expose their moments, and a
//! resumable trainer must save them), linear warm-up and gradient-norm clipping.

use anyhow::{bail, Result};
use std::collections::HashMap;
use tch::{nn::VarStore, Kind, Tensor};

/// Decoupled-weight-decay Adam over the trainable variables of a VarStore.
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Number of steps taken.
    pub step: i64,
    names: Vec<String>,
    params: Vec<Tensor>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl AdamW {
    /// Optimise every trainable variable of `vs` (those that require grad).
    pub fn new(vs: &VarStore, lr: f64, beta1: f64, beta2: f64, weight_decay: f64) -> AdamW {
        let mut vars: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let m = vars
            .iter()
            .map(|(_, t)| t.zeros_like().to_kind(Kind::Float))
            .collect();
        let v = vars
            .iter()
            .map(|(_, t)| t.zeros_like().to_kind(Kind::Float))
            .collect();
        let (names, params) = vars.into_iter().unzip();
        AdamW {
            lr,
            beta1,
            beta2,
            eps: 1e-8,
            weight_decay,
            step: 0,
            names,
            params,
            m,
            v,
        }
    }

    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.detach_().zero_();
            }
        }
    }

    /// L2 norm of all gradients (0 for parameters without a gradient), with one
    /// device synchronisation.
    pub fn grad_norm(&self) -> f64 {
        let norms: Vec<Tensor> = self
            .params
            .iter()
            .map(|p| p.grad())
            .filter(|g| g.defined())
            .map(|g| g.to_kind(Kind::Float).square().sum(Kind::Float))
            .collect();
        if norms.is_empty() {
            return 0.0;
        }
        Tensor::stack(&norms, 0)
            .sum(Kind::Double)
            .double_value(&[])
            .sqrt()
    }

    /// Scale gradients so that their norm is at most `max_norm`; returns the norm before.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> f64 {
        let norm = self.grad_norm();
        if max_norm > 0.0 && norm > max_norm {
            let s = max_norm / (norm + 1e-6);
            tch::no_grad(|| {
                for p in &self.params {
                    let mut g = p.grad();
                    if g.defined() {
                        let _ = g.g_mul_scalar_(s);
                    }
                }
            });
        }
        norm
    }

    /// One AdamW update with the current learning rate.
    pub fn step(&mut self) {
        self.step += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - b1.powi(self.step as i32);
        let bc2 = 1.0 - b2.powi(self.step as i32);
        let lr = self.lr;
        tch::no_grad(|| {
            for ((p, m), v) in self
                .params
                .iter_mut()
                .zip(self.m.iter_mut())
                .zip(self.v.iter_mut())
            {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let g = g.to_kind(Kind::Float);
                // m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2 (fewer kernels).
                let _ = m.lerp_(&g, 1.0 - b1);
                let _ = v.g_mul_scalar_(b2).addcmul_(&(&g * (1.0 - b2)), &g);
                if self.weight_decay > 0.0 {
                    let _ = p.g_mul_scalar_(1.0 - lr * self.weight_decay);
                }
                let denom = (v.sqrt() * (1.0 / bc2.sqrt())).g_add_scalar_(self.eps);
                let upd = (m.g_div_scalar(bc1) / denom) * lr;
                let _ = p.g_sub_(&upd.to_kind(p.kind()));
            }
        });
    }

    /// The optimiser state as named tensors (for checkpoints).
    pub fn state(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for ((n, m), v) in self.names.iter().zip(&self.m).zip(&self.v) {
            out.push((format!("{prefix}.m.{n}"), m.shallow_clone()));
            out.push((format!("{prefix}.v.{n}"), v.shallow_clone()));
        }
        out.push((format!("{prefix}.step"), Tensor::from_slice(&[self.step])));
        out
    }

    /// Restore a state written by [`AdamW::state`].
    pub fn load_state(&mut self, prefix: &str, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let get = |k: &str| -> Result<&Tensor> {
            tensors
                .get(k)
                .ok_or_else(|| anyhow::anyhow!("optimizer state: tensor {k} is missing"))
        };
        tch::no_grad(|| -> Result<()> {
            for i in 0..self.names.len() {
                let n = &self.names[i];
                for (slot, which) in [(&mut self.m[i], "m"), (&mut self.v[i], "v")] {
                    let t = get(&format!("{prefix}.{which}.{n}"))?;
                    if t.size() != slot.size() {
                        bail!(
                            "optimizer state {prefix}.{which}.{n}: shape {:?}, expected {:?}",
                            t.size(),
                            slot.size()
                        );
                    }
                    slot.copy_(t);
                }
            }
            Ok(())
        })?;
        self.step = get(&format!("{prefix}.step"))?.int64_value(&[0]);
        Ok(())
    }
}

/// Linear warm-up: base * min(1, (step + 1) / warmup).
pub fn warmup_lr(base: f64, step: usize, warmup: usize) -> f64 {
    if warmup == 0 {
        base
    } else {
        base * ((step + 1) as f64 / warmup as f64).min(1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{nn, Device};

    #[test]
    fn adamw_matches_the_update_rule() {
        let vs = VarStore::new(Device::Cpu);
        let w = vs
            .root()
            .var_copy("w", &Tensor::from_slice(&[1.0f32, -2.0, 3.0]));
        let mut opt = AdamW::new(&vs, 0.1, 0.9, 0.999, 0.01);
        // Two steps with the loss sum(w^2): grad = 2w.
        let mut expect: Vec<f64> = vec![1.0, -2.0, 3.0];
        let (mut m, mut v) = (vec![0.0; 3], vec![0.0; 3]);
        for step in 1..=2 {
            opt.zero_grad();
            (&w * &w).sum(Kind::Float).backward();
            opt.step();
            for i in 0..3 {
                let g = 2.0 * expect[i];
                m[i] = 0.9 * m[i] + 0.1 * g;
                v[i] = 0.999 * v[i] + 0.001 * g * g;
                let mh = m[i] / (1.0 - 0.9f64.powi(step));
                let vh = v[i] / (1.0 - 0.999f64.powi(step));
                expect[i] = expect[i] * (1.0 - 0.1 * 0.01) - 0.1 * mh / (vh.sqrt() + 1e-8);
            }
        }
        let got = Vec::<f64>::try_from(&w.to_kind(Kind::Double)).unwrap();
        for i in 0..3 {
            assert!((got[i] - expect[i]).abs() < 1e-5, "{got:?} vs {expect:?}");
        }
        let _ = nn::Init::Const(0.0);
    }

    #[test]
    fn state_round_trips() {
        let vs = VarStore::new(Device::Cpu);
        let w = vs.root().var_copy("w", &Tensor::from_slice(&[1.0f32, 2.0]));
        let mut opt = AdamW::new(&vs, 0.1, 0.9, 0.999, 0.0);
        (&w * &w).sum(Kind::Float).backward();
        opt.step();
        let st: HashMap<String, Tensor> = opt
            .state("g")
            .into_iter()
            .map(|(k, t)| (k, t.copy()))
            .collect();
        let vs2 = VarStore::new(Device::Cpu);
        let _w2 = vs2
            .root()
            .var_copy("w", &Tensor::from_slice(&[1.0f32, 2.0]));
        let mut opt2 = AdamW::new(&vs2, 0.1, 0.9, 0.999, 0.0);
        opt2.load_state("g", &st).unwrap();
        assert_eq!(opt2.step, 1);
        assert_eq!(
            Vec::<f32>::try_from(&opt2.m[0]).unwrap(),
            Vec::<f32>::try_from(&opt.m[0]).unwrap()
        );
        let e = opt2.load_state("x", &st).unwrap_err().to_string();
        assert!(e.contains("x.m.w"), "{e}");
    }

    #[test]
    fn warmup_is_linear() {
        assert_eq!(warmup_lr(1.0, 0, 4), 0.25);
        assert_eq!(warmup_lr(1.0, 3, 4), 1.0);
        assert_eq!(warmup_lr(1.0, 100, 4), 1.0);
        assert_eq!(warmup_lr(2.0, 0, 0), 2.0);
    }
}
