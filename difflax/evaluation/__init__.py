"""Evaluation: sample-quality metrics from features (`metrics`); feature networks and dataset
statistics are to come (see the evaluation issue)."""
