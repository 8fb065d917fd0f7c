// Data-parallel training on libtorch's own distributed engine (c10d): a TCPStore
// rendezvous, a Gloo process group (CPU), collectives through the c10d::Backend
// interface, and a bucketed gradient reducer whose all-reduces start from autograd
// hooks while the backward is still running (as PyTorch's DDP reducer does).
// Compiled into every build whose libtorch folder is known (see build.rs).
//
// How Gloo is reached. libtorch ships ProcessGroupGloo.hpp but not the gloo headers
// it includes, and no gloo build with a matching API is available from a package
// registry (Debian's libgloo-dev is a 2022 snapshot, older than the gloo PyTorch 2.11
// was built with, and its rendezvous::Store lacks methods the PyTorch header
// overrides). So the class is not included: below is a declaration of the two
// exported entry points used (the constructor and Options::create_default), both
// defined in libtorch_cpu, and everything else goes through c10d::Backend, whose
// header is complete and whose collectives are virtual. The object is allocated
// here, so its size must be known: ProcessGroupGloo is 488 bytes in libtorch 2.11
// (the operand of the operator new that precedes every call to its constructor in
// ProcessGroupGloo::split / merge); kGlooAlloc leaves an 8x margin. Destruction
// goes through the class's own virtual (deleting) destructor, which frees with
// operator delete, matching the ::operator new used here. These sizes belong to
// libtorch 2.11 (the version tch 0.24 binds); check them again on an upgrade
// (objdump -d libtorch_cpu.so, the `mov $SIZE,%edi` before the constructor call).

#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/utils/lambda_post_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/Types.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <vector>

namespace gloo::transport {
class Device;
}

namespace c10d {
// The part of ProcessGroupGloo (torch/csrc/distributed/c10d/ProcessGroupGloo.hpp)
// that this file uses; the definitions are libtorch_cpu's.
class TORCH_API ProcessGroupGloo : public Backend {
 public:
  struct TORCH_API Options : public Backend::Options {
    explicit Options(std::chrono::milliseconds timeout);
    static c10::intrusive_ptr<Options> create_default(std::chrono::milliseconds timeout);
    std::vector<std::shared_ptr<::gloo::transport::Device>> devices;
    int threads{2};
  };
  ProcessGroupGloo(const c10::intrusive_ptr<Store>& store, int rank, int size,
                   c10::intrusive_ptr<Options> options);
  ~ProcessGroupGloo() override;
};
#ifdef ADT_DIST_NCCL
// The same for ProcessGroupNCCL (libtorch_cuda; its header needs nccl.h, which
// libtorch does not ship). In libtorch 2.11 the class is 1112 bytes and its Options
// 248 (the operands of operator new before their constructors in
// ProcessGroupNCCL::split); kNcclAlloc / kNcclOptionsAlloc leave a wide margin.
class TORCH_API ProcessGroupNCCL : public Backend {
 public:
  struct TORCH_API Options : public Backend::Options {
    explicit Options(bool is_high_priority_stream);
  };
  ProcessGroupNCCL(c10::intrusive_ptr<Store> store, int rank, int size,
                   c10::intrusive_ptr<Options> options);
  ~ProcessGroupNCCL() override;
};
#endif
}  // namespace c10d

