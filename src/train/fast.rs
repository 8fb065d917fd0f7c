//! A fast, gradient-free copy of the UNet for the sampled trajectory.
//!
//! The trajectory of an ADT iteration (and sampling) runs the UNet without a graph.
//! [`FastDenoiser`] keeps a second copy of the UNet weights for that part, optionally
//! in bfloat16, in channels-last layout, and with the classifier-free-guidance UNet
//! call captured once as a CUDA graph and replayed afterwards. The trainable float32
//! weights stay the optimiser's master copy: the kept steps are recomputed with them
//! (with grad), and the copy is refreshed whenever they change ([`FastDenoiser::sync`]
//! compares the version counters of the master weights, so a generator step or a
//! checkpoint restore is noticed without any bookkeeping by the caller).
//!
//! Outputs of [`FastDenoiser`] never carry a graph: use it only where the caller
//! runs without gradient (the trajectory of `path::rollout`, sampling).
//!
//! [`gpu`] wraps the small C++ shim (`csrc/cuda_shim.cpp`) compiled into GPU builds:
//! caching-allocator peak-memory statistics and CUDA-graph capture / replay.

use anyhow::{bail, ensure, Context, Result};
use std::cell::RefCell;
use tch::{nn::VarStore, Device, Kind, Tensor};

use crate::models::denoiser::{Cond, Denoiser};
use crate::models::master_copy::MasterCopy;
use crate::models::unet::{UNet2DConditionModel, UNetConfig};

/// CUDA runtime helpers from the C++ shim. Every function fails with an explanatory
/// error in a binary built without it (build with `--features cuda`).
pub mod gpu {
    use anyhow::{bail, Result};

    #[cfg(adt_cuda_shim)]
    mod ffi {
        use std::os::raw::{c_char, c_int, c_void};
        extern "C" {
            pub fn adt_cuda_last_error() -> *const c_char;
            pub fn adt_cuda_reset_peak(device: c_int) -> c_int;
            pub fn adt_cuda_memory(
                device: c_int,
                peak_allocated: *mut i64,
                allocated: *mut i64,
                peak_reserved: *mut i64,
            ) -> c_int;
            pub fn adt_cuda_empty_cache() -> c_int;
            pub fn adt_set_tf32(enable: c_int) -> c_int;
            pub fn adt_autocast_bf16() -> c_int;
            pub fn adt_graph_new(device: c_int) -> *mut c_void;
            pub fn adt_graph_free(g: *mut c_void);
            pub fn adt_graph_enter_side(g: *mut c_void) -> c_int;
            pub fn adt_graph_leave_side(g: *mut c_void) -> c_int;
            pub fn adt_graph_capture_begin(g: *mut c_void) -> c_int;
            pub fn adt_graph_capture_end(g: *mut c_void) -> c_int;
            pub fn adt_graph_replay(g: *mut c_void) -> c_int;
        }
    }

    /// Whether this binary contains the CUDA shim.
    pub fn available() -> bool {
        cfg!(adt_cuda_shim)
    }

    #[cfg(adt_cuda_shim)]
    fn check(rc: i32, what: &str) -> Result<()> {
        if rc != 0 {
            // SAFETY: the shim returns a pointer to a thread-local NUL-terminated string.
            let msg = unsafe { std::ffi::CStr::from_ptr(ffi::adt_cuda_last_error()) }
                .to_string_lossy()
                .into_owned();
            bail!("CUDA shim: {what} failed: {msg}");
        }
        Ok(())
    }

    #[cfg(not(adt_cuda_shim))]
    fn missing(what: &str) -> anyhow::Error {
        anyhow::anyhow!(
            "{what} needs the CUDA shim, which this binary was built without \
             (build with `ADT_CUDA_LINK=1 cargo build --release --features cuda`)"
        )
    }

