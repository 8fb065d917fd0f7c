//! Data-parallel training on libtorch's distributed engine, c10d (a TCPStore
//! rendezvous and a Gloo process group, through `csrc/dist_shim.cpp`).
//!
//! * [`Launch`]: the rank, world size and rendezvous address from torchrun's
//!   variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or SLURM's
//!   (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, first host of SLURM_JOB_NODELIST);
//!   [`spawn_local`] starts N local ranks itself (`adt train --nproc N`).
//! * [`ProcessGroup`]: all-reduce, broadcast, barrier, with a heartbeat in the store
//!   so that a failed or timed-out collective names the rank that died or stopped.
//! * [`GradReducer`]: DDP's bucketed gradient all-reduce, started from autograd
//!   hooks on the parameters while the last backward pass of a step runs.
//! * [`Ddp`]: what the trainer calls (state broadcast and checksum, gradient
//!   averaging of G and D, discriminator buffers, rank-0 output).

pub mod launch;

pub use launch::{spawn_local, Launch};

use anyhow::{bail, Context, Result};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tch::{Kind, Tensor};

#[cfg(adt_dist_shim)]
mod ffi {
    use std::os::raw::{c_char, c_int, c_void};
    pub type CTensor = c_void;
    extern "C" {
        pub fn adt_dist_last_error() -> *const c_char;
        pub fn adt_dist_init(
            backend: *const c_char,
            host: *const c_char,
            port: c_int,
            rank: c_int,
            world: c_int,
            timeout_ms: i64,
        ) -> *mut c_void;
        pub fn adt_dist_store_set(
            h: *mut c_void,
            key: *const c_char,
            value: *const c_char,
        ) -> c_int;
        pub fn adt_dist_store_get(
            h: *mut c_void,
            key: *const c_char,
            buf: *mut c_char,
            cap: i64,
        ) -> c_int;
        pub fn adt_dist_allreduce(
            h: *mut c_void,
            ts: *const *const CTensor,
            n: i64,
            op: c_int,
        ) -> c_int;
        pub fn adt_dist_broadcast(
            h: *mut c_void,
            ts: *const *const CTensor,
            n: i64,
            root: c_int,
        ) -> c_int;
        pub fn adt_dist_barrier(h: *mut c_void) -> c_int;
        pub fn adt_dist_reducer_new(
            h: *mut c_void,
            ts: *const *const CTensor,
            n: i64,
            cap_bytes: i64,
        ) -> *mut c_void;
        pub fn adt_dist_reducer_buckets(r: *mut c_void) -> i64;
        pub fn adt_dist_reducer_bytes(r: *mut c_void) -> i64;
        pub fn adt_dist_reducer_sent(r: *mut c_void, total: *mut i64, in_backward: *mut i64);
        pub fn adt_dist_reducer_arm(r: *mut c_void, expected: c_int);
        pub fn adt_dist_reducer_finish(r: *mut c_void) -> c_int;
    }

    pub fn last_error() -> String {
        unsafe { std::ffi::CStr::from_ptr(adt_dist_last_error()) }
            .to_string_lossy()
            .into_owned()
    }
}

/// Whether this binary has the c10d binding.
pub fn available() -> bool {
    cfg!(adt_dist_shim)
}

/// Seconds between heartbeats written to the store.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// A c10d process group (one per process; never destroyed: a group whose peer died
/// cannot be torn down cleanly, and the process exits soon after anyway).
pub struct ProcessGroup {
    h: usize,
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    pub backend: String,
    /// Where small bookkeeping tensors go for collectives (NCCL reduces device
    /// tensors only).
    pub device: tch::Device,
    pub timeout: Duration,
    /// The iteration this rank is at (published with the heartbeat).
    progress: AtomicUsize,
    /// Seconds spent waiting in collectives (communication not hidden by compute).
    comm_ns: AtomicUsize,
    failed: AtomicBool,
}

unsafe impl Send for ProcessGroup {}
unsafe impl Sync for ProcessGroup {}

static GROUP: OnceLock<Arc<ProcessGroup>> = OnceLock::new();

/// The process group of this process, if it is one rank of several.
pub fn group() -> Option<&'static Arc<ProcessGroup>> {
    GROUP.get()
}

/// This process's rank (0 without a process group).
pub fn rank() -> usize {
    group().map(|g| g.rank).unwrap_or(0)
}

/// The number of ranks (1 without a process group).
pub fn world_size() -> usize {
    group().map(|g| g.world).unwrap_or(1)
}

