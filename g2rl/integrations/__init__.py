"""Integrations of the G2RL advantages into other trainers.

- :mod:`g2rl.integrations.trl`: ``G2RLGRPOTrainer``, a subclass of TRL's ``GRPOTrainer``
  (``pip install "g2rl[trl]"``).
"""
