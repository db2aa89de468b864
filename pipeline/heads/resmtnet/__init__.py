"""The paper's Res-MTNet head: the network and its stacked training (model.py), how typical an image's features are
(typicality.py), and the head family that trains, reports and applies it (family.py)."""

#: This family's name (its model's name in reports) and its answer's name, the prefix of its predict columns.
NAME, ANSWER = "res-mtnet", "pooled"
PREFIX = f"{ANSWER}_"
