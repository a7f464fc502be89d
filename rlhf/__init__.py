"""Offline RLHF: reward model from comparisons, PPO with KL to the reference, new model version.

``python -m rlhf.job`` runs it on Ray Train; ``python -m rlhf.labelers`` produces simulated
comparisons through the real gateway. See docs/model.md, "RLHF".
"""