    /// Allocator statistics of one device, in bytes.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Memory {
        pub peak_allocated: i64,
        pub allocated: i64,
        pub peak_reserved: i64,
    }

    /// Reset the peak statistics of the caching allocator of CUDA device `device`.
    pub fn reset_peak(device: usize) -> Result<()> {
        #[cfg(adt_cuda_shim)]
        {
            check(
                unsafe { ffi::adt_cuda_reset_peak(device as i32) },
                "reset_peak",
            )
        }
        #[cfg(not(adt_cuda_shim))]
        {
            let _ = device;
            Err(missing("peak GPU memory"))
        }
    }

    /// Current and peak allocated bytes of CUDA device `device`.
    pub fn memory(device: usize) -> Result<Memory> {
        #[cfg(adt_cuda_shim)]
        {
            let (mut pa, mut a, mut pr) = (0i64, 0i64, 0i64);
            check(
                unsafe { ffi::adt_cuda_memory(device as i32, &mut pa, &mut a, &mut pr) },
                "memory statistics",
            )?;
            Ok(Memory {
                peak_allocated: pa,
                allocated: a,
                peak_reserved: pr,
            })
        }
        #[cfg(not(adt_cuda_shim))]
        {
            let _ = device;
            Err(missing("GPU memory statistics"))
        }
    }

    /// Return the cached, unused blocks of the allocator to the driver.
    pub fn empty_cache() -> Result<()> {
        #[cfg(adt_cuda_shim)]
        {
            check(unsafe { ffi::adt_cuda_empty_cache() }, "empty_cache")
        }
        #[cfg(not(adt_cuda_shim))]
        {
            Err(missing("empty_cache"))
        }
    }

    /// Allow (or forbid) TF32 tensor cores for float32 matmuls and convolutions.
    pub fn set_tf32(enable: bool) -> Result<()> {
        #[cfg(adt_cuda_shim)]
        {
            check(unsafe { ffi::adt_set_tf32(enable as i32) }, "set_tf32")
        }
        #[cfg(not(adt_cuda_shim))]
        {
            let _ = enable;
            Err(missing("TF32 mode"))
        }
    }

    /// Run `f` under CUDA autocast with bfloat16 as the low-precision dtype (like
    /// `torch.autocast("cuda", dtype=torch.bfloat16)`): matmuls and convolutions in
    /// bfloat16, reductions and losses in float32, float32 parameters untouched.
    pub fn autocast_bf16<T>(f: impl FnOnce() -> T) -> Result<T> {
        #[cfg(adt_cuda_shim)]
        {
            check(unsafe { ffi::adt_autocast_bf16() }, "autocast dtype")?;
            Ok(tch::autocast(true, f))
        }
        #[cfg(not(adt_cuda_shim))]
        {
            let _ = f;
            Err(missing("bfloat16 autocast"))
        }
    }

    /// A CUDA graph (`at::cuda::CUDAGraph`) with the side stream it is captured on.
    pub struct Graph {
        #[cfg(adt_cuda_shim)]
        ptr: *mut std::os::raw::c_void,
        in_side: bool,
    }

    impl Graph {
        pub fn new(device: usize) -> Result<Graph> {
            #[cfg(adt_cuda_shim)]
            {
                let ptr = unsafe { ffi::adt_graph_new(device as i32) };
                if ptr.is_null() {
                    check(-1, "graph creation")?;
                }
                Ok(Graph {
                    ptr,
                    in_side: false,
                })
            }
            #[cfg(not(adt_cuda_shim))]
            {
                let _ = device;
                Err(missing("CUDA-graph capture"))
            }
        }

        /// Run `f` with the graph's side stream as the current stream (warm-up
        /// before capture, as the CUDA-graph rules ask).
        pub fn on_side_stream<T>(&mut self, f: impl FnOnce() -> T) -> Result<T> {
            self.enter()?;
            let out = f();
            self.leave()?;
            Ok(out)
        }

        /// Capture the kernels that `f` launches on the side stream. Nothing runs
        /// during capture: the tensors `f` returns hold valid values only after
        /// [`Graph::replay`].
        pub fn capture<T>(&mut self, f: impl FnOnce() -> T) -> Result<T> {
            #[cfg(adt_cuda_shim)]
            {
                check(
                    unsafe { ffi::adt_graph_capture_begin(self.ptr) },
                    "capture_begin",
                )?;
                let out = f();
                check(
                    unsafe { ffi::adt_graph_capture_end(self.ptr) },
                    "capture_end",
                )?;
                Ok(out)
            }
            #[cfg(not(adt_cuda_shim))]
            {
                let _ = f;
                Err(missing("CUDA-graph capture"))
            }
        }

        /// Launch the captured kernels on the current stream.
        pub fn replay(&self) -> Result<()> {
            #[cfg(adt_cuda_shim)]
            {
                check(unsafe { ffi::adt_graph_replay(self.ptr) }, "replay")
            }
            #[cfg(not(adt_cuda_shim))]
            {
                Err(missing("CUDA-graph replay"))
            }
        }

        fn enter(&mut self) -> Result<()> {
            if self.in_side {
                bail!("CUDA graph: side stream entered twice");
            }
            #[cfg(adt_cuda_shim)]
            check(
                unsafe { ffi::adt_graph_enter_side(self.ptr) },
                "enter side stream",
            )?;
            self.in_side = true;
            Ok(())
        }

        fn leave(&mut self) -> Result<()> {
            #[cfg(adt_cuda_shim)]
            check(
                unsafe { ffi::adt_graph_leave_side(self.ptr) },
                "leave side stream",
            )?;
            self.in_side = false;
            Ok(())
        }
    }

    impl Drop for Graph {
        fn drop(&mut self) {
            #[cfg(adt_cuda_shim)]
            unsafe {
                ffi::adt_graph_free(self.ptr)
            }
        }
    }
}

