"""Analyses over a model: cost, channel dependency groups, activation statistics."""
