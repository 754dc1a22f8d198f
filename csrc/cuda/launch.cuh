// Launch helpers shared by the CUDA kernels: block size, 128-bit packs, alignment, and the
// number of blocks the current device keeps resident.  Only c10/cuda headers are used (not
// ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers), so the kernels compile
// against a bare CUDA toolkit too.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

#include <algorithm>
#include <cstdint>

namespace fisnet {
namespace cuda_launch {

constexpr int kThreads = 256;

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Elements of T in one 128-bit access.
template <typename T>
constexpr int vec_size() {
  return static_cast<int>(16 / sizeof(T));
}

inline bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) % 16) == 0; }

// Blocks of kThreads the current device holds resident (SMs x threads per SM / kThreads), cached
// per device.
inline int64_t resident_blocks() {
  constexpr int kMaxDevices = 64;
  static int64_t cache[kMaxDevices] = {0};
  const c10::DeviceIndex dev = c10::cuda::current_device();
  if (dev >= 0 && dev < kMaxDevices && cache[dev] > 0) return cache[dev];
  int sms = 0, threads = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&threads, cudaDevAttrMaxThreadsPerMultiProcessor, dev));
  const int64_t r = static_cast<int64_t>(std::max(sms, 1)) * std::max(1, threads / kThreads);
  if (dev >= 0 && dev < kMaxDevices) cache[dev] = r;  // benign race: every writer stores the same value
  return r;
}

}  // namespace cuda_launch
}  // namespace fisnet
