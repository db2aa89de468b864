"""Data: the layouts' registry and the normalised image table (JSRT, a manifest, NIH ChestX-ray14, CheXpert,
MIMIC-CXR, VinDr-CXR), label maps, reading radiographs, and synthetic copies of every format for the tests."""
