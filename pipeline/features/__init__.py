"""Features: backbone families and records, preprocessing, and stage one's loader and forward-pass runner (also
predict's)."""
