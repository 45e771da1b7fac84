// CUDA implementation of the batched group novelty chain: ONE launch for all groups, one block
// per group (normalise, Gram, novelty, shaping, standardisation), accumulating in float32.
// Plain CUDA C++ with no torch headers: compiled by nvcc on its own and called from the
// pybind11 module in group_novelty_cuda_bind.cpp with raw pointers and the caller's stream.
//
// Per-group work arrays (norm + eps, rewards, exp(r - m), novelty, shaped; 5 G + 1 floats) live
// in dynamic shared memory when they fit the device's opt-in limit per block
// (cudaDevAttrMaxSharedMemoryPerBlockOptin: 227 KiB on H100, 163 KiB on A100, 99 KiB on
// A10/L4/L40S/RTX 30-50, 48 KiB on older parts), else in a global scratch buffer of B (5 G + 1)
// floats that the caller passes. Both paths run the same code and give identical results.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "novelty_chain.h"

namespace g2rl {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// At least 4 resident blocks per SM: caps registers at 64 per thread, which the kernels fit in
// without spills on sm_80..sm_90 (left to itself, ptxas spilled a few values per pair in the
// scratch variant at 40-48 registers).
constexpr int kMinBlocks = 4;
constexpr int kMaxDevices = 64;             // per-device caches below; more devices: no cache
constexpr int kDefaultSharedBytes = 48 * 1024;  // usable without opting in

// Floats of work space per group: norm + eps, r, exp(r - m), nu, shaped (G each), max reward.
__host__ __device__ constexpr int64_t work_floats(int64_t G) { return 5 * G + 1; }

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename T>
__device__ float row_dot(const T* a, const T* b, int64_t d, int64_t sd, int lane) {
  float acc = 0.f;
  for (int64_t k = lane; k < d; k += 32) acc += to_float(a[k * sd]) * to_float(b[k * sd]);
  return warp_sum(acc);
}

// Number of NaN/inf values in a row (the rare path: only when its sum of squares is not
// finite, which large finite values can cause too). Warp-wide; every lane gets the count.
template <typename T>
__device__ int row_non_finite(const T* a, int64_t d, int64_t sd, int lane) {
  int bad = 0;
  for (int64_t k = lane; k < d; k += 32) bad += isfinite(to_float(a[k * sd])) ? 0 : 1;
  for (int off = 16; off > 0; off >>= 1) bad += __shfl_xor_sync(0xffffffffu, bad, off);
  return bad;
}

// kGlobalWork: the work arrays are this group's slice of `work` (global memory) instead of
// dynamic shared memory. non_finite (zeroed by the launcher) receives the number of NaN/inf
// values found in the features and rewards.
template <typename T, bool kGlobalWork>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
group_novelty_kernel(const T* __restrict__ feats, int64_t G, int64_t d, int64_t sB, int64_t sG,
                     int64_t sd, const float* __restrict__ rew, int64_t rB, int64_t rG,
                     float* __restrict__ cosine, float* __restrict__ nu_out,
                     float* __restrict__ shaped_out, float* __restrict__ adv_out,
                     float* __restrict__ work, int* __restrict__ non_finite, ShapeOptions opts) {
  extern __shared__ float smem[];
  const int64_t b = blockIdx.x;
  float* norm = kGlobalWork ? work + b * work_floats(G) : smem;
  float* r = norm + G;
  float* e = r + G;
  float* nu = e + G;
  float* shaped = nu + G;
  float* shift = shaped + G;  // max reward of the group

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const T* base = feats + b * sB;
  float* S = cosine + b * G * G;

  // 1. norms, one warp per response
  for (int64_t i = warp; i < G; i += kWarps) {
    const T* row = base + i * sG;
    const float ss = row_dot(row, row, d, sd, lane);
    if (!isfinite(ss)) {
      const int bad = row_non_finite(row, d, sd, lane);
      if (lane == 0 && bad) atomicAdd(non_finite, bad);
    }
    if (lane == 0) norm[i] = sqrtf(ss) + opts.eps;
  }
  for (int64_t i = threadIdx.x; i < G; i += kThreads) {
    const float x = rew[b * rB + i * rG];
    if (!isfinite(x)) atomicAdd(non_finite, 1);
    r[i] = x;
  }
  __syncthreads();

  // 2. Gram of the normalised directions, one warp per pair (i, j >= i). The pairs are taken
  // in row-major order, warp w doing pairs w, w + kWarps, ...: each step moves j on by kWarps
  // and carries over into the next rows, so a warp walks its pairs in O(G + pairs / kWarps).
  {
    int64_t i = 0, j = warp;
    while (i < G && j >= G) j -= G - ++i;  // row i holds j = i..G-1; row i + 1 starts at i + 1
    while (i < G) {
      const float s = row_dot(base + i * sG, base + j * sG, d, sd, lane) / (norm[i] * norm[j]);
      if (lane == 0) {
        S[i * G + j] = s;
        S[j * G + i] = s;
      }
      j += kWarps;
      while (i < G && j >= G) j -= G - ++i;
    }
  }
  if (threadIdx.x == 0) *shift = group_max(r, G);
  __syncthreads();  // the block's writes of S and shift (global or shared) are visible after it
  const float m = *shift;
  for (int64_t k = threadIdx.x; k < G; k += kThreads) e[k] = expf(r[k] - m);
  __syncthreads();

  // 3. novelty, one thread per response
  const float eps_m = shifted_eps(opts.eps, m);
  for (int64_t i = threadIdx.x; i < G; i += kThreads) {
    nu[i] = novelty_of(i, G, e, eps_m, S + i * G);
  }
  __syncthreads();

  // 4. min-max, shaping, clipping, standardisation: O(G), one thread
  if (threadIdx.x == 0) {
    shape_and_standardise(G, r, nu, shaped, adv_out + b * G, opts);
  }
  __syncthreads();
  for (int64_t k = threadIdx.x; k < G; k += kThreads) {
    nu_out[b * G + k] = nu[k];
    shaped_out[b * G + k] = shaped[k];
  }
}

// Dynamic shared memory a block of the kernel may use on `device` (the current device): the
// device's opt-in limit per block less the kernel's static shared memory, cached per device.
cudaError_t max_dynamic_shared_bytes(int device, int* bytes) {
  static std::atomic<int> cache[kMaxDevices];  // 0: not queried yet
  if (device >= 0 && device < kMaxDevices) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) {
      *bytes = cached;
      return cudaSuccess;
    }
  }
  int optin = 0;
  cudaError_t err =
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  if (optin < kDefaultSharedBytes) optin = kDefaultSharedBytes;  // pre-Volta: no opt-in
  cudaFuncAttributes attr;
  err = cudaFuncGetAttributes(&attr, group_novelty_kernel<float, false>);  // same for all T
  if (err != cudaSuccess) return err;
  *bytes = optin - static_cast<int>(attr.sharedSizeBytes);
  if (device >= 0 && device < kMaxDevices) cache[device].store(*bytes, std::memory_order_relaxed);
  return cudaSuccess;
}

