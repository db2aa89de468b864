"""The HDF5 feature cache: versioned schema, crash-safe writer, reader, lock and shard merge."""