/// Whether this process writes logs, grids and checkpoints.
pub fn is_rank0() -> bool {
    rank() == 0
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

#[cfg(adt_dist_shim)]
fn ptrs(ts: &[Tensor]) -> Vec<*const ffi::CTensor> {
    ts.iter()
        .map(|t| t.as_ptr() as *const ffi::CTensor)
        .collect()
}

impl ProcessGroup {
    /// Rendezvous with the other ranks and create the process group; installs it as
    /// this process's group and starts the heartbeat.
    pub fn init(launch: &Launch, backend: &str, timeout: Duration) -> Result<Arc<ProcessGroup>> {
        #[cfg(not(adt_dist_shim))]
        {
            let _ = (launch, backend, timeout);
            bail!(
                "this adt binary was built without the c10d binding (LIBTORCH was not set at build time, \
                 or its include/torch/csrc/distributed/c10d is missing): it cannot run as one of {} ranks",
                launch.world
            )
        }
        #[cfg(adt_dist_shim)]
        {
            let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
            let (b, host) = (c(backend), c(&launch.master_addr));
            let h = unsafe {
                ffi::adt_dist_init(
                    b.as_ptr(),
                    host.as_ptr(),
                    launch.master_port as i32,
                    launch.rank as i32,
                    launch.world as i32,
                    timeout.as_millis() as i64,
                )
            };
            if h.is_null() {
                bail!(
                    "rank {} of {}: cannot join the process group ({backend}) at {}:{}: {}",
                    launch.rank,
                    launch.world,
                    launch.master_addr,
                    launch.master_port,
                    ffi::last_error()
                );
            }
            let pg = Arc::new(ProcessGroup {
                h: h as usize,
                rank: launch.rank,
                world: launch.world,
                local_rank: launch.local_rank,
                backend: backend.to_string(),
                device: if backend == "nccl" {
                    tch::Device::Cuda(launch.local_rank)
                } else {
                    tch::Device::Cpu
                },
                timeout,
                progress: AtomicUsize::new(0),
                comm_ns: AtomicUsize::new(0),
                failed: AtomicBool::new(false),
            });
            if GROUP.set(pg.clone()).is_err() {
                bail!("a process group already exists in this process");
            }
            pg.heartbeat_once();
            let hb = pg.clone();
            std::thread::Builder::new()
                .name("adt-dist-heartbeat".into())
                .spawn(move || loop {
                    std::thread::sleep(HEARTBEAT);
                    if hb.failed.load(Ordering::Relaxed) {
                        return;
                    }
                    hb.heartbeat_once();
                })
                .context("starting the heartbeat thread")?;
            Ok(pg)
        }
    }

    fn handle(&self) -> *mut std::ffi::c_void {
        self.h as *mut std::ffi::c_void
    }

    /// Record the iteration this rank is at (named in failure messages).
    pub fn set_progress(&self, step: usize) {
        self.progress.store(step, Ordering::Relaxed);
    }

    /// Seconds this rank spent waiting for collectives so far.
    pub fn comm_seconds(&self) -> f64 {
        self.comm_ns.load(Ordering::Relaxed) as f64 * 1e-9
    }

    fn add_comm(&self, since: Instant) {
        self.comm_ns
            .fetch_add(since.elapsed().as_nanos() as usize, Ordering::Relaxed);
    }

    fn heartbeat_once(&self) {
        let v = format!("{} {}", now_ms(), self.progress.load(Ordering::Relaxed));
        let _ = self.store_set(&format!("adt/hb/{}", self.rank), &v);
    }

    fn store_set(&self, key: &str, value: &str) -> Result<()> {
        #[cfg(adt_dist_shim)]
        {
            let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
            let (k, v) = (c(key), c(value));
            if unsafe { ffi::adt_dist_store_set(self.handle(), k.as_ptr(), v.as_ptr()) } != 0 {
                bail!("store set {key}: {}", ffi::last_error());
            }
            Ok(())
        }
        #[cfg(not(adt_dist_shim))]
        {
            let _ = (key, value);
            bail!("no c10d binding")
        }
    }

    /// The value of `key` (None when absent); an error when the store is unreachable.
    fn store_get(&self, key: &str) -> Result<Option<String>> {
        #[cfg(adt_dist_shim)]
        {
            let k = std::ffi::CString::new(key).expect("no NUL");
            let mut buf = vec![0u8; 256];
            let rc = unsafe {
                ffi::adt_dist_store_get(
                    self.handle(),
                    k.as_ptr(),
                    buf.as_mut_ptr() as *mut std::os::raw::c_char,
                    buf.len() as i64,
                )
            };
            match rc {
                0 => {
                    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
                    Ok(Some(String::from_utf8_lossy(&buf[..end]).into_owned()))
                }
                1 => Ok(None),
                _ => bail!("{}", ffi::last_error()),
            }
        }
        #[cfg(not(adt_dist_shim))]
        {
            let _ = key;
            bail!("no c10d binding")
        }
    }

    /// The error of a failed collective `what`, naming the ranks that died or stopped
    /// answering (from their heartbeats and progress in the store).
    pub fn failure(&self, what: &str, cause: &str) -> anyhow::Error {
        self.failed.store(true, Ordering::Relaxed);
        // Let the heartbeats of dead peers go stale.
        std::thread::sleep(HEARTBEAT * 3);
        let mine = self.progress.load(Ordering::Relaxed);
        let mut culprits = Vec::new();
        let now = now_ms();
        for r in (0..self.world).filter(|&r| r != self.rank) {
            match self.store_get(&format!("adt/hb/{r}")) {
                Err(_) if r == 0 || self.rank == 0 => {
                    culprits.push(format!(
                        "rank {r} is unreachable (it hosts the rendezvous store: it died or its host is down)"
                    ));
                    if r == 0 {
                        break;
                    }
                }
                Err(e) => {
                    culprits.push(format!(
                        "the rendezvous store on rank 0 is unreachable ({e}): rank 0 died or its host is down"
                    ));
                    break;
                }
                Ok(None) => culprits.push(format!("rank {r} never reported")),
                Ok(Some(v)) => {
                    let mut it = v.split_whitespace();
                    let t: u128 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
                    let step: usize = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
                    let age = now.saturating_sub(t) as f64 / 1e3;
                    if age > 2.5 * HEARTBEAT.as_secs_f64() {
                        culprits.push(format!(
                            "rank {r} stopped answering {age:.0} s ago at iteration {step} (died or frozen)"
                        ));
                    } else if step < mine {
                        culprits.push(format!(
                            "rank {r} is alive but still at iteration {step} (this rank is at {mine}): stuck"
                        ));
                    }
                }
            }
        }
        let who = if culprits.is_empty() {
            "no peer was found dead or behind".to_string()
        } else {
            culprits.join("; ")
        };
        anyhow::anyhow!(
            "distributed training failed on rank {} of {} at iteration {mine}: {what}: {who} (c10d: {})",
            self.rank,
            self.world,
            // c10d's first line (its messages can carry a C++ stack trace).
            cause.trim().lines().next().unwrap_or("")
        )
    }

    fn check(&self, rc: i32, what: &str) -> Result<()> {
        if rc == 0 {
            return Ok(());
        }
        #[cfg(adt_dist_shim)]
        let cause = ffi::last_error();
        #[cfg(not(adt_dist_shim))]
        let cause = String::new();
        Err(self.failure(what, &cause))
    }

    /// In-place sum over the ranks.
    pub fn all_reduce_sum(&self, ts: &[Tensor]) -> Result<()> {
        self.all_reduce(ts, 0, "all-reduce")
    }

    /// In-place maximum over the ranks.
    pub fn all_reduce_max(&self, ts: &[Tensor]) -> Result<()> {
        self.all_reduce(ts, 1, "all-reduce (max)")
    }

    fn all_reduce(&self, ts: &[Tensor], op: i32, what: &str) -> Result<()> {
        #[cfg(adt_dist_shim)]
        {
            let t0 = Instant::now();
            let p = ptrs(ts);
            let rc =
                unsafe { ffi::adt_dist_allreduce(self.handle(), p.as_ptr(), p.len() as i64, op) };
            self.add_comm(t0);
            self.check(rc, what)
        }
        #[cfg(not(adt_dist_shim))]
        {
            let _ = (ts, op, what);
            bail!("no c10d binding")
        }
    }

    /// In-place broadcast from `root`.
    pub fn broadcast(&self, ts: &[Tensor], root: usize) -> Result<()> {
        #[cfg(adt_dist_shim)]
        {
            let t0 = Instant::now();
            let p = ptrs(ts);
            let rc = unsafe {
                ffi::adt_dist_broadcast(self.handle(), p.as_ptr(), p.len() as i64, root as i32)
            };
            self.add_comm(t0);
            self.check(rc, "broadcast")
        }
        #[cfg(not(adt_dist_shim))]
        {
            let _ = (ts, root);
            bail!("no c10d binding")
        }
    }

    /// Wait until every rank gets here.
    pub fn barrier(&self) -> Result<()> {
        #[cfg(adt_dist_shim)]
        {
            let t0 = Instant::now();
            let rc = unsafe { ffi::adt_dist_barrier(self.handle()) };
            self.add_comm(t0);
            self.check(rc, "barrier")
        }
        #[cfg(not(adt_dist_shim))]
        bail!("no c10d binding")
    }
}

/// Bucket size of the gradient reducer (PyTorch DDP's default, 25 MiB).
pub const BUCKET_BYTES: i64 = 25 << 20;

/// DDP's gradient reducer over a list of parameters: gradients are averaged across
/// the ranks in buckets whose all-reduce starts, from an autograd hook, as soon as
/// the bucket's last gradient is accumulated during an armed backward.
pub struct GradReducer {
    h: usize,
    pg: Arc<ProcessGroup>,
}

unsafe impl Send for GradReducer {}

impl GradReducer {
    /// `params`: leaf tensors that require grad, the same list in the same order on
    /// every rank. Buckets are first laid out in reverse order (gradients of the last
    /// layers come first); the order seen in the first step replaces it.
    pub fn new(
        pg: &Arc<ProcessGroup>,
        params: &[Tensor],
        bucket_bytes: i64,
    ) -> Result<GradReducer> {
        #[cfg(adt_dist_shim)]
        {
            let rev: Vec<Tensor> = params.iter().rev().map(Tensor::shallow_clone).collect();
            let p = ptrs(&rev);
            let h = unsafe {
                ffi::adt_dist_reducer_new(pg.handle(), p.as_ptr(), p.len() as i64, bucket_bytes)
            };
            if h.is_null() {
                bail!("creating the gradient reducer: {}", ffi::last_error());
            }
            Ok(GradReducer {
                h: h as usize,
                pg: pg.clone(),
            })
        }
        #[cfg(not(adt_dist_shim))]
        {
            let _ = (pg, params, bucket_bytes);
            bail!("no c10d binding")
        }
    }

    /// The next `backward_passes` backward passes finish this step's gradients:
    /// buckets are sent while the last of them runs.
    pub fn arm(&self, backward_passes: usize) {
        #[cfg(adt_dist_shim)]
        unsafe {
            ffi::adt_dist_reducer_arm(self.h as *mut std::ffi::c_void, backward_passes as i32)
        }
        #[cfg(not(adt_dist_shim))]
        let _ = backward_passes;
    }

    /// Send the rest, wait, and replace each gradient by its average over the ranks.
    pub fn finish(&self) -> Result<()> {
        #[cfg(adt_dist_shim)]
        {
            let t0 = Instant::now();
            let rc = unsafe { ffi::adt_dist_reducer_finish(self.h as *mut std::ffi::c_void) };
            self.pg.add_comm(t0);
            self.pg.check(rc, "gradient all-reduce")
        }
        #[cfg(not(adt_dist_shim))]
        bail!("no c10d binding")
    }

    pub fn buckets(&self) -> usize {
        #[cfg(adt_dist_shim)]
        return unsafe { ffi::adt_dist_reducer_buckets(self.h as *mut std::ffi::c_void) } as usize;
        #[cfg(not(adt_dist_shim))]
        0
    }

    /// Buckets all-reduced so far, and how many of them were started from a hook
    /// while the backward was running.
    pub fn sent(&self) -> (u64, u64) {
        #[cfg(adt_dist_shim)]
        {
            let (mut t, mut b) = (0i64, 0i64);
            unsafe { ffi::adt_dist_reducer_sent(self.h as *mut std::ffi::c_void, &mut t, &mut b) };
            (t as u64, b as u64)
        }
        #[cfg(not(adt_dist_shim))]
        (0, 0)
    }

    /// Bytes all-reduced so far.
    pub fn bytes(&self) -> u64 {
        #[cfg(adt_dist_shim)]
        return unsafe { ffi::adt_dist_reducer_bytes(self.h as *mut std::ffi::c_void) } as u64;
        #[cfg(not(adt_dist_shim))]
        0
    }
}

/// Per-tensor checksums (sum and sum of squares, in float64) of `ts`.
fn checksums(ts: &[Tensor]) -> Tensor {
    let v: Vec<Tensor> = ts
        .iter()
        .flat_map(|t| {
            let d = t.detach().to_kind(Kind::Double);
            [d.sum(Kind::Double), d.square().sum(Kind::Double)]
        })
        .collect();
    if v.is_empty() {
        return Tensor::zeros([1], (Kind::Double, tch::Device::Cpu));
    }
    Tensor::stack(&v, 0).to_device(tch::Device::Cpu)
}

/// The data-parallel side of a trainer: gradient reducers for G and D, the
/// discriminator's buffers, and the state synchronisation.
pub struct Ddp {
    pub pg: Arc<ProcessGroup>,
    pub g: GradReducer,
    pub d: Option<GradReducer>,
    /// Buffers of the discriminator (spectral-norm vectors; any running statistics):
    /// averaged across ranks so that the EMA duals stay identical.
    d_buffers: Vec<Tensor>,
}

impl Ddp {
    pub fn new(
        pg: &Arc<ProcessGroup>,
        g_params: &[Tensor],
        d_params: Option<&[Tensor]>,
        d_buffers: Vec<Tensor>,
    ) -> Result<Ddp> {
        let g = GradReducer::new(pg, g_params, BUCKET_BYTES)?;
        let d = d_params
            .map(|p| GradReducer::new(pg, p, BUCKET_BYTES))
            .transpose()?;
        Ok(Ddp {
            pg: pg.clone(),
            g,
            d,
            d_buffers,
        })
    }

    /// Make `tensors` identical on every rank (rank 0's values), then verify it by
    /// comparing checksums; `what` names the group in errors.
    pub fn broadcast_and_verify(&self, what: &str, tensors: &[Tensor]) -> Result<()> {
        tch::no_grad(|| self.pg.broadcast(tensors, 0))?;
        let local = checksums(tensors);
        let max = local.to_device(self.pg.device);
        let neg_min = (-&local).to_device(self.pg.device);
        self.pg
            .all_reduce_max(&[max.shallow_clone(), neg_min.shallow_clone()])?;
        let (max, neg_min) = (
            max.to_device(tch::Device::Cpu),
            neg_min.to_device(tch::Device::Cpu),
        );
        let differs = (max.ne_tensor(&local).any().int64_value(&[]) != 0)
            || ((-neg_min).ne_tensor(&local).any().int64_value(&[]) != 0);
        if differs {
            bail!(
                "rank {}: {what} differ across ranks after the broadcast from rank 0 (checksum all-reduce)",
                self.pg.rank
            );
        }
        Ok(())
    }

    /// Average the discriminator's buffers over the ranks.
    pub fn sync_d_buffers(&self) -> Result<()> {
        if self.d_buffers.is_empty() {
            return Ok(());
        }
        tch::no_grad(|| -> Result<()> {
            self.pg.all_reduce_sum(&self.d_buffers)?;
            for b in &self.d_buffers {
                let _ = b.shallow_clone().g_div_scalar_(self.pg.world as f64);
            }
            Ok(())
        })
    }
}

/// The rank's seed for its own random stream: `seed` itself on rank 0 (a one-process
/// run keeps its randomness), a well-mixed different value on the others.
pub fn rank_seed(seed: u64, rank: usize) -> u64 {
    if rank == 0 {
        return seed;
    }
    // splitmix64 of (seed, rank)
    let mut z = seed ^ (rank as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The start step index (of `n`) every rank uses at iteration `step` with
/// `train.dist_shared_start`: uniform, from a stream that depends on (seed, step) only.
pub fn shared_start(seed: u64, step: usize, n: usize) -> usize {
    use rand::{Rng, SeedableRng};
    let mut rng =
        rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_5a4e ^ ((step as u64) << 22));
    rng.gen_range(0..n.max(1))
}

/// Rows `[rank * n / world, (rank + 1) * n / world)` of a global batch of `n`.
pub fn shard_range(n: usize, rank: usize, world: usize) -> (usize, usize) {
    (rank * n / world, (rank + 1) * n / world)
}

/// Test hooks, switched on by environment variables (used by the multi-process
/// tests; no effect otherwise).
pub mod testing {
    use super::*;
    use std::io::Write;
    use std::path::PathBuf;

    /// `ADT_TEST_DUMP=DIR`: each rank appends a hash of its parameters after every
    /// optimiser step to `DIR/rank{r}.jsonl`, and writes the averaged generator
    /// gradients of the first generator step to `DIR/grads-g-rank{r}.safetensors`.
    pub fn dump_dir() -> Option<PathBuf> {
        static D: OnceLock<Option<PathBuf>> = OnceLock::new();
        D.get_or_init(|| std::env::var_os("ADT_TEST_DUMP").map(PathBuf::from))
            .clone()
    }

    /// `ADT_TEST_PINNED_NOISE=1`: per-sample randomness of the FT step is a
    /// function of (seed, step, index of the sample in the global batch).
    pub fn pinned_noise() -> bool {
        static P: OnceLock<bool> = OnceLock::new();
        *P.get_or_init(|| std::env::var("ADT_TEST_PINNED_NOISE").is_ok_and(|v| v == "1"))
    }

    /// The FT step's timesteps and noise for `z0`'s samples, whose global indices
    /// start at `first`: each from its own seed (seed, step, index), so that any
    /// split of a global batch over ranks draws the same values per sample.
    pub fn pinned_ft_noise(
        seed: u64,
        step: usize,
        first: usize,
        z0: &Tensor,
        n_train: usize,
    ) -> (Vec<usize>, Tensor) {
        use rand::{Rng, SeedableRng};
        let b = z0.size()[0] as usize;
        let mut shape = z0.size();
        shape[0] = 1;
        let mut ts = Vec::with_capacity(b);
        let mut eps = Vec::with_capacity(b);
        for i in 0..b {
            let s = rank_seed(seed ^ ((step as u64) << 24), first + i + 1);
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(s);
            ts.push(rng.gen_range(0..n_train));
            tch::manual_seed((s & 0x7fff_ffff_ffff) as i64);
            eps.push(Tensor::randn(&shape, (z0.kind(), z0.device())));
        }
        (ts, Tensor::cat(&eps, 0))
    }

    /// FNV-1a over the bytes of `ts` (bit-exact comparison across processes).
    pub fn hash(ts: &[Tensor]) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for t in ts {
            let c = t.detach().to_device(tch::Device::Cpu).contiguous();
            let n = c.numel() * c.kind().elt_size_in_bytes();
            let mut bytes = vec![0u8; n];
            c.copy_data_u8(&mut bytes, c.numel());
            for b in bytes {
                h ^= b as u64;
                h = h.wrapping_mul(0x100_0000_01b3);
            }
        }
        format!("{h:016x}")
    }

    pub fn after_step(what: &str, step: usize, ts: &[Tensor]) {
        let Some(dir) = dump_dir() else { return };
        let line = format!(
            "{{\"step\":{step},\"what\":\"{what}\",\"hash\":\"{}\"}}\n",
            hash(ts)
        );
        let path = dir.join(format!("rank{}.jsonl", rank()));
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
        {
            let _ = f.write_all(line.as_bytes());
        }
    }

    pub fn g_grads(params: &[Tensor]) {
        let Some(dir) = dump_dir() else { return };
        let path = dir.join(format!("grads-g-rank{}.safetensors", rank()));
        if path.exists() {
            return;
        }
        let named: Vec<(String, Tensor)> = params
            .iter()
            .enumerate()
            .filter(|(_, p)| p.grad().defined())
            .map(|(i, p)| (format!("{i:05}"), p.grad().detach().copy()))
            .collect();
        let _ = crate::weights::save_safetensors(&named, &path, None, None);
    }
}

impl Ddp {
    /// One line on the communication of this rank so far.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "rank {}: {:.2} s waiting for collectives",
            self.pg.rank,
            self.pg.comm_seconds()
        );
        for (name, r) in [("G", Some(&self.g)), ("D", self.d.as_ref())] {
            if let Some(r) = r {
                let (t, b) = r.sent();
                s += &format!(
                    "; {name}: {:.1} MB all-reduced in {t} buckets ({b} started during the backward)",
                    r.bytes() as f64 / 1e6
                );
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_batch() {
        for n in [4usize, 5, 8] {
            for w in [1usize, 2, 3] {
                let mut next = 0;
                for r in 0..w {
                    let (a, b) = shard_range(n, r, w);
                    assert_eq!(a, next);
                    next = b;
                }
                assert_eq!(next, n);
            }
        }
    }

    #[test]
    fn rank_seeds_differ() {
        assert_eq!(rank_seed(7, 0), 7);
        assert_ne!(rank_seed(7, 1), rank_seed(7, 2));
        assert_ne!(rank_seed(7, 1), 7);
    }
}
