"""Evaluate: metrics, calibration, calls and their summaries, out-of-fold results."""
