"""Heads: task kinds, the stacked trainer and its loss weightings, the Res-MTNet head, the head-family plugin
contract (plugin.py) and its built-in localisation family, and the trained-head artefact."""
