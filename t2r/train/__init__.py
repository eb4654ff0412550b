"""Training: config schema, data, stages, loop."""
