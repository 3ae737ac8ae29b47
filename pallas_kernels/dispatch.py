"""Choosing an implementation for an op: ``xla``, ``mosaic_gpu`` (the Hopper kernel) or ``interpret``
(the same kernel run by jax's CPU interpreter), and the device facts and input checks every op shares.

``None`` tries the Mosaic GPU kernel on a Hopper GPU and falls back to XLA when the kernel raises
``NotImplementedError`` for the inputs; a name asked for explicitly never falls back.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

IMPLEMENTATIONS = ("xla", "mosaic_gpu", "interpret")
HOPPER_KINDS = ("H100", "H200", "H800", "H20", "GH200")
HOPPER_SMS = 132  # H100 SXM, H200, H800


def on_hopper() -> bool:
    device = jax.devices()[0]
    return device.platform == "gpu" and any(kind in device.device_kind for kind in HOPPER_KINDS)


def num_sms_of_device() -> int:
    """SMs of the default device; Hopper's 132 when the device does not say (the CPU interpreter)."""
    count = getattr(jax.devices()[0], "core_count", None)
    return int(count) if count else HOPPER_SMS


def known_value(x) -> np.ndarray | None:
    """The value of ``x`` when it is known at trace time, else None (for the input checks that
    data-dependent code under ``jit`` cannot make)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_implementation(implementation: str | None) -> None:
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation: expected None or one of {IMPLEMENTATIONS}, got {implementation!r}")


def dispatch(implementation: str | None, run_xla: Callable[[], object], run_kernel: Callable[[bool], object]):
    """Runs ``run_xla()`` or ``run_kernel(interpret)`` as ``implementation`` asks."""
    check_implementation(implementation)
    order = [implementation] if implementation else (["mosaic_gpu", "xla"] if on_hopper() else ["xla"])
    for name in order:
        try:
            if name == "xla":
                return run_xla()
            if name == "mosaic_gpu" and not on_hopper():
                raise NotImplementedError("mosaic_gpu: the kernel needs a Hopper GPU (sm_90a)")
            return run_kernel(name == "interpret")
        except NotImplementedError:
            if implementation is not None:
                raise
    raise AssertionError("unreachable: xla always runs")
