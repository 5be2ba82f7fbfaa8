"""Evaluation: base vs tuned on raw held-out images, the official metric, and the report."""
