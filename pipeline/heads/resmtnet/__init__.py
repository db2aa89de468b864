"""The paper's Res-MTNet head: the network and its stacked training (model.py), how typical an image's features are
(typicality.py), and the head family that trains, reports and applies it (family.py)."""
