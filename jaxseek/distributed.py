"""Several processes, one training run: JAX's own multi-controller runtime (``jax.distributed``).

Every process runs the same program; ``jax.distributed.initialize`` connects them through a coordinator
(process 0's ``host:port``), after which ``jax.devices()`` lists every process's devices and one ``jit``
computation spans them all. On a GPU cluster that is one process per host (or per GPU). On a CPU, each
process can expose several fake devices and cross-process collectives run over gloo (TCP), so a
two-process run on loopback exercises the same code paths as a multi-host job:

    jaxseek train --coordinator 127.0.0.1:9911 --num-processes 2 --process-id 0 --local-devices 4 --dp 8
    jaxseek train --coordinator 127.0.0.1:9911 --num-processes 2 --process-id 1 --local-devices 4 --dp 8

Arguments left as ``None`` fall back to ``JAXSEEK_COORDINATOR``, ``JAXSEEK_NUM_PROCESSES``,
``JAXSEEK_PROCESS_ID`` and ``JAXSEEK_LOCAL_DEVICES``. ``coordinator="auto"`` hands the discovery to jax
(``jax.distributed.initialize()`` reads SLURM, Open MPI and Cloud TPU environments, and
``JAX_COORDINATOR_ADDRESS``). With no coordinator at all the run is a single process, as before.

Fake CPU devices are set with jax's ``jax_num_cpu_devices`` option, which (like
``XLA_FLAGS=--xla_force_host_platform_device_count=N``, which it overrides) is read when the CPU backend
starts, not when jax is imported: setting it after ``import jax`` works, but after the first device
query or computation it is too late (the flag is then silently ignored; the option raises).
"""

from __future__ import annotations

import os
from typing import Mapping, NamedTuple

AUTO = "auto"
ENV_COORDINATOR = "JAXSEEK_COORDINATOR"
ENV_NUM_PROCESSES = "JAXSEEK_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXSEEK_PROCESS_ID"
ENV_LOCAL_DEVICES = "JAXSEEK_LOCAL_DEVICES"


class DistributedSettings(NamedTuple):
    """What ``initialize`` will do, after validation and the environment fallback."""
    coordinator: str | None  # "host:port", "auto" (jax detects the cluster) or None (a single process)
    num_processes: int | None
    process_id: int | None
    local_device_count: int | None  # fake CPU devices per process (None: the backend's own count)

    @property
    def multi_process(self) -> bool:
        return self.coordinator is not None


class DistributedInfo(NamedTuple):
    """Where this process stands once jax is up."""
    process_index: int
    process_count: int
    local_device_count: int  # devices this process drives
    device_count: int  # devices of all processes together (what a mesh spans)
    platform: str

    @property
    def is_main(self) -> bool:
        """Process 0: the one that prints and writes the run's files."""
        return self.process_index == 0


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    text = environ.get(name, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}: must be an integer, got {text!r}") from None


def _check_coordinator(coordinator: str) -> None:
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator: must be host:port (process 0's address and a free port, e.g. "
                         f"127.0.0.1:9911) or '{AUTO}', got {coordinator!r}")


def resolve_settings(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, local_device_count: int | None = None, *,
                     environ: Mapping[str, str] | None = None) -> DistributedSettings:
    """Validates the arguments, filling the ones left ``None`` from the ``JAXSEEK_*`` environment variables.

    Raises ValueError naming the argument: a coordinator that is not ``host:port``, a ``process_id``
    outside ``[0, num_processes)``, counts below 1, or process numbers without a coordinator.
    """
    environ = os.environ if environ is None else environ
    coordinator = coordinator if coordinator is not None else (environ.get(ENV_COORDINATOR, "").strip() or None)
    num_processes = num_processes if num_processes is not None else _env_int(environ, ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(environ, ENV_PROCESS_ID)
    local_device_count = (local_device_count if local_device_count is not None
                          else _env_int(environ, ENV_LOCAL_DEVICES))
    for name, value in (("num_processes", num_processes), ("local_device_count", local_device_count)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
    if process_id is not None and not isinstance(process_id, int):
        raise ValueError(f"process_id: must be an integer, got {process_id!r}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id: must be in [0, num_processes) = [0, {num_processes}), got {process_id}")
    if coordinator is None:
        if num_processes is not None or process_id is not None:
            raise ValueError(f"coordinator: num_processes / process_id need a coordinator (--coordinator HOST:PORT "
                             f"or {ENV_COORDINATOR}; '{AUTO}' lets jax detect a SLURM / Open MPI / TPU cluster)")
    elif coordinator != AUTO:
        _check_coordinator(coordinator)
        if num_processes is None:
            raise ValueError(f"num_processes: required with coordinator {coordinator} "
                             f"(--num-processes or {ENV_NUM_PROCESSES})")
        if process_id is None:
            raise ValueError(f"process_id: required with coordinator {coordinator} (--process-id or {ENV_PROCESS_ID})")
    return DistributedSettings(coordinator, num_processes, process_id, local_device_count)


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               local_device_count: int | None = None) -> DistributedInfo:
    """Starts jax on this process: fake CPU devices if asked, then ``jax.distributed`` if there is a coordinator.

    Must run before anything asks jax for devices or computes (jax's own rule for
    ``jax.distributed.initialize``). Arguments as in ``resolve_settings``; with none given and no
    ``JAXSEEK_*`` variables it only reports the single process.
    """
    settings = resolve_settings(coordinator, num_processes, process_id, local_device_count)
    import jax
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized() and (settings.multi_process or settings.local_device_count):
        name = "coordinator" if settings.multi_process else "local_device_count"
        raise ValueError(f"{name}: jax's devices are already in use in this process; initialize before any "
                         "jax.devices() call or computation")
    if settings.local_device_count is not None:
        jax.config.update("jax_num_cpu_devices", settings.local_device_count)
    if settings.multi_process:
        # gloo carries CPU collectives between processes (jax 0.10's default, set so no other default applies);
        # GPU and TPU collectives are unaffected.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if settings.coordinator == AUTO:
            jax.distributed.initialize(num_processes=settings.num_processes, process_id=settings.process_id)
        else:
            jax.distributed.initialize(settings.coordinator, settings.num_processes, settings.process_id)
    info = DistributedInfo(jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
                           jax.default_backend())
    if settings.local_device_count is not None and info.platform != "cpu":
        raise ValueError(f"local_device_count: fake devices exist only on the CPU backend; this process runs on "
                         f"{info.platform} with {info.local_device_count} devices (leave it unset)")
    return info


def barrier(name: str, *, timeout_s: int = 600) -> None:
    """Waits until every process reaches ``name`` (a no-op with one process).

    gloo gives a peer 30 s to join a collective (not configurable in jax 0.10.2), so processes that drift
    further apart, e.g. one compiling a step that another loaded from jax's compilation cache, fail with
    "Gloo context initialization failed" (measured: a peer 40 s late fails without this barrier before the
    first step, and trains with it). This barrier waits on the coordination service ``jax.distributed``
    started (the one Orbax's distributed barriers use), with a timeout of our choosing. ``name`` must be
    new each time.
    """
    import jax
    from jax._src import distributed as jax_distributed

    if jax.process_count() > 1:
        jax_distributed.global_state.client.wait_at_barrier(name, timeout_s * 1000)
