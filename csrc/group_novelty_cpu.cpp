// C++ (CPU) implementation of the batched group novelty chain, parallel over groups (OpenMP),
// and the pybind11 module g2rl_kernels._C. Compiled against pybind11 only (no torch headers):
// Python passes data pointers, shapes, strides (in elements) and a dtype code.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "novelty_chain.h"

namespace py = pybind11;

namespace g2rl {
namespace {

inline float bf16_to_float(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline float fp16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (mant << 13);  // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);  // normal: rebias 15 -> 127
  } else if (mant == 0) {
    bits = sign;  // signed zero
  } else {
    // subnormal: normalise the mantissa
    int e = -1;
    do {
      mant <<= 1;
      ++e;
    } while ((mant & 0x400u) == 0);
    bits = sign | (static_cast<uint32_t>(112 - e) << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Copy one group's (G, d) features into a contiguous float32 buffer.
void load_group(const void* base, int dtype, int64_t G, int64_t d, int64_t sG, int64_t sd,
                   float* out) {
  for (int64_t i = 0; i < G; ++i) {
    float* row = out + i * d;
    if (dtype == kFloat32) {
      const float* p = static_cast<const float*>(base) + i * sG;
      if (sd == 1) {
        std::memcpy(row, p, sizeof(float) * d);
      } else {
        for (int64_t k = 0; k < d; ++k) row[k] = p[k * sd];
      }
    } else {
      const uint16_t* p = static_cast<const uint16_t*>(base) + i * sG;
      if (dtype == kBFloat16) {
        for (int64_t k = 0; k < d; ++k) row[k] = bf16_to_float(p[k * sd]);
      } else {
        for (int64_t k = 0; k < d; ++k) row[k] = fp16_to_float(p[k * sd]);
      }
    }
  }
}

// Number of NaN or inf values in a row of d floats.
int64_t count_non_finite(const float* row, int64_t d) {
  int64_t bad = 0;
  for (int64_t k = 0; k < d; ++k) bad += std::isfinite(row[k]) ? 0 : 1;
  return bad;
}

// Compiled for AVX-512, AVX2 and baseline x86-64, picked when the module loads.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define G2RL_TARGETS __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define G2RL_TARGETS
#endif

// Dot product with 32 independent float32 accumulators (vectorisable without -ffast-math),
// folded pairwise at the end so that the fold vectorises too.
inline float dot(const float* a, const float* b, int64_t d) {
  constexpr int L = 32;
  float acc[L] = {0.f};
  int64_t k = 0;
  for (; k + L <= d; k += L) {
    for (int l = 0; l < L; ++l) acc[l] += a[k + l] * b[k + l];
  }
  for (int64_t l = 0; k < d; ++k, ++l) acc[l] += a[k] * b[k];
  for (int w = L / 2; w > 0; w /= 2) {
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  }
  return acc[0];
}

// Four dot products <a, b_c>, c < 4, sharing the loads of a: 4 x 16 accumulators.
inline void dot4(const float* a, const float* b0, const float* b1, const float* b2,
                 const float* b3, int64_t d, float* out) {
  constexpr int L = 16;
  float c0[L] = {0.f}, c1[L] = {0.f}, c2[L] = {0.f}, c3[L] = {0.f};
  int64_t k = 0;
  for (; k + L <= d; k += L) {
    for (int l = 0; l < L; ++l) {
      const float x = a[k + l];
      c0[l] += x * b0[k + l];
      c1[l] += x * b1[k + l];
      c2[l] += x * b2[k + l];
      c3[l] += x * b3[k + l];
    }
  }
  for (int64_t l = 0; k < d; ++k, ++l) {
    const float x = a[k];
    c0[l] += x * b0[k];
    c1[l] += x * b1[k];
    c2[l] += x * b2[k];
    c3[l] += x * b3[k];
  }
  for (int w = L / 2; w > 0; w /= 2) {
    for (int l = 0; l < w; ++l) {
      c0[l] += c0[l + w];
      c1[l] += c1[l + w];
      c2[l] += c2[l + w];
      c3[l] += c3[l + w];
    }
  }
  out[0] = c0[0];
  out[1] = c1[0];
  out[2] = c2[0];
  out[3] = c3[0];
}

// Upper triangle (j >= i) of the raw Gram X X^T of one group's rows.
G2RL_TARGETS
void gram_upper_dots(const float* const* rows, int64_t G, int64_t d, float* S) {
  for (int64_t i = 0; i < G; ++i) {
    int64_t j = i;
    for (; j + 4 <= G; j += 4) {
      dot4(rows[i], rows[j], rows[j + 1], rows[j + 2], rows[j + 3], d, S + i * G + j);
    }
    for (; j < G; ++j) S[i * G + j] = dot(rows[i], rows[j], d);
  }
}

// Norms (+ eps) and the cosine matrix S (G, G) of one group's rows; returns how many feature
// values are NaN or inf.
int64_t cosine_group(const float* const* rows, int64_t G, int64_t d, float eps, float* norm,
                     float* S) {
  gram_upper_dots(rows, G, d, S);
  int64_t non_finite = 0;
  for (int64_t i = 0; i < G; ++i) {
    const float ss = S[i * G + i];
    // A NaN or inf in the row makes its sum of squares non-finite: only then look closer.
    if (!std::isfinite(ss)) non_finite += count_non_finite(rows[i], d);
    norm[i] = sqrtf(ss) + eps;
  }
  for (int64_t i = 0; i < G; ++i) {
    for (int64_t j = i; j < G; ++j) {
      const float c = S[i * G + j] / (norm[i] * norm[j]);
      S[i * G + j] = c;
      S[j * G + i] = c;
    }
  }
  return non_finite;
}

// Returns the number of non-finite values found in features and rewards (then the outputs are
// meaningless and the caller raises).
int64_t group_novelty_cpu(uintptr_t feat_ptr, int dtype, int64_t B, int64_t G, int64_t d,
                       int64_t sB, int64_t sG, int64_t sd, uintptr_t rew_ptr, int64_t rB,
                       int64_t rG, uintptr_t cos_ptr, uintptr_t nu_ptr, uintptr_t shaped_ptr,
                       uintptr_t adv_ptr, double lam, double clip, int mode, double eps,
                       bool scale, double span_floor, double std_floor, bool zero_uniform) {
  if (dtype != kFloat32 && dtype != kBFloat16 && dtype != kFloat16)
    throw std::invalid_argument("group_novelty_cpu: unknown feature dtype code");
  if (B <= 0 || G <= 0) return 0;
  const size_t elt = dtype == kFloat32 ? 4 : 2;
  const char* feats = reinterpret_cast<const char*>(feat_ptr);
  const float* rew = reinterpret_cast<const float*>(rew_ptr);
  float* cosine = reinterpret_cast<float*>(cos_ptr);
  float* nu = reinterpret_cast<float*>(nu_ptr);
  float* shaped = reinterpret_cast<float*>(shaped_ptr);
  float* adv = reinterpret_cast<float*>(adv_ptr);
  const float feps = static_cast<float>(eps);
  const ShapeOptions opts{static_cast<float>(lam),        static_cast<float>(clip), mode,
                          feps,                           scale,
                          static_cast<float>(span_floor), static_cast<float>(std_floor),
                          zero_uniform};

  int64_t non_finite = 0;
  py::gil_scoped_release release;
#pragma omp parallel reduction(+ : non_finite)
  {
    std::vector<float> buf(static_cast<size_t>(G * d));
    std::vector<const float*> rows(G);
    std::vector<float> norm(G), r(G), e(G);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      const char* group = feats + static_cast<size_t>(b * sB) * elt;
      if (dtype == kFloat32 && sd == 1) {  // read the rows in place
        for (int64_t i = 0; i < G; ++i) rows[i] = reinterpret_cast<const float*>(group) + i * sG;
      } else {
        load_group(group, dtype, G, d, sG, sd, buf.data());
        for (int64_t i = 0; i < G; ++i) rows[i] = buf.data() + i * d;
      }
      non_finite += cosine_group(rows.data(), G, d, feps, norm.data(), cosine + b * G * G);
      for (int64_t i = 0; i < G; ++i) {
        r[i] = rew[b * rB + i * rG];
        non_finite += std::isfinite(r[i]) ? 0 : 1;
      }
      const float* S = cosine + b * G * G;
      const float m = group_max(r.data(), G);
      for (int64_t k = 0; k < G; ++k) e[k] = expf(r[k] - m);
      const float eps_m = shifted_eps(feps, m);
      float* nu_b = nu + b * G;
      for (int64_t i = 0; i < G; ++i) nu_b[i] = novelty_of(i, G, e.data(), eps_m, S + i * G);
      shape_and_standardise(G, r.data(), nu_b, shaped + b * G, adv + b * G, opts);
    }
  }
  return non_finite;
}

int num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace
}  // namespace g2rl

PYBIND11_MODULE(_C, m) {
  m.doc() = "g2rl_kernels CPU extension: batched G2RL group novelty (C++, OpenMP)";
  m.def("group_novelty", &g2rl::group_novelty_cpu,
        "group_novelty(feat_ptr, dtype, B, G, d, sB, sG, sd, rew_ptr, rB, rG, cos_ptr, nu_ptr, "
        "shaped_ptr, adv_ptr, lam, clip, mode, eps, scale, span_floor, std_floor, zero_uniform) -> "
        "number of non-finite inputs. Outputs "
        "are contiguous float32 (B, G, G), (B, G), (B, G), (B, G); strides are in elements.");
  m.def("num_threads", &g2rl::num_threads, "OpenMP threads the extension uses");
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
