"""OpenPipe ART's training loop on the aggregator (from a clone: ``pip install -e '.[art]'``).

Re-exports :mod:`art_ray_metrics.integrations.art`: :func:`attach` on the trainer and
:func:`worker_context` in Ray tasks. openpipe-art is imported on first use.
"""

from art_ray_metrics.integrations.art import ART_VERSION, attach, worker_context

__all__ = ["ART_VERSION", "attach", "worker_context"]
