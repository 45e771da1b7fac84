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

// Options of the shaping and standardisation steps (G2RL_METHOD.md sections 3-4).
struct ShapeOptions {
  float lam;         // shaping strength lambda
  float clip;        // shaped rewards clipped to [-clip, clip] (inf: no clip)
  int mode;          // kCentered or kEq12
  float eps;         // std + eps
  bool scale;        // divide by the (floored) group std
  float span_floor;  // delta: nubar = clamp(0.5 + (nu - mid) / max(hi - lo, delta), 0, 1)
  float std_floor;   // A = (r~ - mean) / max(std + eps, std_floor)
  bool zero_uniform; // advantage 0 for a group whose base rewards are all equal
};

// nubar of section 3: min-max with a floor on the spread, continuous in nu.
G2RL_HD float normalised_novelty(float nu, float lo, float hi, float span_floor) {
  const float spread = hi - lo;
  const float den = spread > span_floor ? spread : span_floor;
  if (!(den > 0.f)) return 0.5f;  // all scores equal and no floor
  const float v = 0.5f + (nu - 0.5f * (lo + hi)) / den;
  return v < 0.f ? 0.f : (v > 1.f ? 1.f : v);
}

// Normalisation of nu, shaping (eqs. 12-13), clipping and the group standardisation of
// section 4. Reads r and nu, writes shaped and adv.
G2RL_HD void shape_and_standardise(int64_t G, const float* r, const float* nu, float* shaped,
                                   float* adv, const ShapeOptions& o) {
  float lo = nu[0], hi = nu[0];
  bool uniform = true;
  for (int64_t k = 1; k < G; ++k) {
    lo = nu[k] < lo ? nu[k] : lo;
    hi = nu[k] > hi ? nu[k] : hi;
    uniform = uniform && r[k] == r[0];
  }
  for (int64_t k = 0; k < G; ++k) {
    const float nubar = normalised_novelty(nu[k], lo, hi, o.span_floor);
    const float f = o.mode == kCentered ? 1.f + o.lam * (2.f * nubar - 1.f)
                                        : 1.f + o.lam * r[k] * nubar;
    float s = r[k] * f;
    s = s > o.clip ? o.clip : (s < -o.clip ? -o.clip : s);
    shaped[k] = s;
  }
  if (G == 1 || (o.zero_uniform && uniform)) {
    for (int64_t k = 0; k < G; ++k) adv[k] = 0.f;
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
  float inv = 1.f;
  if (o.scale) {
    float den = sqrtf(ss / (float)(G - 1)) + o.eps;
    den = den > o.std_floor ? den : o.std_floor;
    inv = den > 0.f ? 1.f / den : 0.f;  // den = 0 only when every deviation is 0
  }
  for (int64_t k = 0; k < G; ++k) adv[k] = (shaped[k] - mean) * inv;
}

// eps * exp(-m) without overflow for very negative m.
G2RL_HD float shifted_eps(float eps, float m) {
  return eps > 0.f ? expf(logf(eps) - m) : 0.f;
}

}  // namespace g2rl
