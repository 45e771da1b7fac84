// CUDA implementation of the batched group novelty chain: ONE launch for all groups, one block
// per group (normalise, Gram, novelty, shaping, standardisation), accumulating in float32.
// Plain CUDA C++ with no torch headers: compiled by nvcc on its own and called from the
// pybind11 module in group_novelty_cuda_bind.cpp with raw pointers and the caller's stream.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "novelty_chain.h"

namespace g2rl {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

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

// Shared memory (dynamic): norm+eps (G), rewards (G), exp(r - m) (G), novelty (G),
// shaped (G): 5 G floats.
template <typename T>
__global__ void __launch_bounds__(kThreads)
group_novelty_kernel(const T* __restrict__ feats, int64_t G, int64_t d, int64_t sB, int64_t sG,
                     int64_t sd, const float* __restrict__ rew, int64_t rB, int64_t rG,
                     float* __restrict__ cosine, float* __restrict__ nu_out,
                     float* __restrict__ shaped_out, float* __restrict__ adv_out,
                     ShapeOptions opts) {
  extern __shared__ float smem[];
  float* norm = smem;
  float* r = norm + G;
  float* e = r + G;
  float* nu = e + G;
  float* shaped = nu + G;

  const int64_t b = blockIdx.x;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const T* base = feats + b * sB;
  float* S = cosine + b * G * G;

  // 1. norms, one warp per response
  for (int64_t i = warp; i < G; i += kWarps) {
    const float ss = row_dot(base + i * sG, base + i * sG, d, sd, lane);
    if (lane == 0) norm[i] = sqrtf(ss) + opts.eps;
  }
  for (int64_t i = threadIdx.x; i < G; i += kThreads) r[i] = rew[b * rB + i * rG];
  __syncthreads();

  // 2. Gram of the normalised directions, one warp per pair i <= j
  const int64_t pairs = G * (G + 1) / 2;
  for (int64_t p = warp; p < pairs; p += kWarps) {
    // invert p = i * G - i (i - 1) / 2 + (j - i)
    int64_t i = 0, rem = p;
    while (rem >= G - i) {
      rem -= G - i;
      ++i;
    }
    const int64_t j = i + rem;
    const float s = row_dot(base + i * sG, base + j * sG, d, sd, lane) / (norm[i] * norm[j]);
    if (lane == 0) {
      S[i * G + j] = s;
      S[j * G + i] = s;
    }
  }
  __shared__ float shift;  // max reward of the group
  if (threadIdx.x == 0) shift = group_max(r, G);
  __syncthreads();  // the block's global writes of S are visible after this barrier
  const float m = shift;
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

template <typename T>
cudaError_t launch(const void* feats, int64_t B, int64_t G, int64_t d, int64_t sB, int64_t sG,
                   int64_t sd, const float* rew, int64_t rB, int64_t rG, float* cosine, float* nu,
                   float* shaped, float* adv, const ShapeOptions& opts, cudaStream_t stream) {
  const size_t smem = 5 * static_cast<size_t>(G) * sizeof(float);
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(group_novelty_kernel<T>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  group_novelty_kernel<T><<<static_cast<unsigned>(B), kThreads, smem, stream>>>(
      static_cast<const T*>(feats), G, d, sB, sG, sd, rew, rB, rG, cosine, nu, shaped, adv, opts);
  return cudaGetLastError();
}

}  // namespace
}  // namespace g2rl

// Returns 0 on success, else a cudaError_t code; err_msg receives cudaGetErrorString.
int g2rl_group_novelty_cuda(int device, uintptr_t stream, uintptr_t feat_ptr, int dtype,
                            int64_t B, int64_t G, int64_t d, int64_t sB, int64_t sG, int64_t sd,
                            uintptr_t rew_ptr, int64_t rB, int64_t rG, uintptr_t cos_ptr,
                            uintptr_t nu_ptr, uintptr_t shaped_ptr, uintptr_t adv_ptr, float lam,
                            float clip, int mode, float eps, bool scale, float span_floor,
                            float std_floor, bool zero_uniform, const char** err_msg) {
  using namespace g2rl;
  *err_msg = nullptr;
  if (B <= 0 || G <= 0) return 0;
  cudaError_t err = cudaSetDevice(device);
  if (err == cudaSuccess) {
    const void* f = reinterpret_cast<const void*>(feat_ptr);
    const float* r = reinterpret_cast<const float*>(rew_ptr);
    float* c = reinterpret_cast<float*>(cos_ptr);
    float* n = reinterpret_cast<float*>(nu_ptr);
    float* s = reinterpret_cast<float*>(shaped_ptr);
    float* a = reinterpret_cast<float*>(adv_ptr);
    cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
    const ShapeOptions o{lam, clip, mode, eps, scale, span_floor, std_floor, zero_uniform};
    switch (dtype) {
      case kFloat32:
        err = launch<float>(f, B, G, d, sB, sG, sd, r, rB, rG, c, n, s, a, o, st);
        break;
      case kBFloat16:
        err = launch<__nv_bfloat16>(f, B, G, d, sB, sG, sd, r, rB, rG, c, n, s, a, o, st);
        break;
      case kFloat16:
        err = launch<__half>(f, B, G, d, sB, sG, sd, r, rB, rG, c, n, s, a, o, st);
        break;
      default:
        *err_msg = "unknown feature dtype code";
        return -1;
    }
  }
  if (err != cudaSuccess) *err_msg = cudaGetErrorString(err);
  return static_cast<int>(err);
}
