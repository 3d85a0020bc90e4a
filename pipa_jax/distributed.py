"""Multi-host start-up: `jax.distributed.initialize` with checked arguments and clear errors.

One process per host (or per GPU, as SLURM launches them) runs the same command; every process
sees the global device set, the mesh spans all of it, and each process feeds its contiguous share
of every global batch (pipa_jax.data.pipeline). Process 0 also runs the coordinator service.

  explicit:  python -m pipa_jax.main ... --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=I
  automatic: python -m pipa_jax.main ... --distributed   (TPU pod slices, SLURM, Open MPI: JAX reads
             the cluster's environment)

On CPU the cross-process collectives need an implementation; gloo (built into jaxlib) is selected
unless one is configured, so several processes on one machine (127.0.0.1) train exactly as one
process over the same number of devices: that is how the tests prove the multi-host path.
"""
from __future__ import annotations

import dataclasses
import socket
import time

import jax
from absl import logging


class DistributedSetupError(ValueError):
    """Bad multi-host arguments, or a coordinator that could not be reached."""


@dataclasses.dataclass(frozen=True)
class Setup:
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False                 # let JAX detect the cluster (TPU pods, SLURM, MPI)
    timeout_s: int = 300               # how long to wait for every process to join

    @property
    def enabled(self) -> bool:
        return self.auto or any(v is not None for v in (self.coordinator_address, self.num_processes,
                                                         self.process_id))


def check(setup: Setup) -> None:
    """Clear errors for arguments that cannot work, before any connection is tried."""
    if not setup.enabled:
        return
    if setup.timeout_s <= 0:
        raise DistributedSetupError(f"--initialization_timeout={setup.timeout_s}: expected a positive number of seconds")
    given = {k: getattr(setup, k) for k in ("coordinator_address", "num_processes", "process_id")}
    if setup.auto:
        return          # JAX fills in whatever is missing from the cluster's environment
    missing = [f"--{k}" for k, v in given.items() if v is None]
    if missing:
        raise DistributedSetupError(
            f"multi-host training needs --coordinator_address, --num_processes and --process_id together "
            f"(missing {', '.join(missing)}); or pass --distributed to let JAX detect a TPU pod / SLURM cluster")
    host, sep, port = setup.coordinator_address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedSetupError(
            f"--coordinator_address={setup.coordinator_address!r}: expected HOST:PORT of process 0 "
            "(e.g. 10.0.0.1:12345 or 127.0.0.1:12345)")
    if setup.num_processes < 1:
        raise DistributedSetupError(f"--num_processes={setup.num_processes}: expected at least 1")
    if not 0 <= setup.process_id < setup.num_processes:
        raise DistributedSetupError(
            f"--process_id={setup.process_id}: expected 0..{setup.num_processes - 1} "
            f"(one distinct id per process of --num_processes={setup.num_processes}; 0 runs the coordinator)")


def _select_cpu_collectives() -> None:
    """gloo for cross-process CPU collectives unless the user configured an implementation."""
    try:
        current = jax.config.jax_cpu_collectives_implementation
    except AttributeError:       # a JAX without the option: nothing to select
        return
    if current in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(setup: Setup) -> None:
    """Joins the process group described by `setup` (no-op when it is not enabled). Must run before
    anything touches JAX's devices."""
    check(setup)
    if not setup.enabled:
        return
    _select_cpu_collectives()
    kwargs = dict(initialization_timeout=int(setup.timeout_s))
    if not setup.auto or setup.coordinator_address is not None:
        kwargs.update(coordinator_address=setup.coordinator_address, num_processes=setup.num_processes,
                      process_id=setup.process_id)
    if setup.coordinator_address is not None and setup.process_id not in (None, 0):
        # jaxlib aborts the whole process (a fatal log, not an exception) when the coordinator
        # cannot be reached in time, so reach it here first and fail with a readable error.
        _wait_for_coordinator(setup)
    logging.info("joining %s processes at %s (waiting up to %d s)", setup.num_processes or "the detected",
                 setup.coordinator_address or "the detected coordinator", setup.timeout_s)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # jaxlib raises its own runtime errors (DEADLINE_EXCEEDED, UNAVAILABLE, ...)
        who = (f"process {setup.process_id} of {setup.num_processes}" if setup.process_id is not None
               else "this process")
        raise DistributedSetupError(
            f"{who}: joining the process group at coordinator {setup.coordinator_address or '(auto-detected)'} "
            f"failed: {type(e).__name__}: {str(e)[:400]}\n"
            "If the others were not reached: check that every process runs with the same --coordinator_address "
            "and --num_processes, that the address and port are reachable from this host, and that each "
            f"process id is used once (the wait is --initialization_timeout={setup.timeout_s} s).") from e


def _wait_for_coordinator(setup: Setup) -> None:
    host, _, port = setup.coordinator_address.rpartition(":")
    deadline = time.monotonic() + setup.timeout_s
    last = None
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, setup.timeout_s)):
                return
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    raise DistributedSetupError(
        f"process {setup.process_id} of {setup.num_processes}: the coordinator at {setup.coordinator_address} "
        f"did not answer within {setup.timeout_s} s ({type(last).__name__}: {last}).\n"
        "Start process 0 (which runs the coordinator) with the same --coordinator_address, check that the "
        "address and port are reachable from this host, or raise --initialization_timeout.")


def barrier(name: str, timeout_s: int = 3600) -> None:
    """Every process waits here for the others (through the coordination service, not a device
    collective); a no-op with one process. `name` must be the same on all processes and new for
    each barrier of a run."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed as jax_distributed   # the client JAX's own serialization uses
    jax_distributed.global_state.client.wait_at_barrier(f"pipa_jax/{name}", timeout_in_ms=int(timeout_s * 1000))
