"""Evaluation: perplexity, recall probes, and lm-evaluation-harness tasks (harness.py, lm_eval_model.py)."""
