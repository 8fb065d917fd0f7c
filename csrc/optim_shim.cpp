// libtorch's fused AdamW kernel (aten::_fused_adamw_, one pass over every tensor of
// the parameter list, CPU and CUDA), which tch does not bind. Compiled into every
// build that has a LIBTORCH folder (see build.rs).

#include <ATen/core/Tensor.h>
#include <ATen/ops/_fused_adamw.h>

#include <cstdint>
#include <exception>
#include <string>
#include <vector>

namespace {
thread_local std::string optim_error;
}

extern "C" {

const char* adt_optim_last_error() { return optim_error.c_str(); }

// One AdamW step over n tensors: params, grads, first and second moments (all of
// one dtype and device), with the step count held in the 0-d float tensor `step`
// (already incremented by the caller). Returns 0, or -1 with a message.
int adt_fused_adamw(const at::Tensor* const* params, const at::Tensor* const* grads,
                    const at::Tensor* const* exp_avgs,
                    const at::Tensor* const* exp_avg_sqs, const at::Tensor* step,
                    int64_t n, double lr, double beta1, double beta2,
                    double weight_decay, double eps) {
  try {
    std::vector<at::Tensor> p, g, m, v, s;
    p.reserve(n);
    g.reserve(n);
    m.reserve(n);
    v.reserve(n);
    s.reserve(n);
    for (int64_t i = 0; i < n; ++i) {
      p.push_back(*params[i]);
      g.push_back(*grads[i]);
      m.push_back(*exp_avgs[i]);
      v.push_back(*exp_avg_sqs[i]);
      s.push_back(*step);
    }
    at::_fused_adamw_(p, g, m, v, {}, s, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false);
    // The kernel writes through raw pointers: record the in-place change in the
    // version counters (as an in-place tensor op would), which copies of the
    // weights use to notice that they are stale.
    for (auto& t : p) t.unsafeGetTensorImpl()->bump_version();
    for (auto& t : m) t.unsafeGetTensorImpl()->bump_version();
    for (auto& t : v) t.unsafeGetTensorImpl()->bump_version();
    return 0;
  } catch (const std::exception& e) {
    optim_error = e.what();
  } catch (...) {
    optim_error = "unknown C++ exception";
  }
  return -1;
}

}  // extern "C"
