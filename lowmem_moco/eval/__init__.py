"""Evaluation: the probes (kNN, linear) and evaluating or exporting a finished run."""
