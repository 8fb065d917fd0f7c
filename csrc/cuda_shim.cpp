// A small C ABI over the parts of libtorch's CUDA runtime that tch does not bind:
// the caching allocator's peak-memory statistics, CUDA-graph capture / replay, the
// TF32 switches and the autocast dtype.
// Compiled only for GPU builds (see build.rs). Every function catches C++
// exceptions and reports them through adt_cuda_last_error().

#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/core/Event.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/core/StreamGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <exception>
#include <optional>
#include <string>

namespace {

thread_local std::string last_error;

template <typename F>
int guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
  } catch (...) {
    last_error = "unknown C++ exception";
  }
  return -1;
}

// Make `waiter` wait for the work queued so far on `producer` (no host sync).
// Goes through c10's device-generic event so that no CUDA runtime symbol is
// referenced from here.
void stream_wait(const c10::cuda::CUDAStream& producer,
                 const c10::cuda::CUDAStream& waiter) {
  c10::Event ev(c10::DeviceType::CUDA);
  ev.record(producer.unwrap());
  ev.block(waiter.unwrap());
}

// A graph together with the side stream it is captured on. While a capture (or a
// warm-up on the side stream) is open, the stream guard makes the side stream the
// current stream of the device, so that every kernel launched by the caller lands
// on it.
struct Graph {
  c10::DeviceIndex device;
  at::cuda::CUDAGraph graph;
  std::optional<c10::cuda::CUDAStream> side;
  std::optional<c10::StreamGuard> guard;
  bool captured = false;

  explicit Graph(c10::DeviceIndex d) : device(d), graph() {}

  void enter_side() {
    if (guard.has_value()) {
      throw std::runtime_error("side stream already entered");
    }
    auto current = c10::cuda::getCurrentCUDAStream(device);
    if (!side.has_value()) {
      side = c10::cuda::getStreamFromPool(false, device);
    }
    // The side stream waits for the work queued so far.
    stream_wait(current, *side);
    guard.emplace(side->unwrap());
  }

  void leave_side() {
    if (!guard.has_value()) {
      throw std::runtime_error("side stream not entered");
    }
    guard.reset();
    auto current = c10::cuda::getCurrentCUDAStream(device);
    // Later work on the original stream waits for the side stream.
    stream_wait(*side, current);
  }
};

}  // namespace

extern "C" {

const char* adt_cuda_last_error() { return last_error.c_str(); }

int adt_cuda_reset_peak(int device) {
  return guarded([&] {
    c10::cuda::CUDACachingAllocator::resetPeakStats(
        static_cast<c10::DeviceIndex>(device));
  });
}

int adt_cuda_memory(int device, int64_t* peak_allocated, int64_t* allocated,
                    int64_t* peak_reserved) {
  return guarded([&] {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(
        static_cast<c10::DeviceIndex>(device));
    const auto agg = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    *peak_allocated = stats.allocated_bytes[agg].peak;
    *allocated = stats.allocated_bytes[agg].current;
    *peak_reserved = stats.reserved_bytes[agg].peak;
  });
}

// TF32 tensor cores for float32 matmuls (cuBLAS) and convolutions (cuDNN).
int adt_set_tf32(int enable) {
  return guarded([&] {
    at::globalContext().setAllowTF32CuBLAS(enable != 0);
    at::globalContext().setAllowTF32CuDNN(enable != 0);
  });
}

// Autocast on CUDA computes in bfloat16 (PyTorch's torch.autocast("cuda",
// dtype=torch.bfloat16)); enabling it is left to tch::autocast.
int adt_autocast_bf16() {
  return guarded(
      [] { at::autocast::set_autocast_dtype(at::kCUDA, at::kBFloat16); });
}

int adt_cuda_empty_cache() {
  return guarded([] { c10::cuda::CUDACachingAllocator::emptyCache(); });
}

void* adt_graph_new(int device) {
  Graph* g = nullptr;
  guarded([&] { g = new Graph(static_cast<c10::DeviceIndex>(device)); });
  return g;
}

void adt_graph_free(void* g) { delete static_cast<Graph*>(g); }

int adt_graph_enter_side(void* g) {
  return guarded([&] { static_cast<Graph*>(g)->enter_side(); });
}

int adt_graph_leave_side(void* g) {
  return guarded([&] { static_cast<Graph*>(g)->leave_side(); });
}

int adt_graph_capture_begin(void* g) {
  return guarded([&] {
    auto* graph = static_cast<Graph*>(g);
    if (graph->captured) {
      throw std::runtime_error("graph already captured");
    }
    graph->enter_side();
    try {
      graph->graph.capture_begin();
    } catch (...) {
      graph->leave_side();
      throw;
    }
  });
}

int adt_graph_capture_end(void* g) {
  return guarded([&] {
    auto* graph = static_cast<Graph*>(g);
    std::exception_ptr failed;
    try {
      graph->graph.capture_end();
    } catch (...) {
      failed = std::current_exception();
    }
    graph->leave_side();
    if (failed) {
      std::rethrow_exception(failed);
    }
    graph->captured = true;
  });
}

int adt_graph_replay(void* g) {
  return guarded([&] {
    auto* graph = static_cast<Graph*>(g);
    if (!graph->captured) {
      throw std::runtime_error("replay of a graph that was not captured");
    }
    graph->graph.replay();
  });
}

}  // extern "C"