namespace {

constexpr size_t kGlooAlloc = 4096;
#ifdef ADT_DIST_NCCL
constexpr size_t kNcclAlloc = 8192;
constexpr size_t kNcclOptionsAlloc = 4096;
#endif

// Construct T in a zeroed over-sized allocation (see the top of this file) and
// hand it to an intrusive_ptr (refcount 1).
template <class T, class... Args>
c10::intrusive_ptr<T> make_oversized(size_t bytes, Args&&... args) {
  void* mem = ::operator new(bytes);
  std::memset(mem, 0, bytes);
  T* obj = nullptr;
  try {
    obj = new (mem) T(std::forward<Args>(args)...);
  } catch (...) {
    ::operator delete(mem);
    throw;
  }
  return c10::intrusive_ptr<T>::unsafe_steal_from_new(obj);
}

thread_local std::string dist_error;

int fail(const std::exception& e) {
  dist_error = e.what();
  return -1;
}

int fail_unknown() {
  dist_error = "unknown C++ exception";
  return -1;
}

struct Dist {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  int rank = 0;
  int world = 1;
  std::chrono::milliseconds timeout{600000};
};

// Wait for `work`; false with dist_error set on failure or timeout.
bool wait_work(const c10::intrusive_ptr<c10d::Work>& work, std::chrono::milliseconds timeout) {
  try {
    if (!work->wait(timeout)) {
      dist_error = "collective timed out";
      return false;
    }
    return true;
  } catch (const std::exception& e) {
    dist_error = e.what();
  } catch (...) {
    dist_error = "unknown C++ exception";
  }
  return false;
}

// A gradient bucket: parameters of one dtype and device, flattened into `flat`
// for one all-reduce.
struct Bucket {
  std::vector<size_t> params;
  std::vector<int64_t> offsets;
  int64_t numel = 0;
  at::Tensor flat;
  size_t pending = 0;
  bool launched = false;
  bool dirty = false;
  c10::intrusive_ptr<c10d::Work> work;
};

struct Reducer {
  Dist* dist = nullptr;
  std::vector<at::Tensor> params;
  std::vector<std::shared_ptr<torch::autograd::Node>> accumulators;
  std::vector<size_t> bucket_of;
  std::vector<Bucket> buckets;
  std::vector<int> hits;
  int64_t cap_bytes = 25 << 20;
  int expected = 0;
  bool armed = false;
  size_t next_bucket = 0;
  // Order in which the hooks fired in the first armed backward (rank 0's is used to
  // rebuild the buckets once, as DDP does).
  std::vector<int64_t> ready_order;
  bool rebuilt = false;
  int64_t launched_bytes = 0;
  // Buckets sent from a hook (during the backward) and in all.
  int64_t sent_in_backward = 0;
  int64_t sent = 0;
  std::mutex mu;
  std::string error;

  void build(const std::vector<size_t>& order) {
    buckets.clear();
    bucket_of.assign(params.size(), 0);
    Bucket cur;
    int64_t bytes = 0;
    auto flush = [&]() {
      if (!cur.params.empty()) {
        buckets.push_back(std::move(cur));
        cur = Bucket();
        bytes = 0;
      }
    };
    for (size_t i : order) {
      const auto& p = params[i];
      if (!cur.params.empty()) {
        const auto& q = params[cur.params.front()];
        if (q.scalar_type() != p.scalar_type() || q.device() != p.device() ||
            bytes + static_cast<int64_t>(p.nbytes()) > cap_bytes) {
          flush();
        }
      }
      cur.offsets.push_back(cur.numel);
      cur.params.push_back(i);
      cur.numel += p.numel();
      bytes += p.nbytes();
    }
    flush();
    for (size_t b = 0; b < buckets.size(); ++b) {
      auto& bk = buckets[b];
      for (size_t i : bk.params) bucket_of[i] = b;
      bk.flat = at::zeros({bk.numel}, params[bk.params.front()].options().requires_grad(false));
    }
  }

  void reset_round() {
    std::fill(hits.begin(), hits.end(), 0);
    for (auto& b : buckets) {
      b.pending = b.params.size();
      b.launched = false;
      b.dirty = false;
      b.work.reset();
    }
    next_bucket = 0;
  }

  // Copy the current gradients of bucket `b` into its flat buffer and start the
  // all-reduce (sum). Called with `mu` held, in bucket order on every rank.
  void launch(size_t b) {
    auto& bk = buckets[b];
    at::NoGradGuard ng;
    for (size_t k = 0; k < bk.params.size(); ++k) {
      const auto& p = params[bk.params[k]];
      auto dst = bk.flat.narrow(0, bk.offsets[k], p.numel());
      const auto& g = p.grad();
      if (g.defined()) {
        dst.copy_(g.reshape({-1}));
      } else {
        dst.zero_();
      }
    }
    std::vector<at::Tensor> ts{bk.flat};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    bk.work = dist->backend->allreduce(ts, opts);
    bk.launched = true;
    launched_bytes += bk.flat.nbytes();
    sent += 1;
    if (armed) sent_in_backward += 1;
  }

