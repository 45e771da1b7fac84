"""g2rl_kernels: fused kernels for Gradient-Guided RL (G2RL).

Public API:

- :func:`sensitivity` / :func:`sequence_features`: token log-probs, entropies and G2RL sequence
  features straight from hidden states and the LM-head weight (Triton on CUDA, chunked PyTorch on
  the CPU), never materialising the N x V logits.
- :func:`group_novelty`: batched group Gram matrices, novelty scores, shaped rewards and
  advantages in one call (compiled C++/CUDA extension).

:mod:`g2rl_kernels.reference` holds plain PyTorch references of both, used as test oracles.
"""

from g2rl_kernels import reference  # the oracles, plain PyTorch
from g2rl_kernels.novelty import NoveltyOutput, cuda_available, cuda_backend, group_novelty
from g2rl_kernels.sensitivity import SensitivityOutput, sensitivity, sequence_features

__all__ = [
    "NoveltyOutput",
    "SensitivityOutput",
    "cuda_available",
    "cuda_backend",
    "group_novelty",
    "reference",
    "sensitivity",
    "sequence_features",
]
__version__ = "0.1.0"
