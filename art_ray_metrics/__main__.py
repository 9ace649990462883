"""``python -m art_ray_metrics``: the command-line interface (same as ``art-ray-metrics``)."""

from art_ray_metrics.ops.cli import main

raise SystemExit(main())
