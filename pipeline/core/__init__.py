"""The core every head family builds on: task kinds and specs, metrics, evaluation protocols and their splits, the
summariser and its baselines, the stacked trainer with its loss weightings and progress, plots. It imports nothing
above the data layer (tests/test_layers.py)."""
