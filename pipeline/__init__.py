"""Res-MTNet pipeline: frozen-backbone features for chest X-rays, cached once, and light multi-task heads."""

__version__ = "0.1.0"
