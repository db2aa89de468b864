"""The data sets' published layouts, one per file, each registered in pipeline.plugins.LAYOUTS (whose declaration
gives the detection order) on the public API of pipeline.data.table and pipeline.data.field."""
