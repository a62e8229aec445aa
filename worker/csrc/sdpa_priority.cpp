// The order in which libtorch's scaled_dot_product_attention tries its fused CUDA kernels.
// libtorch keeps it in its global context (the Python API is torch.nn.attention.sdpa_kernel with
// set_priority=True); tch does not expose it, so these two C functions do. Backend codes are the
// values of at::SDPBackend: math 0, flash 1, efficient 2, cudnn 3, overrideable 4.
#include <ATen/Context.h>

#include <cstdint>
#include <vector>

extern "C" {

// Sets the priority order from `n` backend codes. Returns 0, or -1 when the order does not name
// every backend exactly once (libtorch copies whatever it is given into a fixed-size array, so the
// check is made here) or libtorch throws.
int farm_sdpa_set_priority(const int64_t* order, size_t n) {
  if (order == nullptr || n != static_cast<size_t>(at::num_sdp_backends)) {
    return -1;
  }
  bool seen[at::num_sdp_backends] = {};
  for (size_t i = 0; i < n; ++i) {
    if (order[i] < 0 || order[i] >= at::num_sdp_backends || seen[order[i]]) {
      return -1;
    }
    seen[order[i]] = true;
  }
  try {
    std::vector<int64_t> v(order, order + n);
    at::globalContext().setSDPPriorityOrder(v);
    return 0;
  } catch (...) {
    return -1;
  }
}

// Writes the current order (at most `cap` codes) to `out`; returns how many backends there are, or
// 0 if libtorch throws.
size_t farm_sdpa_priority(int64_t* out, size_t cap) {
  try {
    auto order = at::globalContext().sDPPriorityOrder();
    for (size_t i = 0; i < order.size() && i < cap; ++i) {
      out[i] = static_cast<int64_t>(order[i]);
    }
    return order.size();
  } catch (...) {
    return 0;
  }
}

}  // extern "C"
