//! AdamW with inspectable state (tch's optimisers do not expose their moments, and a
//! resumable trainer must save them), linear warm-up and gradient-norm clipping.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

use crate::train::quant8::Quantized;
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
    /// Use libtorch's fused AdamW kernel (`aten::_fused_adamw_`) when the binary has
    /// it and the parameters allow it (one dtype and device, float32 / bfloat16 /
    /// half): the same update in one pass instead of about ten kernels per tensor.
    pub fused: bool,
    /// Updates done by the fused kernel (the others ran the per-tensor loop).
    pub fused_steps: u64,
    names: Vec<String>,
    params: Vec<Tensor>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// The step count as a 0-d float32 tensor on the parameters' device (the fused
    /// kernel reads it from there).
    step_tensor: Option<Tensor>,
    /// How the moments are stored.
    pub moments: MomentStorage,
    /// With [`MomentStorage::Int8Blockwise`]: the 8-bit moments `(m, v)` of each
    /// parameter of at least [`MIN_8BIT_SIZE`] values (`m[i]` / `v[i]` are then empty).
    q8: Vec<Option<(Quantized, Quantized)>>,
}

/// Storage of the AdamW moments (`train.optimizer_state`). The update is computed in
/// float32 in every case; only what is kept between steps differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MomentStorage {
    /// 8 bytes per parameter.
    #[default]
    Fp32,
    /// bfloat16 moments: 4 bytes per parameter.
    Bf16,
    /// Block-wise 8-bit moments as bitsandbytes' 8-bit AdamW (see [`crate::train::quant8`]):
    /// about 2 bytes per parameter. Tensors smaller than [`MIN_8BIT_SIZE`] keep float32
    /// moments, as bitsandbytes does.
    #[serde(rename = "8bit")]
    Int8Blockwise,
}

/// Parameters with fewer values keep float32 moments under 8-bit storage (bitsandbytes'
/// `min_8bit_size`).
pub const MIN_8BIT_SIZE: i64 = 4096;

/// The fused-AdamW binding (csrc/optim_shim.cpp).
#[cfg(adt_optim_shim)]
mod ffi {
    use std::os::raw::{c_char, c_int, c_void};
    /// A tch tensor handle (`at::Tensor*`).
    pub type CTensor = c_void;
    extern "C" {
        pub fn adt_optim_last_error() -> *const c_char;
        #[allow(clippy::too_many_arguments)]
        pub fn adt_fused_adamw(
            params: *const *const CTensor,
            grads: *const *const CTensor,
            exp_avgs: *const *const CTensor,
            exp_avg_sqs: *const *const CTensor,
            step: *const CTensor,
            n: i64,
            lr: f64,
            beta1: f64,
            beta2: f64,
            weight_decay: f64,
            eps: f64,
        ) -> c_int;
    }
}

/// Whether this binary has the fused AdamW kernel.
pub fn fused_available() -> bool {
    cfg!(adt_optim_shim)
}

impl AdamW {
    /// Optimise every trainable variable of `vs` (those that require grad).
    pub fn new(vs: &VarStore, lr: f64, beta1: f64, beta2: f64, weight_decay: f64) -> AdamW {
        Self::with_moments(vs, lr, beta1, beta2, weight_decay, MomentStorage::Fp32)
    }

    /// [`AdamW::new`] with the moments stored as `moments` says.
    pub fn with_moments(
        vs: &VarStore,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        moments: MomentStorage,
    ) -> AdamW {
        let mut vars: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let quantised = |t: &Tensor| {
            moments == MomentStorage::Int8Blockwise && t.numel() as i64 >= MIN_8BIT_SIZE
        };
        let q8 = vars
            .iter()
            .map(|(_, t)| {
                quantised(t).then(|| (Quantized::zeros(t, true), Quantized::zeros(t, false)))
            })
            .collect();
        let zeros = |t: &Tensor| {
            if quantised(t) {
                Tensor::zeros([0], (Kind::Float, t.device()))
            } else if moments == MomentStorage::Bf16 {
                t.zeros_like().to_kind(Kind::BFloat16)
            } else {
                t.zeros_like().to_kind(Kind::Float)
            }
        };
        let m = vars.iter().map(|(_, t)| zeros(t)).collect();
        let v = vars.iter().map(|(_, t)| zeros(t)).collect();
        let (names, params) = vars.into_iter().unzip();
        AdamW {
            lr,
            beta1,
            beta2,
            eps: 1e-8,
            weight_decay,
            step: 0,
            fused: true,
            fused_steps: 0,
            names,
            params,
            m,
            v,
            step_tensor: None,
            moments,
            q8,
        }
    }

