"""Evaluation: protocols and splits, metrics, baselines, the one summariser, and the stage-two engine
(cross-validation, refit, which head answers)."""
