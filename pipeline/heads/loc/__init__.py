"""The localisation head: a small network on the backbone's spatial maps, its candidates and re-scorer, and the head
family that trains, reports and applies it (family.py)."""
