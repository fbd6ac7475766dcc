"""Penzai-style training and sharding utilities."""
