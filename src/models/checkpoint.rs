//! Gradient checkpointing (`train.gradient_checkpointing`): the backbone's blocks and
//! the VAE decoder's blocks keep only their inputs in the forward and run again in
//! the backward, trading one more forward for the memory of their activations. It is
//! PyTorch's reentrant `torch.utils.checkpoint` (custom autograd function in
//! `csrc/ckpt_shim.cpp`, with the segment run by a Rust callback), applied per block
//! as diffusers' `enable_gradient_checkpointing` does: every resnet and transformer
//! block of the UNet, every joint block of the MMDiT, every resnet and attention of
//! the VAE decoder.
//!
//! Checkpointing acts only inside a [`Scope`] (the trainer opens one around the
//! iterations when the option is on) and only while grad mode is on: sampling and
//! the gradient-free trajectory run the blocks directly. The RNG states are saved
//! with the inputs and replayed in the recomputation, so dropout draws the same masks.

use anyhow::{bail, Result};
use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use tch::Tensor;

/// A segment: inputs to outputs, borrowing for `'a`.
type SegmentFn<'a> = dyn Fn(&[Tensor]) -> Result<Vec<Tensor>> + 'a;

/// A registered segment. The closure borrows model weights (see [`checkpoint`]'s
/// safety contract); it is called from the autograd engine's thread, which runs the
/// backward while the thread that registered it waits.
struct Segment(Box<SegmentFn<'static>>);
// SAFETY: the closures only read model weights; the backward that calls them runs
// while the registering thread is blocked in that backward (see `checkpoint`).
unsafe impl Send for Segment {}
unsafe impl Sync for Segment {}

struct Entry {
    scope: u64,
    f: Arc<Segment>,
}

#[derive(Default)]
struct Registry {
    next_id: u64,
    next_scope: u64,
    entries: HashMap<u64, Entry>,
}

fn registry() -> &'static Mutex<Registry> {
    static R: OnceLock<Mutex<Registry>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(Registry::default()))
}

fn lock() -> std::sync::MutexGuard<'static, Registry> {
    registry().lock().unwrap_or_else(|e| e.into_inner())
}

thread_local! {
    /// The scope open on this thread.
    static ACTIVE: Cell<Option<u64>> = const { Cell::new(None) };
    /// Set while a segment runs (forward or recomputation): segments do not nest.
    static IN_SEGMENT: Cell<bool> = const { Cell::new(false) };
}

/// Segments checkpointed by this process so far.
static CHECKPOINTED: AtomicU64 = AtomicU64::new(0);

/// How many segments this process has run under checkpointing (each block call of a
/// forward inside a scope counts once): shows that checkpointing acted.
pub fn checkpointed_total() -> u64 {
    CHECKPOINTED.load(Ordering::Relaxed)
}

/// Whether this build has the checkpoint binding (compiled when LIBTORCH is set at
/// build time, as `scripts/env.sh` does).
pub fn available() -> bool {
    cfg!(adt_ckpt_shim)
}

/// Checkpointing for the segments run on this thread until the scope is dropped.
/// Segments registered in the scope are released with it; a backward through one
/// of them after that is an error, not a crash.
pub struct Scope {
    id: Option<u64>,
    prev: Option<u64>,
}

impl Scope {
    /// Open a scope (`on`), or a no-op scope (`!on`). Errors when `on` and the build
    /// has no checkpoint binding.
    pub fn new(on: bool) -> Result<Scope> {
        let prev = ACTIVE.with(|a| a.get());
        if !on {
            return Ok(Scope { id: None, prev });
        }
        if !available() {
            bail!(
                "train.gradient_checkpointing needs the checkpoint binding (csrc/ckpt_shim.cpp), \
                 compiled only when LIBTORCH points at a libtorch folder at build time \
                 (source scripts/env.sh before cargo build)"
            );
        }
        init_callback();
        let id = {
            let mut r = lock();
            r.next_scope += 1;
            r.next_scope
        };
        ACTIVE.with(|a| a.set(Some(id)));
        Ok(Scope { id: Some(id), prev })
    }

