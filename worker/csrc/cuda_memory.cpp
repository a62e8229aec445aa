// Device memory helpers that tch does not expose, written so that nothing here links against the
// CUDA libraries (on a machine or build without CUDA the calls just report failure):
// * statistics of libtorch's CUDA caching allocator (what torch.cuda.max_memory_allocated reports),
//   through the device-generic allocator interface in libc10;
// * a pinned (page-locked) copy of a host tensor, through Tensor::pin_memory() without the
//   deprecated device argument that tch's binding always passes.
#include <ATen/core/Tensor.h>
#include <c10/core/CachingDeviceAllocator.h>

#include <cstdint>

extern "C" {

// Writes allocated bytes (current, peak) and reserved bytes (current, peak) of CUDA device
// `device` to out[0..4]. Returns 0, or -1 when there is no initialised CUDA allocator.
int farm_cuda_memory_stats(int device, int64_t* out) {
  try {
    auto* allocator = c10::getDeviceAllocator(c10::DeviceType::CUDA);
    if (allocator == nullptr || !allocator->initialized()) {
      return -1;
    }
    auto stats = allocator->getDeviceStats(static_cast<c10::DeviceIndex>(device));
    const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    out[0] = stats.allocated_bytes[all].current;
    out[1] = stats.allocated_bytes[all].peak;
    out[2] = stats.reserved_bytes[all].current;
    out[3] = stats.reserved_bytes[all].peak;
    return 0;
  } catch (...) {
    return -1;
  }
}

// Starts a new peak window on CUDA device `device`. Returns 0, or -1 as above.
int farm_cuda_reset_peak(int device) {
  try {
    auto* allocator = c10::getDeviceAllocator(c10::DeviceType::CUDA);
    if (allocator == nullptr || !allocator->initialized()) {
      return -1;
    }
    allocator->resetPeakStats(static_cast<c10::DeviceIndex>(device));
    return 0;
  } catch (...) {
    return -1;
  }
}

// A new tensor holding a pinned copy of host tensor `t` (to be freed like any tch tensor), or null
// when pinning is not possible (no CUDA runtime loaded, or the tensor is not on the CPU).
at::Tensor* farm_pin_memory(const at::Tensor* t) {
  try {
    if (t == nullptr || !t->device().is_cpu()) {
      return nullptr;
    }
    return new at::Tensor(t->pin_memory());
  } catch (...) {
    return nullptr;
  }
}

}  // extern "C"
