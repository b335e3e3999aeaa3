"""Evaluation of encoders: feature extraction and kNN (more protocols build on these)."""
