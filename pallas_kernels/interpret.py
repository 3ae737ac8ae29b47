"""The one place that touches jax's private Mosaic GPU interpreter (CPU execution of GPU kernels).

The interpreter lives under ``jax._src`` in jax 0.10-0.11; if its home moves, only this file changes.
"""

from __future__ import annotations

import os
from typing import Any

INTERPRET_SMS = 4  # SMs (CTAs of a persistent grid) simulated by the interpreter: enough to exercise tile loops


def gpu_interpret_params(*, detect_races: bool = False) -> Any:
    """Parameters that make ``plgpu.kernel(..., interpret=...)`` run on the CPU.

    Buffers start as NaN (``uninitialized_memory='nan'``) and out-of-bounds reads raise, so a kernel
    that leaves an output unwritten or reads past an operand fails loudly.
    """
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    return InterpretGPUParams(detect_races=detect_races, uninitialized_memory="nan", out_of_bounds_reads="raise")


def reset_interpreter() -> None:
    """Clears the interpreter's global state; needed after a kernel failed inside it."""
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import reset_gpu_interpret_mode_state

    reset_gpu_interpret_mode_state()


def check_interpreter_threads(kernel_threads: int) -> None:
    """Raises RuntimeError when XLA:CPU has too few threads to interpret a warp-specialised kernel.

    The interpreter runs each warpgroup as a separate computation whose barrier waits block one of
    XLA:CPU's intra-op threads; with fewer threads than warpgroups the last one never runs and the
    kernel hangs. XLA sizes that pool from ``NPROC`` when set, else the CPU count, when jax starts.
    """
    threads = int(os.environ.get("NPROC") or 0) or len(os.sched_getaffinity(0))
    if threads < kernel_threads:
        raise RuntimeError(f"the Mosaic GPU interpreter needs >= {kernel_threads} XLA:CPU threads for this kernel's "
                           f"warpgroups, this process has {threads}: set NPROC={2 * kernel_threads} in the "
                           f"environment before jax starts")