    /// Segments registered and not yet released (for tests).
    pub fn registered(&self) -> usize {
        match self.id {
            Some(id) => lock().entries.values().filter(|e| e.scope == id).count(),
            None => 0,
        }
    }
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            lock().entries.retain(|_, e| e.scope != id);
            ACTIVE.with(|a| a.set(self.prev));
        }
    }
}

/// Whether a segment run now would be checkpointed.
pub fn active() -> bool {
    ACTIVE.with(|a| a.get()).is_some() && !IN_SEGMENT.with(|s| s.get()) && grad_enabled()
}

fn grad_enabled() -> bool {
    #[cfg(adt_ckpt_shim)]
    {
        unsafe { ffi::adt_ckpt_grad_enabled() != 0 }
    }
    #[cfg(not(adt_ckpt_shim))]
    {
        true
    }
}

/// Run `f` on `inputs`: checkpointed inside an open [`Scope`] with grad mode on,
/// directly otherwise. Every tensor the segment depends on that is not a model
/// weight must be passed in `inputs`.
///
/// # Safety
/// `f` may borrow only what outlives the scope open on this thread (the model's
/// weights: the trainer's models live across its scope); it must not borrow locals
/// of the caller, which are gone when the backward runs `f` again. Pass them as
/// inputs instead.
pub unsafe fn checkpoint<'a, F>(inputs: &[&Tensor], f: F) -> Result<Vec<Tensor>>
where
    F: Fn(&[Tensor]) -> Result<Vec<Tensor>> + 'a,
{
    let ins: Vec<Tensor> = inputs.iter().map(|t| t.shallow_clone()).collect();
    let scope = ACTIVE.with(|a| a.get());
    let Some(scope) = scope.filter(|_| active()) else {
        return f(&ins);
    };
    #[cfg(adt_ckpt_shim)]
    {
        let boxed: Box<SegmentFn<'a>> = Box::new(f);
        // SAFETY: the caller guarantees that `f` outlives the scope; the registry
        // drops it when the scope ends.
        let boxed: Box<SegmentFn<'static>> = unsafe { std::mem::transmute(boxed) };
        let id = {
            let mut r = lock();
            r.next_id += 1;
            let id = r.next_id;
            r.entries.insert(
                id,
                Entry {
                    scope,
                    f: Arc::new(Segment(boxed)),
                },
            );
            id
        };
        CHECKPOINTED.fetch_add(1, Ordering::Relaxed);
        ffi::apply(id, &ins)
    }
    #[cfg(not(adt_ckpt_shim))]
    {
        let _ = scope;
        f(&ins)
    }
}

/// [`checkpoint`] for a segment with one output.
///
/// # Safety
/// As [`checkpoint`].
pub unsafe fn checkpoint1<'a, F>(inputs: &[&Tensor], f: F) -> Result<Tensor>
where
    F: Fn(&[Tensor]) -> Tensor + 'a,
{
    let mut out = unsafe { checkpoint(inputs, move |xs| Ok(vec![f(xs)]))? };
    match out.pop() {
        Some(t) if out.is_empty() => Ok(t),
        _ => bail!(
            "checkpoint: a one-output segment returned {} outputs",
            out.len() + 1
        ),
    }
}

#[cfg(adt_ckpt_shim)]
fn init_callback() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| unsafe { ffi::adt_ckpt_set_callback(ffi::callback) });
}

#[cfg(not(adt_ckpt_shim))]
fn init_callback() {}

#[cfg(adt_ckpt_shim)]
mod ffi {
    use super::{lock, IN_SEGMENT};
    use anyhow::{bail, Result};
    use std::ffi::{c_char, c_int, c_void, CStr, CString};
    use tch::Tensor;
    /// A tch tensor handle (`at::Tensor*`).
    #[allow(non_camel_case_types)]
    type C_tensor = c_void;

    pub type Callback = extern "C" fn(u64, *mut *mut C_tensor, i64, *mut c_void) -> c_int;

