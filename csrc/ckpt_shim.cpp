// Gradient checkpointing (activation recomputation) for the Rust models, which tch
// cannot express: a custom autograd function whose forward runs a segment of a model
// without keeping its activations, and whose backward runs the segment again with
// the graph and backpropagates through it. This is PyTorch's reentrant
// `torch.utils.checkpoint`, with the segment supplied by Rust through a callback:
//
// * forward: saves the inputs and the RNG states (CPU and the inputs' accelerator),
//   runs the segment with grad mode off (as `Function::apply` does), returns its
//   outputs;
// * backward: detaches the saved inputs (keeping their requires_grad), restores the
//   saved RNG states (so dropout draws the same masks), runs the segment again with
//   grad mode on, calls backward on its outputs with the incoming gradients (the
//   parameters' .grad accumulate as without checkpointing) and returns the inputs'
//   gradients.
//
// Every call gets one extra 0-d input that requires grad, so the segment is in the
// graph even when none of its tensor inputs requires grad (a frozen layer in front
// of a LoRA adapter): reentrant checkpointing otherwise loses those gradients.
//
// Compiled into every build whose libtorch folder is known (see build.rs).

#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/Generator.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdint>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

extern "C" {
// The Rust side: run segment `id` on `n` inputs (each a new at::Tensor the callee
// owns); push each output with adt_ckpt_push_output(out, ...). Returns 0, or
// non-zero after adt_ckpt_set_error(out, message).
typedef int (*adt_ckpt_callback_t)(uint64_t id, at::Tensor** inputs, int64_t n,
                                   void* out);
}

