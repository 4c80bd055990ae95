"""Evaluation: sample-quality metrics on feature arrays (`metrics`: FD, KID, precision /
recall), feature networks (`features`: the offline quick classifier; `inception`: the FID
InceptionV3 from local weights), dataset reference statistics (`stats`) and the evaluator a run
calls (`evaluator`: bits/dim and the metrics in each configured feature space)."""
