"""Datasets, samplers and batching."""
