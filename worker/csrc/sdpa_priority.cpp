// The order in which libtorch's scaled_dot_product_attention tries its fused CUDA kernels.
// libtorch keeps it in its global context (the Python API is torch.nn.attention.sdpa_kernel with
// set_priority=True); tch does not expose it, so these two C functions do. Backend codes are the
// values of at::SDPBackend: math 0, flash 1, efficient 2, cudnn 3, overrideable 4.
#include <ATen/Context.h>

#include <cstdint>
#include <exception>
#include <vector>

extern "C" {

// Sets the priority order from `n` backend codes. Returns 0, or -1 if libtorch refused the order
// (it must name every backend exactly once).
int farm_sdpa_set_priority(const int64_t* order, size_t n) {
  try {
    std::vector<int64_t> v(order, order + n);
    at::globalContext().setSDPPriorityOrder(v);
    return 0;
  } catch (const std::exception&) {
    return -1;
  }
}

// Writes the current order (at most `cap` codes) to `out`; returns how many backends there are.
size_t farm_sdpa_priority(int64_t* out, size_t cap) {
  auto order = at::globalContext().sDPPriorityOrder();
  for (size_t i = 0; i < order.size() && i < cap; ++i) {
    out[i] = static_cast<int64_t>(order[i]);
  }
  return order.size();
}

}  // extern "C"