    /// Bytes held by the moments.
    pub fn moment_bytes(&self) -> i64 {
        let dense: i64 = self
            .m
            .iter()
            .chain(&self.v)
            .map(|t| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64)
            .sum();
        let q: i64 = self
            .q8
            .iter()
            .flatten()
            .map(|(m, v)| m.bytes() + v.bytes())
            .sum();
        dense + q
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
        let fp32 = self.moments == MomentStorage::Fp32;
        if fp32 && self.fused && fused_available() && self.fused_step() {
            self.fused_steps += 1;
            return;
        }
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - b1.powi(self.step as i32);
        let bc2 = 1.0 - b2.powi(self.step as i32);
        let lr = self.lr;
        tch::no_grad(|| {
            for (((p, m), v), q8) in self
                .params
                .iter_mut()
                .zip(self.m.iter_mut())
                .zip(self.v.iter_mut())
                .zip(self.q8.iter_mut())
            {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let g = g.to_kind(Kind::Float);
                if !fp32 {
                    // Low-precision storage: compute in float32, store back.
                    let (mut mf, mut vf) = match q8 {
                        Some((qm, qv)) => (qm.load(), qv.load()),
                        None => (m.to_kind(Kind::Float), v.to_kind(Kind::Float)),
                    };
                    let _ = mf.lerp_(&g, 1.0 - b1);
                    let _ = vf.g_mul_scalar_(b2).addcmul_(&(&g * (1.0 - b2)), &g);
                    if self.weight_decay > 0.0 {
                        let _ = p.g_mul_scalar_(1.0 - lr * self.weight_decay);
                    }
                    let denom = (vf.sqrt() * (1.0 / bc2.sqrt())).g_add_scalar_(self.eps);
                    let upd = (mf.g_div_scalar(bc1) / denom) * lr;
                    let _ = p.g_sub_(&upd.to_kind(p.kind()));
                    match q8 {
                        Some((qm, qv)) => {
                            qm.store(&mf);
                            qv.store(&vf);
                        }
                        None => {
                            m.copy_(&mf);
                            v.copy_(&vf);
                        }
                    }
                    continue;
                }
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

    /// The update of [`AdamW::step`] through the fused kernel (`self.step` already
    /// incremented). Returns false, having changed nothing, where the kernel does
    /// not apply (mixed dtypes or devices, no gradients).
    #[cfg(adt_optim_shim)]
    fn fused_step(&mut self) -> bool {
        let mut idx = Vec::with_capacity(self.params.len());
        let mut grads = Vec::with_capacity(self.params.len());
        for (i, p) in self.params.iter().enumerate() {
            let g = p.grad();
            if g.defined() {
                idx.push(i);
                grads.push(g);
            }
        }
        let Some(&first) = idx.first() else {
            return false;
        };
        let (kind, device) = (self.params[first].kind(), self.params[first].device());
        if !matches!(kind, Kind::Float | Kind::BFloat16 | Kind::Half) {
            return false;
        }
        let uniform = idx.iter().zip(&grads).all(|(&i, g)| {
            let p = &self.params[i];
            p.kind() == kind
                && g.kind() == kind
                && self.m[i].kind() == kind
                && self.v[i].kind() == kind
                && p.device() == device
                && g.device() == device
        });
        if !uniform {
            return false;
        }
        let step_t = self
            .step_tensor
            .get_or_insert_with(|| Tensor::zeros([], (Kind::Float, device)));
        let _ = step_t.fill_(self.step as f64);
        let ptrs = |v: &[Tensor]| -> Vec<*const ffi::CTensor> {
            idx.iter()
                .map(|&i| v[i].as_ptr() as *const ffi::CTensor)
                .collect()
        };
        let (p, m, v) = (ptrs(&self.params), ptrs(&self.m), ptrs(&self.v));
        let g: Vec<*const ffi::CTensor> = grads
            .iter()
            .map(|g| g.as_ptr() as *const ffi::CTensor)
            .collect();
        // SAFETY: every pointer is a live tensor owned by `self` or `grads` for the
        // duration of the call; the kernel updates params and moments in place.
        let rc = tch::no_grad(|| unsafe {
            ffi::adt_fused_adamw(
                p.as_ptr(),
                g.as_ptr(),
                m.as_ptr(),
                v.as_ptr(),
                step_t.as_ptr() as *const ffi::CTensor,
                p.len() as i64,
                self.lr,
                self.beta1,
                self.beta2,
                self.weight_decay,
                self.eps,
            )
        });
        if rc != 0 {
            // SAFETY: the shim returns a thread-local NUL-terminated string.
            let msg = unsafe { std::ffi::CStr::from_ptr(ffi::adt_optim_last_error()) };
            tracing::warn!(
                "fused AdamW failed ({}); using the per-tensor update from now on",
                msg.to_string_lossy()
            );
            self.fused = false;
            return false;
        }
        true
    }

    #[cfg(not(adt_optim_shim))]
    fn fused_step(&mut self) -> bool {
        false
    }

    /// The optimiser state as named tensors (for checkpoints).
    pub fn state(&self, prefix: &str) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (((n, m), v), q8) in self.names.iter().zip(&self.m).zip(&self.v).zip(&self.q8) {
            // 8-bit moments are written as they are held (codes and block scales), so
            // that a resumed run continues bit for bit.
            if let Some((qm, qv)) = q8 {
                for (q, which) in [(qm, "m"), (qv, "v")] {
                    let (codes, scales) = q.parts();
                    out.push((format!("{prefix}.{which}8.{n}"), codes));
                    out.push((format!("{prefix}.{which}8_scale.{n}"), scales));
                }
                continue;
            }
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
                if let Some((qm, qv)) = &mut self.q8[i] {
                    for (q, which) in [(qm, "m"), (qv, "v")] {
                        let codes = get(&format!("{prefix}.{which}8.{n}")).map_err(|e| {
                            e.context("the checkpoint has no 8-bit moments: was it written with another train.optimizer_state?")
                        })?;
                        let scales = get(&format!("{prefix}.{which}8_scale.{n}"))?;
                        q.set_parts(codes, scales).map_err(|e| {
                            e.context(format!("optimizer state {prefix}.{which}8.{n}"))
                        })?;
                    }
                    continue;
                }
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

    /// The fused kernel and the per-tensor loop give the same parameters and moments
    /// over several steps (with a parameter that gets no gradient), and the fused run
    /// did use the kernel. A build without the shim (no LIBTORCH at build time) has no
    /// kernel to compare: the test fails saying so, unless
    /// ADT_ALLOW_MISSING_TEST_DATA=1, which skips it with a notice.
    #[test]
    fn fused_adamw_matches_the_loop() {
        if option_env!("LIBTORCH").is_some() {
            assert!(
                fused_available(),
                "built with LIBTORCH but without the fused AdamW shim"
            );
        }
        if !fused_available() {
            let msg = "the fused AdamW shim is not in this build (it is compiled when LIBTORCH \
                       names the libtorch folder at build time, as scripts/env.sh sets it)";
            if std::env::var("ADT_ALLOW_MISSING_TEST_DATA").is_ok_and(|v| !v.is_empty() && v != "0")
            {
                use std::io::Write;
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIPPED fused_adamw_matches_the_loop: {msg}"
                );
                return;
            }
            panic!("{msg}; set ADT_ALLOW_MISSING_TEST_DATA=1 to skip this test");
        }
        let make = |fused: bool| {
            tch::manual_seed(3);
            let vs = VarStore::new(Device::Cpu);
            let a = vs.root().var(
                "a",
                &[7, 5],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            );
            let b = vs.root().var(
                "b",
                &[11],
                nn::Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            );
            let _unused = vs.root().var("c", &[3], nn::Init::Const(1.0));
            let mut opt = AdamW::new(&vs, 0.05, 0.9, 0.99, 0.1);
            opt.fused = fused;
            for step in 0..4 {
                opt.zero_grad();
                let loss = (&a * &a).sum(Kind::Float) * (step as f64 + 1.0)
                    + (&b - 0.5).abs().sum(Kind::Float);
                loss.backward();
                opt.step();
            }
            let mut st = opt.state("g");
            st.extend(vs.variables());
            st.sort_by(|x, y| x.0.cmp(&y.0));
            (st, opt.fused_steps)
        };
        // The fused update is visible in the version counters, as an in-place op's.
        {
            let vs = VarStore::new(Device::Cpu);
            let w = vs.root().var("w", &[4], nn::Init::Const(1.0));
            let mut opt = AdamW::new(&vs, 0.1, 0.9, 0.999, 0.0);
            opt.fused = true;
            let before = w.internal_version();
            w.sum(Kind::Float).backward();
            opt.step();
            assert!(
                w.internal_version() > before,
                "the update did not bump the version"
            );
        }
        let (fused, fused_steps) = make(true);
        let (looped, loop_fused_steps) = make(false);
        assert_eq!(fused_steps, 4, "the fused kernel did not run every step");
        assert_eq!(loop_fused_steps, 0);
        assert_eq!(fused.len(), looped.len());
        for ((n1, t1), (n2, t2)) in fused.iter().zip(&looped) {
            assert_eq!(n1, n2);
            let d = (t1 - t2).abs().max().double_value(&[]);
            assert!(d < 1e-6, "{n1}: fused vs loop differ by {d}");
        }
    }

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