namespace {

adt_ckpt_callback_t callback = nullptr;
thread_local std::string ckpt_error;

struct CallOut {
  std::vector<at::Tensor> outputs;
  std::string error;
};

std::vector<at::Tensor> run_segment(uint64_t id, const std::vector<at::Tensor>& in) {
  if (callback == nullptr) throw std::runtime_error("checkpoint: no callback registered");
  std::vector<at::Tensor*> ptrs;
  ptrs.reserve(in.size());
  for (const auto& t : in) ptrs.push_back(new at::Tensor(t));
  CallOut out;
  int rc = callback(id, ptrs.data(), static_cast<int64_t>(ptrs.size()), &out);
  if (rc != 0) throw std::runtime_error("checkpointed segment failed: " + out.error);
  return std::move(out.outputs);
}

// RNG states of the CPU generator and, where the inputs live on an accelerator, of
// that device's default generator.
struct RngStates {
  at::Tensor cpu;
  bool has_device = false;
  c10::Device device = c10::Device(c10::DeviceType::CPU);
  at::Tensor dev;
};

RngStates capture_rng(c10::Device device) {
  RngStates s;
  {
    auto gen = at::globalContext().defaultGenerator(c10::Device(c10::DeviceType::CPU));
    std::lock_guard<std::mutex> lock(gen.mutex());
    s.cpu = gen.get_state();
  }
  if (!device.is_cpu() && !device.is_meta()) {
    auto gen = at::globalContext().defaultGenerator(device);
    std::lock_guard<std::mutex> lock(gen.mutex());
    s.has_device = true;
    s.device = device;
    s.dev = gen.get_state();
  }
  return s;
}

void restore_rng(const RngStates& s) {
  {
    auto gen = at::globalContext().defaultGenerator(c10::Device(c10::DeviceType::CPU));
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(s.cpu);
  }
  if (s.has_device) {
    auto gen = at::globalContext().defaultGenerator(s.device);
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(s.dev);
  }
}

// Autocast state of the CPU and CUDA device types (thread-local in libtorch: the
// backward may run on another thread than the forward).
struct AutocastState {
  bool cpu_on, cuda_on;
  at::ScalarType cpu_dtype, cuda_dtype;
};

AutocastState capture_autocast() {
  return {at::autocast::is_autocast_enabled(at::kCPU),
          at::autocast::is_autocast_enabled(at::kCUDA),
          at::autocast::get_autocast_dtype(at::kCPU),
          at::autocast::get_autocast_dtype(at::kCUDA)};
}

void set_autocast(const AutocastState& a) {
  at::autocast::set_autocast_enabled(at::kCPU, a.cpu_on);
  at::autocast::set_autocast_enabled(at::kCUDA, a.cuda_on);
  at::autocast::set_autocast_dtype(at::kCPU, a.cpu_dtype);
  at::autocast::set_autocast_dtype(at::kCUDA, a.cuda_dtype);
}

c10::Device first_device(const std::vector<at::Tensor>& in) {
  for (const auto& t : in)
    if (t.defined() && !t.device().is_cpu()) return t.device();
  return c10::Device(c10::DeviceType::CPU);
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct CheckpointFn : public torch::autograd::Function<CheckpointFn> {
  // `inputs` as a TensorList: each element is one differentiable input (a
  // std::vector argument would count as a single non-tensor one).
  static variable_list forward(AutogradContext* ctx, int64_t id, at::Tensor anchor,
                               at::TensorList input_list) {
    (void)anchor;
    variable_list inputs(input_list.begin(), input_list.end());
    ctx->saved_data["id"] = id;
    c10::List<bool> req;
    for (const auto& t : inputs) req.push_back(t.requires_grad());
    ctx->saved_data["requires_grad"] = req;
    auto device = first_device(inputs);
    auto rng = capture_rng(device);
    ctx->saved_data["rng_cpu"] = rng.cpu;
    if (rng.has_device) {
      ctx->saved_data["rng_dev"] = rng.dev;
      ctx->saved_data["rng_dev_type"] = static_cast<int64_t>(rng.device.type());
      ctx->saved_data["rng_dev_index"] = static_cast<int64_t>(rng.device.index());
    }
    auto ac = capture_autocast();
    ctx->saved_data["autocast"] = c10::List<int64_t>(
        {ac.cpu_on, ac.cuda_on, static_cast<int64_t>(ac.cpu_dtype),
         static_cast<int64_t>(ac.cuda_dtype)});
    ctx->save_for_backward(inputs);
    return run_segment(static_cast<uint64_t>(id), inputs);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto id = static_cast<uint64_t>(ctx->saved_data["id"].toInt());
    auto req = ctx->saved_data["requires_grad"].toBoolList();
    auto saved = ctx->get_saved_variables();
    std::vector<at::Tensor> inputs;
    inputs.reserve(saved.size());
    for (size_t i = 0; i < saved.size(); ++i) {
      auto d = saved[i].detach();
      d.requires_grad_(req.get(i));
      inputs.push_back(d);
    }
    RngStates saved_rng;
    saved_rng.cpu = ctx->saved_data["rng_cpu"].toTensor();
    if (ctx->saved_data.count("rng_dev")) {
      saved_rng.has_device = true;
      saved_rng.dev = ctx->saved_data["rng_dev"].toTensor();
      saved_rng.device = c10::Device(
          static_cast<c10::DeviceType>(ctx->saved_data["rng_dev_type"].toInt()),
          static_cast<c10::DeviceIndex>(ctx->saved_data["rng_dev_index"].toInt()));
    }
    // Fork the RNG: replay the forward's draws, then put the current state back.
    auto now = capture_rng(saved_rng.has_device ? saved_rng.device
                                                : c10::Device(c10::DeviceType::CPU));
    restore_rng(saved_rng);
    // The recomputation runs under the forward's autocast state.
    auto acl = ctx->saved_data["autocast"].toIntList();
    AutocastState fwd_ac{acl.get(0) != 0, acl.get(1) != 0,
                         static_cast<at::ScalarType>(acl.get(2)),
                         static_cast<at::ScalarType>(acl.get(3))};
    auto now_ac = capture_autocast();
    set_autocast(fwd_ac);
    std::vector<at::Tensor> outputs;
    try {
      at::AutoGradMode grad_on(true);
      outputs = run_segment(id, inputs);
    } catch (...) {
      restore_rng(now);
      set_autocast(now_ac);
      throw;
    }
    restore_rng(now);
    set_autocast(now_ac);
    if (outputs.size() != grads.size())
      throw std::runtime_error("checkpointed segment: the recomputation gave " +
                               std::to_string(outputs.size()) + " outputs, the forward " +
                               std::to_string(grads.size()));
    variable_list outs, gs;
    for (size_t i = 0; i < outputs.size(); ++i) {
      if (outputs[i].requires_grad() && grads[i].defined()) {
        outs.push_back(outputs[i]);
        gs.push_back(grads[i]);
      }
    }
    if (!outs.empty()) torch::autograd::backward(outs, gs);
    variable_list result;
    result.reserve(inputs.size() + 2);
    result.emplace_back();  // id
    result.emplace_back();  // anchor
    for (auto& t : inputs) result.push_back(t.requires_grad() ? t.grad() : at::Tensor());
    return result;
  }
};

}  // namespace

extern "C" {

const char* adt_ckpt_last_error() { return ckpt_error.c_str(); }

void adt_ckpt_set_callback(adt_ckpt_callback_t cb) { callback = cb; }

void adt_ckpt_push_output(void* out, const at::Tensor* t) {
  static_cast<CallOut*>(out)->outputs.push_back(*t);
}

void adt_ckpt_set_error(void* out, const char* msg) {
  static_cast<CallOut*>(out)->error = msg;
}

int adt_ckpt_grad_enabled() { return at::GradMode::is_enabled() ? 1 : 0; }

// Run segment `id` on `n` inputs under checkpointing; writes up to `max_out` new
// at::Tensor outputs (owned by the caller) and their number. Returns 0, or -1 with
// a message (adt_ckpt_last_error).
int adt_ckpt_apply(uint64_t id, const at::Tensor* const* inputs, int64_t n,
                   at::Tensor** outputs, int64_t max_out, int64_t* n_out) {
  try {
    variable_list in;
    in.reserve(n);
    for (int64_t i = 0; i < n; ++i) in.push_back(*inputs[i]);
    auto anchor = at::zeros({}, at::TensorOptions().dtype(at::kFloat)).requires_grad_(true);
    auto out = CheckpointFn::apply(static_cast<int64_t>(id), anchor, at::TensorList(in));
    if (static_cast<int64_t>(out.size()) > max_out)
      throw std::runtime_error("checkpoint: the segment returned " +
                               std::to_string(out.size()) + " outputs, at most " +
                               std::to_string(max_out) + " are supported");
    for (size_t i = 0; i < out.size(); ++i) outputs[i] = new at::Tensor(out[i]);
    *n_out = static_cast<int64_t>(out.size());
    return 0;
  } catch (const std::exception& e) {
    ckpt_error = e.what();
  } catch (...) {
    ckpt_error = "unknown C++ exception";
  }
  return -1;
}

}  // extern "C"