    extern "C" {
        pub fn adt_ckpt_set_callback(cb: Callback);
        pub fn adt_ckpt_push_output(out: *mut c_void, t: *const C_tensor);
        pub fn adt_ckpt_set_error(out: *mut c_void, msg: *const c_char);
        pub fn adt_ckpt_grad_enabled() -> c_int;
        pub fn adt_ckpt_last_error() -> *const c_char;
        pub fn adt_ckpt_apply(
            id: u64,
            inputs: *const *const C_tensor,
            n: i64,
            outputs: *mut *mut C_tensor,
            max_out: i64,
            n_out: *mut i64,
        ) -> c_int;
    }

    const MAX_OUT: usize = 16;

    pub fn apply(id: u64, ins: &[Tensor]) -> Result<Vec<Tensor>> {
        let ptrs: Vec<*const C_tensor> =
            ins.iter().map(|t| t.as_ptr() as *const C_tensor).collect();
        let mut outs: [*mut C_tensor; MAX_OUT] = [std::ptr::null_mut(); MAX_OUT];
        let mut n_out = 0i64;
        let rc = unsafe {
            adt_ckpt_apply(
                id,
                ptrs.as_ptr(),
                ptrs.len() as i64,
                outs.as_mut_ptr(),
                MAX_OUT as i64,
                &mut n_out,
            )
        };
        if rc != 0 {
            let msg = unsafe { CStr::from_ptr(adt_ckpt_last_error()) };
            bail!("{}", msg.to_string_lossy());
        }
        Ok(outs[..n_out as usize]
            .iter()
            // SAFETY: each is a new at::Tensor owned by us (freed by Tensor's drop).
            .map(|&p| unsafe { Tensor::from_ptr(p as *mut _) })
            .collect())
    }

    fn set_error(out: *mut c_void, msg: &str) {
        let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
        unsafe { adt_ckpt_set_error(out, c.as_ptr()) };
    }

    /// Resets the in-segment flag on every exit of a segment run.
    struct InSegment(bool);
    impl InSegment {
        fn enter() -> Self {
            InSegment(IN_SEGMENT.with(|s| s.replace(true)))
        }
    }
    impl Drop for InSegment {
        fn drop(&mut self) {
            IN_SEGMENT.with(|s| s.set(self.0));
        }
    }