// Let `kernel` use up to `bytes` of dynamic shared memory on `device` (once per device).
template <typename Kernel>
cudaError_t allow_optin_shared(Kernel kernel, int device, int bytes) {
  static std::atomic<bool> done[kMaxDevices];
  const bool cacheable = device >= 0 && device < kMaxDevices;
  if (cacheable && done[device].load(std::memory_order_relaxed)) return cudaSuccess;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess && cacheable) done[device].store(true, std::memory_order_relaxed);
  return err;
}

struct Args {
  const void* feats;
  int64_t B, G, d, sB, sG, sd;
  const float* rew;
  int64_t rB, rG;
  float *cos, *nu, *shaped, *adv, *work;
  int* non_finite;
  ShapeOptions opts;
};

template <typename T>
cudaError_t launch(const Args& a, int device, cudaStream_t stream, const char** err_msg) {
  const T* f = static_cast<const T*>(a.feats);
  const dim3 grid(static_cast<unsigned>(a.B));
  if (a.work != nullptr) {
    group_novelty_kernel<T, true><<<grid, kThreads, 0, stream>>>(
        f, a.G, a.d, a.sB, a.sG, a.sd, a.rew, a.rB, a.rG, a.cos, a.nu, a.shaped, a.adv, a.work,
        a.non_finite, a.opts);
    return cudaGetLastError();
  }
  int max_smem = 0;
  cudaError_t err = max_dynamic_shared_bytes(device, &max_smem);
  if (err != cudaSuccess) return err;
  const size_t smem = static_cast<size_t>(work_floats(a.G)) * sizeof(float);
  if (smem > static_cast<size_t>(max_smem)) {
    *err_msg = "the group's work arrays do not fit in shared memory on this device: pass a "
               "scratch buffer of B * (5 G + 1) floats (see max_shared_group_size)";
    return cudaErrorInvalidValue;
  }
  if (smem > static_cast<size_t>(kDefaultSharedBytes)) {
    err = allow_optin_shared(group_novelty_kernel<T, false>, device, max_smem);
    if (err != cudaSuccess) return err;
  }
  group_novelty_kernel<T, false><<<grid, kThreads, smem, stream>>>(
      f, a.G, a.d, a.sB, a.sG, a.sd, a.rew, a.rB, a.rG, a.cos, a.nu, a.shaped, a.adv, nullptr,
      a.non_finite, a.opts);
  return cudaGetLastError();
}

// Makes `device` current for the scope and restores the caller's device on exit (torch and this
// statically linked runtime share the driver's current context: leaving it switched would move
// the caller's next allocation to another GPU). Clears a stale error of an earlier call first,
// so that cudaGetLastError after a launch reports this call's error only.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    (void)cudaGetLastError();
    if (cudaGetDevice(&prev_) != cudaSuccess) prev_ = -1;
    err_ = (prev_ == device) ? cudaSuccess : cudaSetDevice(device);
  }
  ~DeviceScope() {
    if (prev_ >= 0) cudaSetDevice(prev_);
    (void)cudaGetLastError();  // a failed call must not poison the next (non-sticky errors)
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;
  cudaError_t error() const { return err_; }

 private:
  int prev_ = -1;
  cudaError_t err_ = cudaSuccess;
};

}  // namespace
}  // namespace g2rl

