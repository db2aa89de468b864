"""The pipeline's stages (extract-features, train-heads, reproduce-tables, predict) and their CLI."""
