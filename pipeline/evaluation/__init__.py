"""The stage-two engine: reads the caches, runs every enabled head family on the protocol's splits (cross-
validation, refit) and says which family answers. Above the head families, below the commands."""