// Largest G whose work arrays fit in shared memory on `device` (larger groups need scratch);
// returns 0 on success, else a cudaError_t code with err_msg set.
int g2rl_max_shared_group_size(int device, int64_t* G, const char** err_msg) {
  int bytes = 0;
  g2rl::DeviceScope scope(device);
  cudaError_t err = scope.error();
  if (err == cudaSuccess) err = g2rl::max_dynamic_shared_bytes(device, &bytes);
  if (err != cudaSuccess) {
    *err_msg = cudaGetErrorString(err);
    return static_cast<int>(err);
  }
  *G = (static_cast<int64_t>(bytes) / static_cast<int64_t>(sizeof(float)) - 1) / 5;
  return 0;
}

// Loads the kernel on `device` (as the first launch would): fails when the driver is too old
// for this runtime or the build has no image for the GPU. 0 on success, else a cudaError_t code.
int g2rl_cuda_probe(int device, const char** err_msg) {
  *err_msg = nullptr;
  g2rl::DeviceScope scope(device);
  cudaError_t err = scope.error();
  if (err == cudaSuccess) {
    cudaFuncAttributes attr;
    err = cudaFuncGetAttributes(&attr, g2rl::group_novelty_kernel<float, false>);
  }
  if (err != cudaSuccess) *err_msg = cudaGetErrorString(err);
  return static_cast<int>(err);
}

// CUDA runtime the extension was compiled against (statically linked), e.g. 12080 for 12.8.
int g2rl_cuda_runtime_version() { return CUDART_VERSION; }

// Newest CUDA version the installed driver supports (e.g. 12020), 0 when there is no driver.
int g2rl_cuda_driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) return 0;
  return v;
}

// Returns 0 on success, else a cudaError_t code (-1: bad argument); err_msg receives a message.
// work_ptr: 0 to keep the work arrays in shared memory (G <= max shared group size), else
// B * (5 G + 1) floats of global scratch. non_finite_ptr: one int32 on the device, set to the
// number of NaN/inf values in the features and rewards.
int g2rl_group_novelty_cuda(int device, uintptr_t stream, uintptr_t feat_ptr, int dtype,
                            int64_t B, int64_t G, int64_t d, int64_t sB, int64_t sG, int64_t sd,
                            uintptr_t rew_ptr, int64_t rB, int64_t rG, uintptr_t cos_ptr,
                            uintptr_t nu_ptr, uintptr_t shaped_ptr, uintptr_t adv_ptr,
                            uintptr_t work_ptr, uintptr_t non_finite_ptr, float lam, float clip,
                            int mode, float eps, bool scale, float span_floor, float std_floor,
                            bool zero_uniform, const char** err_msg) {
  using namespace g2rl;
  *err_msg = nullptr;
  if (dtype != kFloat32 && dtype != kBFloat16 && dtype != kFloat16) {
    *err_msg = "unknown feature dtype code";
    return -1;
  }
  if (B > 0x7fffffff) {
    *err_msg = "more than 2^31 - 1 groups in one call";
    return -1;
  }
  if (non_finite_ptr == 0) {
    *err_msg = "non_finite_ptr must point to one int32 on the device";
    return -1;
  }
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  int* non_finite = reinterpret_cast<int*>(non_finite_ptr);
  DeviceScope scope(device);
  cudaError_t err = scope.error();
  if (err == cudaSuccess) err = cudaMemsetAsync(non_finite, 0, sizeof(int), st);
  if (err == cudaSuccess && B > 0 && G > 0) {
    const Args a{reinterpret_cast<const void*>(feat_ptr), B, G, d, sB, sG, sd,
                 reinterpret_cast<const float*>(rew_ptr), rB, rG,
                 reinterpret_cast<float*>(cos_ptr), reinterpret_cast<float*>(nu_ptr),
                 reinterpret_cast<float*>(shaped_ptr), reinterpret_cast<float*>(adv_ptr),
                 reinterpret_cast<float*>(work_ptr), non_finite,
                 ShapeOptions{lam, clip, mode, eps, scale, span_floor, std_floor, zero_uniform}};
    switch (dtype) {
      case kFloat32:
        err = launch<float>(a, device, st, err_msg);
        break;
      case kBFloat16:
        err = launch<__nv_bfloat16>(a, device, st, err_msg);
        break;
      default:
        err = launch<__half>(a, device, st, err_msg);
        break;
    }
  }
  if (err != cudaSuccess && *err_msg == nullptr) *err_msg = cudaGetErrorString(err);
  return static_cast<int>(err);
}