    pub extern "C" fn callback(
        id: u64,
        inputs: *mut *mut C_tensor,
        n: i64,
        out: *mut c_void,
    ) -> c_int {
        // SAFETY: the shim passes `n` new at::Tensor pointers that we own.
        let ins: Vec<Tensor> = (0..n as usize)
            .map(|i| unsafe { Tensor::from_ptr(*inputs.add(i) as *mut _) })
            .collect();
        let f = lock().entries.get(&id).map(|e| e.f.clone());
        let Some(f) = f else {
            set_error(
                out,
                &format!(
                    "segment {id} is no longer registered: a backward ran after its \
                     checkpointing scope ended"
                ),
            );
            return 1;
        };
        let _guard = InSegment::enter();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (f.0)(&ins)));
        match r {
            Ok(Ok(outs)) => {
                for t in &outs {
                    unsafe { adt_ckpt_push_output(out, t.as_ptr() as *const C_tensor) };
                }
                0
            }
            Ok(Err(e)) => {
                set_error(out, &format!("{e:#}"));
                1
            }
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic".into());
                set_error(out, &format!("panic: {msg}"));
                1
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn mlp(w1: &Tensor, w2: &Tensor, x: &Tensor) -> Tensor {
        x.matmul(w1).tanh().matmul(w2).sin()
    }

    #[test]
    fn checkpointed_gradients_equal_plain_ones() {
        if !available() {
            eprintln!("checkpoint binding not compiled: nothing to test");
            return;
        }
        let opts = (Kind::Double, Device::Cpu);
        tch::manual_seed(0);
        let w1 = Tensor::randn([4, 6], opts).set_requires_grad(true);
        let w2 = Tensor::randn([6, 3], opts).set_requires_grad(true);
        let x = Tensor::randn([5, 4], opts).set_requires_grad(true);
        let run = |ck: bool| {
            for t in [&w1, &w2, &x] {
                let mut g = t.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            let scope = Scope::new(ck).unwrap();
            let (a, b) = (&w1, &w2);
            let h = unsafe { checkpoint1(&[&x], move |xs| mlp(a, b, &xs[0])) }.unwrap();
            let y = unsafe { checkpoint1(&[&h], move |xs| mlp(&b.tr(), &a.tr(), &xs[0])) }.unwrap();
            if ck {
                assert_eq!(scope.registered(), 2);
            }
            (y.square().sum(Kind::Double) + h.sum(Kind::Double)).backward();
            (
                y.detach(),
                w1.grad().copy(),
                w2.grad().copy(),
                x.grad().copy(),
            )
        };
        let plain = run(false);
        let ck = run(true);
        assert!(plain.0.allclose(&ck.0, 0.0, 0.0, false));
        for (p, c) in [(&plain.1, &ck.1), (&plain.2, &ck.2), (&plain.3, &ck.3)] {
            let d = (p - c).abs().max().double_value(&[]);
            assert!(d < 1e-14, "gradient differs by {d}");
            assert!(p.abs().sum(Kind::Double).double_value(&[]) > 0.0);
        }
    }

    #[test]
    fn frozen_inputs_still_reach_trainable_weights() {
        if !available() {
            return;
        }
        // No input requires grad: only the weight inside the segment does.
        let w = Tensor::ones([3, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let x = Tensor::ones([2, 3], (Kind::Float, Device::Cpu));
        let _s = Scope::new(true).unwrap();
        let wr = &w;
        let y = unsafe { checkpoint1(&[&x], move |xs| xs[0].matmul(wr)) }.unwrap();
        assert!(y.requires_grad());
        y.sum(Kind::Float).backward();
        let g = w.grad();
        assert!(g.defined());
        assert_eq!(g.sum(Kind::Float).double_value(&[]), 18.0);
    }

    #[test]
    fn dropout_replays_its_mask() {
        if !available() {
            return;
        }
        let opts = (Kind::Double, Device::Cpu);
        let w = Tensor::randn([8, 8], opts).set_requires_grad(true);
        let x = Tensor::randn([16, 8], opts);
        let grads = |ck: bool| {
            let mut g = w.grad();
            if g.defined() {
                let _ = g.zero_();
            }
            tch::manual_seed(7);
            let _s = Scope::new(ck).unwrap();
            let wr = &w;
            let y = unsafe { checkpoint1(&[&x], move |xs| xs[0].matmul(wr).dropout(0.5, true)) }
                .unwrap();
            // A draw between the forward and the backward must not change the mask.
            let _ = Tensor::rand([100], opts);
            y.square().sum(Kind::Double).backward();
            (y.detach(), w.grad().copy())
        };
        let (y0, g0) = grads(false);
        let (y1, g1) = grads(true);
        assert!(y0.allclose(&y1, 0.0, 0.0, false));
        let d = (&g0 - &g1).abs().max().double_value(&[]);
        assert!(d < 1e-12, "dropout gradient differs by {d}");
    }

    #[test]
    fn backward_after_the_scope_is_an_error() {
        if !available() {
            return;
        }
        let w = Tensor::ones([2, 2], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let x = Tensor::ones([1, 2], (Kind::Float, Device::Cpu));
        let y = {
            let _s = Scope::new(true).unwrap();
            let wr = &w;
            unsafe { checkpoint1(&[&x], move |xs| xs[0].matmul(wr)) }.unwrap()
        };
        let r = y.sum(Kind::Float).f_backward();
        let e = format!("{:?}", r.unwrap_err());
        assert!(e.contains("no longer registered"), "{e}");
    }

    #[test]
    fn no_grad_runs_directly() {
        let _s = Scope::new(available()).unwrap();
        let x = Tensor::ones([2], (Kind::Float, Device::Cpu));
        let y = tch::no_grad(|| unsafe { checkpoint1(&[&x], |xs| &xs[0] * 2.0) }).unwrap();
        assert!(!y.requires_grad());
        assert_eq!(_s.registered(), 0);
    }
}
