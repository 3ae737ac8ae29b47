"""The one place that touches jax's private Mosaic GPU interpreter (CPU execution of GPU kernels).

The interpreter lives under ``jax._src`` in jax 0.10-0.11; if its home moves, only this file changes.
"""

from __future__ import annotations

import collections
import os
import threading
from typing import Any

INTERPRET_SMS = 4  # SMs (CTAs of a persistent grid) simulated by the interpreter: enough to exercise tile loops


def gpu_interpret_params(*, detect_races: bool = False) -> Any:
    """Parameters that make ``plgpu.kernel(..., interpret=...)`` run on the CPU.

    Buffers start as NaN (``uninitialized_memory='nan'``) and out-of-bounds reads raise, so a kernel
    that leaves an output unwritten or reads past an operand fails loudly.
    """
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    _share_thread_compilations()
    return InterpretGPUParams(detect_races=detect_races, uninitialized_memory="nan", out_of_bounds_reads="raise")


def reset_interpreter() -> None:
    """Clears the interpreter's global state; needed after a kernel failed inside it."""
    from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import reset_gpu_interpret_mode_state

    reset_gpu_interpret_mode_state()
    with _COMPILED_LOCK:
        _COMPILED.clear()


# The interpreter runs a kernel as nested thread maps (SMs, then warpgroups); each thread lowers and compiles
# the same per-thread jaxpr again (jax 0.10-0.11: a fresh ``jax.jit`` per thread, so nothing is shared), and
# those XLA compilations were most of an interpreted kernel's time (~10 s of CPU for a 4-SM launch of the FP8
# GEMM, ~2.5 s with this). The threads of a launch run one program, so it is compiled once and shared: the
# same jaxpr object (kept alive by the entry, so its id is not reused) and the same argument types -> the same
# executable, which each thread runs with its own thread id. jax's trace cache hands a repeated launch of
# the same kernel and shapes the same jaxpr, so that reuses it too.
_COMPILED: collections.OrderedDict = collections.OrderedDict()  # key -> (jaxpr kept alive, executable)
_COMPILED_LOCK = threading.Lock()
_KEY_LOCKS: dict = {}
_MAX_COMPILED = 32


def _arg_types(values) -> tuple:
    import jax

    return tuple((tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)))
                 for x in jax.tree.leaves(values))


def _shared_run_jaxpr(jaxpr, consts, *args):
    import jax
    from jax._src import core as jax_core

    key = (id(jaxpr), _arg_types(consts), _arg_types(args))
    with _COMPILED_LOCK:
        key_lock = _KEY_LOCKS.setdefault(key, threading.Lock())
    with key_lock:  # the first thread compiles, the launch's other threads wait for it
        with _COMPILED_LOCK:
            entry = _COMPILED.get(key)
        if entry is None or entry[0] is not jaxpr:
            def _run(jaxpr, consts, *args):
                jax_core.eval_jaxpr(jaxpr, consts, *args)

            entry = (jaxpr, jax.jit(_run, static_argnums=(0,)).trace(jaxpr, consts, *args).lower().compile())
            with _COMPILED_LOCK:
                _COMPILED[key] = entry
                while len(_COMPILED) > _MAX_COMPILED:
                    _KEY_LOCKS.pop(_COMPILED.popitem(last=False)[0], None)
    entry[1](consts, *args)


def _share_thread_compilations() -> None:
    from jax._src.pallas.mosaic.interpret import thread_map

    if getattr(thread_map, "_run_jaxpr", None) not in (None, _shared_run_jaxpr):
        thread_map._run_jaxpr = _shared_run_jaxpr


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
