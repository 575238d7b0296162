"""Devices and hosts: a batch-sharded mesh over this process's devices, each process its
own share of the corpus, and ``jax.distributed`` to start them together.

Attribution of one item never needs another item, so no collective runs during a corpus
run: every process builds a :class:`~jax.sharding.Mesh` over its *local* devices, shards
each batch along ``"batch"`` (``NamedSharding(mesh, P("batch"))``; ``jit`` propagates it
through the front end and the backward pass), replicates the params, and attributes the
entries ``i`` with ``i % process_count == process_index``. Processes then never wait for
each other (a host that hits slow or bad files does not hold up the pod); the only
cross-host step is the barrier at the end.

On CPU (tests; a CPU cluster) ``jax.distributed`` needs CPU collectives for that barrier:
:func:`initialize` selects gloo.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["initialize", "local_mesh", "batch_sharding", "replicate", "process_share",
           "process_info", "barrier", "round_batch"]

log = logging.getLogger("jaxspeech.corpus")
T = TypeVar("T")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, cpu_collectives: str = "gloo") -> tuple[int, int]:
    """Start ``jax.distributed`` (before any other JAX call); returns
    ``(process_index, process_count)``.

    With no arguments JAX detects the cluster (Cloud TPU pods, SLURM, Open MPI, Kubernetes);
    elsewhere pass ``coordinator_address="host0:1234"``, ``num_processes``, ``process_id``.
    """
    try:  # gloo: the CPU backend's collectives (the end-of-run barrier on CPU hosts)
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    except (AttributeError, ValueError) as e:  # an older/newer jax without the option
        log.info("CPU collectives not configurable here: %s", e)
    kwargs: dict[str, Any] = {}
    if coordinator_address is not None:
        kwargs.update(coordinator_address=coordinator_address, num_processes=num_processes,
                      process_id=process_id)
    jax.distributed.initialize(**kwargs)
    return process_info()


def process_info() -> tuple[int, int]:
    """``(process_index, process_count)`` (``(0, 1)`` without ``jax.distributed``)."""
    return jax.process_index(), jax.process_count()


def local_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh ``("batch",)`` over this process's devices (all local devices by default)."""
    devices = jax.local_devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), ("batch",))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Axis 0 split over the mesh's ``"batch"`` axis, the rest whole."""
    return NamedSharding(mesh, P("batch"))


def replicate(tree: T, mesh: Mesh) -> T:
    """Every leaf of ``tree`` copied to every device of ``mesh`` (the params)."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def round_batch(batch_size: int, mesh: Mesh) -> int:
    """``batch_size`` rounded up to a multiple of the mesh size (each device the same rows)."""
    n = mesh.size
    return max(n, -(-int(batch_size) // n) * n)


def process_share(entries: Sequence[T], process_index: int | None = None,
                  process_count: int | None = None) -> list[T]:
    """This process's entries: every ``process_count``-th from ``process_index`` (round
    robin, so long and short files spread evenly whatever the order)."""
    index, count = process_info() if process_index is None else (process_index, process_count)
    if count is None or not 0 <= index < count:
        raise ValueError(f"process {index} of {count}: not a valid process index")
    return list(entries[index::count])


def barrier(name: str) -> None:
    """Wait for every process (no-op for one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
