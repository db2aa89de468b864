"""Backbone families, one per file, each registered in pipeline.plugins.BACKBONE_FAMILIES."""
