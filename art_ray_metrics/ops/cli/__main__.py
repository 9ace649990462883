"""``python -m art_ray_metrics.ops.cli``: the same as ``art-ray-metrics``."""

import sys

from art_ray_metrics.ops.cli.parser import main

sys.exit(main())
