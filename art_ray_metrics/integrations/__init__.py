"""Adapters for training frameworks (optional extras): :mod:`art_ray_metrics.integrations.art`."""