  void launch_ready() {
    while (next_bucket < buckets.size() && buckets[next_bucket].pending == 0) {
      launch(next_bucket);
      ++next_bucket;
    }
  }

  void on_ready(size_t i) {
    std::lock_guard<std::mutex> lock(mu);
    if (!armed) return;
    if (!rebuilt && hits[i] == 0) ready_order.push_back(static_cast<int64_t>(i));
    auto& bk = buckets[bucket_of[i]];
    if (bk.launched) {
      // A contribution after the bucket was sent (more backward passes than
      // announced): it is sent again at finish.
      bk.dirty = true;
      return;
    }
    hits[i] += 1;
    if (hits[i] == expected) {
      bk.pending -= 1;
      try {
        launch_ready();
      } catch (const std::exception& e) {
        if (error.empty()) error = e.what();
      }
    }
  }
};

}  // namespace

extern "C" {

const char* adt_dist_last_error() { return dist_error.c_str(); }

// Rendezvous through a TCPStore at host:port (rank 0 hosts it) and create the
// process group. backend: "gloo". Returns a handle, or null with a message.
void* adt_dist_init(const char* backend, const char* host, int port, int rank, int world,
                    int64_t timeout_ms) {
  try {
    auto d = std::make_unique<Dist>();
    d->rank = rank;
    d->world = world;
    d->timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions so;
    so.port = static_cast<std::uint16_t>(port);
    so.isServer = rank == 0;
    so.numWorkers = world;
    so.waitWorkers = true;
    so.timeout = d->timeout;
    d->store = c10::make_intrusive<c10d::TCPStore>(std::string(host), so);
    std::string b(backend);
    if (b == "gloo") {
      auto opts = c10d::ProcessGroupGloo::Options::create_default(d->timeout);
      d->backend = make_oversized<c10d::ProcessGroupGloo>(kGlooAlloc, d->store, rank, world, opts);
#ifdef ADT_DIST_NCCL
    } else if (b == "nccl") {
      auto opts = make_oversized<c10d::ProcessGroupNCCL::Options>(kNcclOptionsAlloc, false);
      opts->timeout = d->timeout;
      d->backend = make_oversized<c10d::ProcessGroupNCCL>(kNcclAlloc, d->store, rank, world, opts);
#endif
    } else {
#ifdef ADT_DIST_NCCL
      dist_error = "unknown distributed backend '" + b + "' (this build has: gloo, nccl)";
#else
      dist_error = "distributed backend '" + b +
                   "' is not in this build (it has: gloo; NCCL needs a GPU build, cargo feature `cuda`)";
#endif
      return nullptr;
    }
    return d.release();
  } catch (const std::exception& e) {
    fail(e);
  } catch (...) {
    fail_unknown();
  }
  return nullptr;
}

int adt_dist_store_set(void* h, const char* key, const char* value) {
  try {
    auto* d = static_cast<Dist*>(h);
    std::string v(value);
    d->store->set(std::string(key), std::vector<uint8_t>(v.begin(), v.end()));
    return 0;
  } catch (const std::exception& e) {
    return fail(e);
  } catch (...) {
    return fail_unknown();
  }
}

// Copy the value of `key` into buf (at most cap bytes, NUL-terminated); 1 if the key
// is absent, 0 if found, -1 on error (the store is unreachable).
int adt_dist_store_get(void* h, const char* key, char* buf, int64_t cap) {
  try {
    auto* d = static_cast<Dist*>(h);
    std::string k(key);
    if (!d->store->check({k})) return 1;
    auto v = d->store->get(k);
    size_t n = std::min<size_t>(v.size(), static_cast<size_t>(cap - 1));
    std::memcpy(buf, v.data(), n);
    buf[n] = 0;
    return 0;
  } catch (const std::exception& e) {
    return fail(e);
  } catch (...) {
    return fail_unknown();
  }
}

// In-place all-reduce of n tensors, one collective each, waited for. op: 0 sum, 1 max.
int adt_dist_allreduce(void* h, const at::Tensor* const* ts, int64_t n, int op) {
  try {
    auto* d = static_cast<Dist*>(h);
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    for (int64_t i = 0; i < n; ++i) {
      std::vector<at::Tensor> v{*ts[i]};
      c10d::AllreduceOptions o;
      o.reduceOp = op == 1 ? c10d::ReduceOp::MAX : c10d::ReduceOp::SUM;
      works.push_back(d->backend->allreduce(v, o));
    }
    for (auto& w : works)
      if (!wait_work(w, d->timeout)) return -1;
    return 0;
  } catch (const std::exception& e) {
    return fail(e);
  } catch (...) {
    return fail_unknown();
  }
}

// Broadcast n tensors in place from `root`.
int adt_dist_broadcast(void* h, const at::Tensor* const* ts, int64_t n, int root) {
  try {
    auto* d = static_cast<Dist*>(h);
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    for (int64_t i = 0; i < n; ++i) {
      std::vector<at::Tensor> v{*ts[i]};
      c10d::BroadcastOptions o;
      o.rootRank = root;
      works.push_back(d->backend->broadcast(v, o));
    }
    for (auto& w : works)
      if (!wait_work(w, d->timeout)) return -1;
    return 0;
  } catch (const std::exception& e) {
    return fail(e);
  } catch (...) {
    return fail_unknown();
  }
}

int adt_dist_barrier(void* h) {
  try {
    auto* d = static_cast<Dist*>(h);
    c10d::BarrierOptions o;
    o.timeout = d->timeout;
    return wait_work(d->backend->barrier(o), d->timeout) ? 0 : -1;
  } catch (const std::exception& e) {
    return fail(e);
  } catch (...) {
    return fail_unknown();
  }
}

// A gradient reducer over n leaf tensors (all requiring grad), buckets of at most
// cap_bytes in the given order (the reverse of the order gradients become ready is
// best; the first armed round's actual order, as rank 0 saw it, replaces it).
void* adt_dist_reducer_new(void* h, const at::Tensor* const* ts, int64_t n, int64_t cap_bytes) {
  try {
    if (n <= 0) {
      dist_error = "reducer: no parameters";
      return nullptr;
    }
    auto r = std::make_unique<Reducer>();
    r->dist = static_cast<Dist*>(h);
    r->cap_bytes = cap_bytes;
    for (int64_t i = 0; i < n; ++i) r->params.push_back(*ts[i]);
    r->hits.assign(r->params.size(), 0);
    std::vector<size_t> order(r->params.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    r->build(order);
    r->reset_round();
    Reducer* raw = r.get();
    for (size_t i = 0; i < raw->params.size(); ++i) {
      auto acc = torch::autograd::impl::grad_accumulator(raw->params[i]);
      if (!acc) {
        dist_error = "reducer: tensor " + std::to_string(i) + " is not a leaf that requires grad";
        return nullptr;
      }
      acc->add_post_hook(std::make_unique<torch::autograd::utils::LambdaPostHook>(
          [raw, i](const torch::autograd::variable_list& outputs,
                   const torch::autograd::variable_list&) {
            raw->on_ready(i);
            return outputs;
          }));
      raw->accumulators.push_back(std::move(acc));
    }
    return r.release();
  } catch (const std::exception& e) {
    fail(e);
  } catch (...) {
    fail_unknown();
  }
  return nullptr;
}

int64_t adt_dist_reducer_buckets(void* r) { return static_cast<Reducer*>(r)->buckets.size(); }

// Buckets sent so far, and how many of them from a hook during the backward.
void adt_dist_reducer_sent(void* r, int64_t* total, int64_t* in_backward) {
  auto* red = static_cast<Reducer*>(r);
  *total = red->sent;
  *in_backward = red->sent_in_backward;
}

// Bytes sent into all-reduces by this reducer so far.
int64_t adt_dist_reducer_bytes(void* r) { return static_cast<Reducer*>(r)->launched_bytes; }

// The next `expected` backward passes complete the gradients of this optimiser
// step: a parameter is ready once its accumulator has run that many times, and
// each bucket is sent as soon as it and all buckets before it are ready.
void adt_dist_reducer_arm(void* rp, int expected) {
  auto* r = static_cast<Reducer*>(rp);
  std::lock_guard<std::mutex> lock(r->mu);
  r->reset_round();
  r->expected = std::max(1, expected);
  r->armed = true;
}

// Send what was not sent yet, wait, and replace every gradient by the average over
// the ranks (parameters without a gradient get one). Returns 0, or -1.
int adt_dist_reducer_finish(void* rp) {
  auto* r = static_cast<Reducer*>(rp);
  try {
    std::lock_guard<std::mutex> lock(r->mu);
    r->armed = false;
    if (!r->error.empty()) {
      dist_error = r->error;
      r->error.clear();
      return -1;
    }
    auto* d = r->dist;
    for (size_t b = r->next_bucket; b < r->buckets.size(); ++b) r->launch(b);
    r->next_bucket = r->buckets.size();
    // Buckets that got contributions after they were sent are sent again; every
    // rank must agree on which, so the flags are combined first.
    // (On the parameters' device: NCCL reduces device tensors only.)
    auto dev = r->params.front().device();
    std::vector<int> dirty(r->buckets.size());
    for (size_t b = 0; b < r->buckets.size(); ++b) dirty[b] = r->buckets[b].dirty ? 1 : 0;
    auto flags = at::tensor(dirty, at::kInt).to(dev);
    for (auto& bk : r->buckets)
      if (!wait_work(bk.work, d->timeout)) return -1;
    {
      std::vector<at::Tensor> v{flags};
      c10d::AllreduceOptions o;
      o.reduceOp = c10d::ReduceOp::MAX;
      if (!wait_work(d->backend->allreduce(v, o), d->timeout)) return -1;
    }
    flags = flags.cpu();
    auto f = flags.accessor<int, 1>();
    for (size_t b = 0; b < r->buckets.size(); ++b)
      if (f[b]) r->launch(b);
    for (size_t b = 0; b < r->buckets.size(); ++b)
      if (f[b] && !wait_work(r->buckets[b].work, d->timeout)) return -1;
    at::NoGradGuard ng;
    double inv = 1.0 / static_cast<double>(d->world);
    for (auto& bk : r->buckets) {
      bk.flat.mul_(inv);
      for (size_t k = 0; k < bk.params.size(); ++k) {
        auto& p = r->params[bk.params[k]];
        auto src = bk.flat.narrow(0, bk.offsets[k], p.numel()).view(p.sizes());
        auto& g = p.mutable_grad();
        if (g.defined()) {
          g.copy_(src);
        } else {
          g = src.clone();
        }
      }
      bk.work.reset();
    }
    if (!r->rebuilt) {
      // Rebuild the buckets once in rank 0's ready order (reversed registration
      // order is only a guess), so that the first buckets fill first.
      std::vector<char> seen(r->params.size(), 0);
      std::vector<int64_t> order;
      for (auto i : r->ready_order) {
        if (!seen[i]) {
          seen[i] = 1;
          order.push_back(i);
        }
      }
      for (size_t i = 0; i < r->params.size(); ++i)
        if (!seen[i]) order.push_back(static_cast<int64_t>(i));
      auto t = at::tensor(order, at::kLong).to(dev);
      std::vector<at::Tensor> v{t};
      c10d::BroadcastOptions o;
      o.rootRank = 0;
      if (!wait_work(d->backend->broadcast(v, o), d->timeout)) return -1;
      t = t.cpu();
      std::vector<size_t> o2(r->params.size());
      auto a = t.accessor<int64_t, 1>();
      for (size_t i = 0; i < o2.size(); ++i) o2[i] = static_cast<size_t>(a[i]);
      r->build(o2);
      r->rebuilt = true;
    }
    r->reset_round();
    return 0;
  } catch (const std::exception& e) {
    return fail(e);
  } catch (...) {
    return fail_unknown();
  }
}

}  // extern "C"
