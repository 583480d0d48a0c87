"""Data path: dataset config, backends, metadata scan, aspect buckets, captions, sampler, image decode."""