/// How the fast copy runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FastOptions {
    /// Weight and activation dtype of the copy (Float or BFloat16 / Half).
    pub kind: Kind,
    /// Convolution weights and the latents in channels-last layout.
    pub channels_last: bool,
    /// Capture the UNet call once per input shape as a CUDA graph, then replay it
    /// (CUDA devices only; needs a binary with the CUDA shim).
    pub cuda_graph: bool,
}

impl FastOptions {
    /// bfloat16 weights, eager.
    pub fn bf16() -> FastOptions {
        FastOptions {
            kind: Kind::BFloat16,
            channels_last: false,
            cuda_graph: false,
        }
    }
}

impl Default for FastOptions {
    fn default() -> Self {
        FastOptions::bf16()
    }
}

/// Static inputs and output of a captured UNet call.
struct Captured {
    key: Vec<(Vec<i64>, Kind)>,
    x: Tensor,
    t: Tensor,
    context: Tensor,
    pooled: Option<Tensor>,
    time_ids: Option<Tensor>,
    out: Tensor,
    graph: gpu::Graph,
}

/// The gradient-free trajectory UNet: a copy of the trainable UNet in
/// `FastOptions::kind`, refreshed from the master weights when they change.
pub struct FastDenoiser {
    _vs: VarStore,
    model: UNet2DConditionModel,
    opts: FastOptions,
    device: Device,
    /// The copied weights and their masters.
    weights: MasterCopy,
    captured: RefCell<Option<Captured>>,
}

fn shape_key(t: &Tensor) -> (Vec<i64>, Kind) {
    (t.size(), t.kind())
}

impl FastDenoiser {
    /// Build the copy of a UNet (`config`, master variables in `master`) and fill it
    /// with the current master weights.
    pub fn new(master: &VarStore, config: &UNetConfig, opts: FastOptions) -> Result<FastDenoiser> {
        Self::with_lora(master, config, opts, None)
    }

    /// [`FastDenoiser::new`] for a master UNet that carries LoRA adapters (`lora`: its
    /// layers): the copy gets adapters of the same shapes, which follow the master's
    /// like the other weights (the base weights stay the frozen originals).
    pub fn with_lora(
        master: &VarStore,
        config: &UNetConfig,
        opts: FastOptions,
        lora: Option<&crate::models::lora::LoraSlots>,
    ) -> Result<FastDenoiser> {
        ensure!(
            matches!(opts.kind, Kind::Float | Kind::BFloat16 | Kind::Half),
            "fast denoiser: unsupported weight kind {:?} (Float, BFloat16 or Half)",
            opts.kind
        );
        let device = master.device();
        if opts.cuda_graph {
            ensure!(
                device.is_cuda(),
                "fast denoiser: CUDA-graph replay needs a CUDA device, the UNet is on {device:?}"
            );
            ensure!(
                gpu::available(),
                "fast denoiser: CUDA-graph replay needs a binary built with the CUDA shim (--features cuda)"
            );
        }
        let mut vs = VarStore::new(device);
        vs.set_kind(opts.kind);
        let model = UNet2DConditionModel::new(&vs.root(), config)
            .context("building the fast trajectory copy of the UNet")?;
        if let Some(l) = lora {
            model.lora.attach_like(&vs.root(), l)?;
        }
        vs.freeze();
        let copies = vs.variables();
        let masters = master.variables();
        ensure!(
            copies.len() == masters.len(),
            "fast denoiser: the master UNet has {} variables, its copy {} (different configs?)",
            masters.len(),
            copies.len()
        );
        let mut pairs = Vec::with_capacity(copies.len());
        for (name, copy) in copies {
            let m = masters
                .get(&name)
                .with_context(|| format!("fast denoiser: master UNet has no variable {name}"))?;
            ensure!(
                m.size() == copy.size(),
                "fast denoiser: variable {name}: master shape {:?}, copy shape {:?}",
                m.size(),
                copy.size()
            );
            let mut copy = copy;
            if opts.channels_last && copy.dim() == 4 {
                tch::no_grad(|| copy.set_data(&crate::models::blocks::channels_last(&copy)));
            }
            pairs.push((name, m.shallow_clone(), copy));
        }
        Ok(FastDenoiser {
            _vs: vs,
            model,
            opts,
            device,
            weights: MasterCopy::new(pairs),
            captured: RefCell::new(None),
        })
    }

