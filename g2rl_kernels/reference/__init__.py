"""Plain PyTorch reference implementations (test oracles), in any float dtype."""

from g2rl_kernels.reference.novelty import group_novelty
from g2rl_kernels.reference.sensitivity import sensitivity, sequence_features

__all__ = ["group_novelty", "sensitivity", "sequence_features"]
