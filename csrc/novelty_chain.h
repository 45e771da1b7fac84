// Scalar steps of the G2RL group novelty chain (G2RL_METHOD.md sections 2-4), shared by the
// C++ (CPU) and CUDA implementations so that both compute exactly the same formulas.
//
// All arrays are float32 and hold one group of G responses.
#pragma once

#include <math.h>
#include <stdint.h>

#ifdef __CUDACC__
#define G2RL_HD __host__ __device__ __forceinline__
#else
#define G2RL_HD inline
#endif

namespace g2rl {

enum FeatureDtype : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
enum ShapingMode : int { kCentered = 0, kEq12 = 1 };

// Largest reward of the group: the shift that keeps exp(r) finite.
G2RL_HD float group_max(const float* r, int64_t G) {
  float m = r[0];
  for (int64_t k = 1; k < G; ++k) m = r[k] > m ? r[k] : m;
  return m;
}

// eq. 11 for response i, given exp(r - m) in e, eps * exp(-m) in eps_shifted and the cosine
// row S[i, :]:  nu_i = max(1 - sum_{j != i} w_ij S_ij^2, 0),
// w_ij = exp(r_j) / (sum_{k != i} exp(r_k) + eps)   (numerator and denominator scaled by exp(-m)).
G2RL_HD float novelty_of(int64_t i, int64_t G, const float* e, float eps_shifted,
                         const float* cos_row) {
  float den = eps_shifted;
  float num = 0.f;
  for (int64_t j = 0; j < G; ++j) {
    if (j == i) continue;
    den += e[j];
    num += e[j] * cos_row[j] * cos_row[j];
  }
  if (den <= 0.f) return 1.f;  // a group of one (and eps = 0): no peers, fully novel
  float nu = 1.f - num / den;
  return nu > 0.f ? nu : 0.f;
}

// Min-max normalisation of nu, shaping (eqs. 12-13), clipping and the group standardisation of
// section 4. Reads r and nu, writes shaped and adv.
G2RL_HD void shape_and_standardise(int64_t G, const float* r, const float* nu, float* shaped,
                                   float* adv, float lam, float clip, int mode, float eps,
                                   bool scale) {
  float lo = nu[0], hi = nu[0];
  for (int64_t k = 1; k < G; ++k) {
    lo = nu[k] < lo ? nu[k] : lo;
    hi = nu[k] > hi ? nu[k] : hi;
  }
  const float spread = hi - lo;
  const bool flat = spread < 1e-6f;
  for (int64_t k = 0; k < G; ++k) {
    const float nubar = flat ? 0.5f : (nu[k] - lo) / spread;
    const float f = mode == kCentered ? 1.f + lam * (2.f * nubar - 1.f) : 1.f + lam * r[k] * nubar;
    float s = r[k] * f;
    s = s > clip ? clip : (s < -clip ? -clip : s);
    shaped[k] = s;
  }
  if (G == 1) {
    adv[0] = 0.f;
    return;
  }
  // Mean shifted by the first value: equal shaped rewards give deviations of exactly 0 (an
  // unshifted float32 mean can be off by an ulp, which the division by std + eps would blow up).
  float dev = 0.f;
  for (int64_t k = 1; k < G; ++k) dev += shaped[k] - shaped[0];
  const float mean = shaped[0] + dev / (float)G;
  float ss = 0.f;
  for (int64_t k = 0; k < G; ++k) {
    const float c = shaped[k] - mean;
    ss += c * c;
  }
  const float inv = scale ? 1.f / (sqrtf(ss / (float)(G - 1)) + eps) : 1.f;
  for (int64_t k = 0; k < G; ++k) adv[k] = (shaped[k] - mean) * inv;
}

// eps * exp(-m) without overflow for very negative m.
G2RL_HD float shifted_eps(float eps, float m) {
  return eps > 0.f ? expf(logf(eps) - m) : 0.f;
}

}  // namespace g2rl