    pub fn options(&self) -> FastOptions {
        self.opts
    }

    /// The copied weights (which follow the master weights: see [`MasterCopy`]).
    pub fn weights(&self) -> &MasterCopy {
        &self.weights
    }

    /// Refresh the copy if the master weights changed; returns whether it did.
    pub fn sync(&mut self) -> bool {
        self.weights.sync()
    }

    fn forward(
        &self,
        x: &Tensor,
        t: &Tensor,
        context: &Tensor,
        added: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        self.model.forward(x, t, context, added)
    }

    fn predict_graph(&self, x: &Tensor, t: &Tensor, cond: &Cond) -> Result<Tensor> {
        let mut key = vec![shape_key(x), shape_key(t), shape_key(&cond.context)];
        for o in [&cond.pooled, &cond.time_ids] {
            key.push(o.as_ref().map(shape_key).unwrap_or((vec![], Kind::Float)));
        }
        let mut slot = self.captured.borrow_mut();
        let hit = slot.as_ref().map(|c| c.key == key).unwrap_or(false);
        if !hit {
            // A new shape: drop the old graph (and its memory pool) first.
            *slot = None;
            let index = match self.device {
                Device::Cuda(i) => i,
                d => bail!("fast denoiser: CUDA graph on {d:?}"),
            };
            let mut graph = gpu::Graph::new(index)?;
            let sx = x.copy();
            let st = t.copy();
            let sc = cond.context.copy();
            let sp = cond.pooled.as_ref().map(|p| p.copy());
            let si = cond.time_ids.as_ref().map(|p| p.copy());
            let run = || {
                let added = match (&sp, &si) {
                    (Some(p), Some(i)) => Some((p, i)),
                    _ => None,
                };
                self.forward(&sx, &st, &sc, added)
            };
            // Warm-up on the side stream (lazy initialisation, cuDNN / cuBLAS
            // algorithm choice), then capture.
            for _ in 0..2 {
                let _ = graph.on_side_stream(run)??;
            }
            tch::Cuda::synchronize(index as i64);
            let out = graph.capture(run)??;
            *slot = Some(Captured {
                key,
                x: sx,
                t: st,
                context: sc,
                pooled: sp,
                time_ids: si,
                out,
                graph,
            });
        }
        let c = slot.as_mut().expect("captured above");
        c.x.copy_(x);
        c.t.copy_(t);
        c.context.copy_(&cond.context);
        if let (Some(d), Some(s)) = (&mut c.pooled, &cond.pooled) {
            d.copy_(s);
        }
        if let (Some(d), Some(s)) = (&mut c.time_ids, &cond.time_ids) {
            d.copy_(s);
        }
        c.graph.replay()?;
        // The static output is overwritten by the next replay: hand out a copy.
        Ok(c.out.copy())
    }
}

impl Denoiser for FastDenoiser {
    fn predict(&self, x: &Tensor, t: &Tensor, cond: &Cond) -> Result<Tensor> {
        tch::no_grad(|| {
            let kind = self.opts.kind;
            let mut xk = x.to_device(self.device).to_kind(kind);
            if self.opts.channels_last {
                xk = crate::models::blocks::channels_last(&xk);
            }
            let t = t.to_device(self.device).to_kind(Kind::Float);
            // Token states and pooled embeddings in the copy's dtype; SDXL time ids
            // (pixel sizes) stay float32, they are embedded in float32 anyway.
            let ck = Cond {
                context: cond.context.to_kind(kind),
                pooled: cond.pooled.as_ref().map(|p| p.to_kind(kind)),
                time_ids: cond.time_ids.as_ref().map(|i| i.to_kind(Kind::Float)),
            };
            let out = if self.opts.cuda_graph {
                self.predict_graph(&xk, &t, &ck)?
            } else {
                let added = match (&ck.pooled, &ck.time_ids) {
                    (Some(p), Some(i)) => Some((p, i)),
                    _ => None,
                };
                self.forward(&xk, &t, &ck.context, added)?
            };
            Ok(out.to_kind(x.kind()).contiguous())
        })
    }
}
