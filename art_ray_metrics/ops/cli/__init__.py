"""The ``art-ray-metrics`` command line: the demo and the operations on a run's storage.

Commands::

    art-ray-metrics demo [--steps 8 --rollouts 4 --judges 2 --address ADDR --storage URI
                          --run NAME --resume --chaos --wandb [MODE] --chart PATH ...]
    art-ray-metrics inspect URI [--json]          checkpoint: steps, totals, unique ids, W&B run id
    art-ray-metrics history URI [--format table|jsonl|csv] [--split S] [--columns a,b]
    art-ray-metrics wandb-sync URI [--new-run] [--mode online|offline] [--project P]
    art-ray-metrics fake-llm [--port 0]           the demo's fake OpenAI/Anthropic API, for your code
    art-ray-metrics status [--address ADDR] [--name N] [--namespace NS] [--json]
    art-ray-metrics stop [--address ADDR] [--name N] [--namespace NS]

``URI`` is what the aggregator was given as ``storage_uri``: a directory, ``file://``,
``s3://bucket/prefix``, ``gs://bucket/prefix``. ``inspect``, ``history`` and ``wandb-sync``
read storage only (no Ray; they never take the writer epoch, so they are safe next to a running
aggregator); ``status`` and ``stop`` ask a running aggregator actor.

Before any work, every command checks what it will talk to, with a short timeout: a Ray
address must accept a TCP connection within 3 s (``auto`` must resolve to exactly one cluster:
``RAY_ADDRESS``, or this machine's ``ray start`` cluster file with no other cluster running),
and a storage URI must be reachable. ``status``, ``stop`` and ``demo`` print the address they
acted on.

Exit codes: 0 success; 1 the command ran but its check failed (a W&B sync that did not log
every row, a ``--chaos`` mismatch); 2 a problem with the input (wrong URI, no checkpoint, a
checkpoint or state of another format version, no Ray cluster, no aggregator running), printed
as one line ``art-ray-metrics <command>: error: ...`` on stderr, without a traceback (``-v``
shows it); 130 interrupted.

Modules: :mod:`.parser` (the parser and ``main``), :mod:`.storage` (the commands that read a
run's storage), :mod:`.cluster` (joining Ray; ``status`` and ``stop``), :mod:`.launch` (``demo``
and ``fake-llm``), :mod:`.common` (the one-line :class:`CliError`, URIs). Ray's internals are
used only through :mod:`art_ray_metrics.ops.rayprobe`.
"""

from __future__ import annotations

from art_ray_metrics.ops.cli.cluster import connect_ray
from art_ray_metrics.ops.cli.common import CliError
from art_ray_metrics.ops.cli.parser import build_parser, main
from art_ray_metrics.ops.cli.storage import probe_storage, read_history

__all__ = ["CliError", "build_parser", "connect_ray", "main", "probe_storage", "read_history"]
