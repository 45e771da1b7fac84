// pybind11 module g2rl_kernels._C_cuda: binds the CUDA launcher of group_novelty_cuda.cu.
// Built only when a CUDA compiler is found; needs no CUDA or torch headers itself.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace py = pybind11;

int g2rl_group_novelty_cuda(int device, uintptr_t stream, uintptr_t feat_ptr, int dtype,
                            int64_t B, int64_t G, int64_t d, int64_t sB, int64_t sG, int64_t sd,
                            uintptr_t rew_ptr, int64_t rB, int64_t rG, uintptr_t cos_ptr,
                            uintptr_t nu_ptr, uintptr_t shaped_ptr, uintptr_t adv_ptr, float lam,
                            float clip, int mode, float eps, bool scale, float span_floor,
                            float std_floor, bool zero_uniform, const char** err_msg);

namespace {

void group_novelty_cuda(int device, uintptr_t stream, uintptr_t feat_ptr, int dtype, int64_t B,
                        int64_t G, int64_t d, int64_t sB, int64_t sG, int64_t sd,
                        uintptr_t rew_ptr, int64_t rB, int64_t rG, uintptr_t cos_ptr,
                        uintptr_t nu_ptr, uintptr_t shaped_ptr, uintptr_t adv_ptr, double lam,
                        double clip, int mode, double eps, bool scale, double span_floor,
                        double std_floor, bool zero_uniform) {
  const char* msg = nullptr;
  const int err = g2rl_group_novelty_cuda(
      device, stream, feat_ptr, dtype, B, G, d, sB, sG, sd, rew_ptr, rB, rG, cos_ptr, nu_ptr,
      shaped_ptr, adv_ptr, static_cast<float>(lam), static_cast<float>(clip), mode,
      static_cast<float>(eps), scale, static_cast<float>(span_floor),
      static_cast<float>(std_floor), zero_uniform, &msg);
  if (err != 0) {
    throw std::runtime_error(std::string("g2rl group_novelty CUDA launch failed: ") +
                             (msg ? msg : "unknown error"));
  }
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "g2rl_kernels CUDA extension: batched G2RL group novelty, one launch for all groups";
  m.def("group_novelty", &group_novelty_cuda,
        "group_novelty(device, stream, feat_ptr, dtype, B, G, d, sB, sG, sd, rew_ptr, rB, rG, "
        "cos_ptr, nu_ptr, shaped_ptr, adv_ptr, lam, clip, mode, eps, scale, span_floor, std_floor, "
        "zero_uniform)");
  // 5 G floats of dynamic shared memory per block; 8192 fits every sm_80+ GPU (160 KiB).
  m.attr("max_group_size") = 8192;
}
