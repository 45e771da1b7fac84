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
                            uintptr_t nu_ptr, uintptr_t shaped_ptr, uintptr_t adv_ptr,
                            uintptr_t work_ptr, uintptr_t non_finite_ptr, float lam, float clip,
                            int mode, float eps, bool scale, float span_floor, float std_floor,
                            bool zero_uniform, const char** err_msg);
int g2rl_max_shared_group_size(int device, int64_t* G, const char** err_msg);
int g2rl_cuda_probe(int device, const char** err_msg);
int g2rl_cuda_runtime_version();
int g2rl_cuda_driver_version();

namespace {

void group_novelty_cuda(int device, uintptr_t stream, uintptr_t feat_ptr, int dtype, int64_t B,
                        int64_t G, int64_t d, int64_t sB, int64_t sG, int64_t sd,
                        uintptr_t rew_ptr, int64_t rB, int64_t rG, uintptr_t cos_ptr,
                        uintptr_t nu_ptr, uintptr_t shaped_ptr, uintptr_t adv_ptr,
                        uintptr_t work_ptr, uintptr_t non_finite_ptr, double lam, double clip,
                        int mode, double eps, bool scale, double span_floor, double std_floor,
                        bool zero_uniform) {
  const char* msg = nullptr;
  const int err = g2rl_group_novelty_cuda(
      device, stream, feat_ptr, dtype, B, G, d, sB, sG, sd, rew_ptr, rB, rG, cos_ptr, nu_ptr,
      shaped_ptr, adv_ptr, work_ptr, non_finite_ptr, static_cast<float>(lam),
      static_cast<float>(clip), mode, static_cast<float>(eps), scale,
      static_cast<float>(span_floor), static_cast<float>(std_floor), zero_uniform, &msg);
  if (err != 0) {
    throw std::runtime_error(std::string("g2rl group_novelty CUDA launch failed: ") +
                             (msg ? msg : "unknown error"));
  }
}

int64_t max_shared_group_size(int device) {
  const char* msg = nullptr;
  int64_t G = 0;
  if (g2rl_max_shared_group_size(device, &G, &msg) != 0) {
    throw std::runtime_error(std::string("g2rl: cannot query shared memory of CUDA device ") +
                             std::to_string(device) + ": " + (msg ? msg : "unknown error"));
  }
  return G;
}

std::string probe(int device) {
  const char* msg = nullptr;
  const int err = g2rl_cuda_probe(device, &msg);
  if (err == 0) return std::string();
  return std::string(msg ? msg : "unknown error") + " (cudaError " + std::to_string(err) + ")";
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "g2rl_kernels CUDA extension: batched G2RL group novelty, one launch for all groups";
  m.def("group_novelty", &group_novelty_cuda,
        "group_novelty(device, stream, feat_ptr, dtype, B, G, d, sB, sG, sd, rew_ptr, rB, rG, "
        "cos_ptr, nu_ptr, shaped_ptr, adv_ptr, work_ptr, non_finite_ptr, lam, clip, mode, eps, "
        "scale, span_floor, std_floor, zero_uniform). work_ptr: 0 (work arrays in shared memory, "
        "G <= max_shared_group_size(device)) or B * (5 G + 1) float32 of scratch; "
        "non_finite_ptr: one int32 that receives the number of NaN/inf inputs.");
  m.def("max_shared_group_size", &max_shared_group_size, py::arg("device"),
        "Largest G whose per-group work arrays (5 G + 1 floats) fit in the device's opt-in "
        "shared memory per block; larger groups run with a global scratch buffer.");
  m.def("probe", &probe, py::arg("device"),
        "Load the kernel on the device as a launch would: '' when it works, else the CUDA error "
        "(driver too old for the runtime, no image for the GPU, ...).");
  m.def("runtime_version", &g2rl_cuda_runtime_version,
        "CUDA runtime version the extension was built with and links statically (CUDART_VERSION, "
        "1000 * major + 10 * minor)");
  m.def("driver_version", &g2rl_cuda_driver_version,
        "Newest CUDA version the installed driver supports (cudaDriverGetVersion), 0 without a "
        "driver");
  // Groups that do not fit in shared memory run with global scratch, so the kernel itself
  // limits G only through int64 indexing; memory (the B G^2 cosines) is the real bound.
  m.attr("max_group_size") = py::int_(INT64_C(2147483647));
}
