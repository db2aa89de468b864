"""Head families: the plugin contract (plugin.py), the trained-head artefact (artefact.py), and one package per
built-in family (resmtnet/: the paper's head, the reference; loc/: the localisation head). A family imports the core
and the layers below it, never another family or the engine above it."""
