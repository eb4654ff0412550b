"""Evaluation: perplexity and recall probes."""
