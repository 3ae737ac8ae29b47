"""What the real Mosaic GPU lowering made of a kernel, read from a ``jax.export`` for CUDA on the CPU.

The exported StableHLO holds each kernel as a ``mosaic_gpu_v2`` custom call whose backend config carries
the lowered kernel module (MLIR bytecode, PTX inline for wgmma): its launch (grid, threads, dynamic shared
memory), its wgmma instructions and its float constants are facts about the GPU variant that a test can
assert without a GPU.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

HOPPER_SMEM_BYTES = 232_448  # per block, the limit Mosaic GPU's CUDA lowering enforces

_WGMMA = re.compile(r"wgmma\.mma_async\.sync\.aligned\.m(\d+)n(\d+)k(\d+)\.f32\.(\w+)\.(\w+) \{[^}]*\}, (\{|\$)")


@dataclasses.dataclass(frozen=True)
class Wgmma:
    m: int
    n: int
    k: int
    a_dtype: str
    a_from_registers: bool  # A in registers ({...}) rather than an SMEM descriptor


@dataclasses.dataclass(frozen=True)
class LoweredKernel:
    kernel_hash: bytes
    text: str  # the kernel module, printed

    def launch(self) -> tuple[tuple[int, ...], tuple[int, ...], int]:
        """(grid, block threads, dynamic shared memory bytes) of the kernel's gpu.launch."""
        operands = re.search(r'"stable_mosaic_gpu\.gpu\.launch"\(([^)]*)\)', self.text).group(1).split(", ")
        values = [int(re.search(re.escape(v) + r' = "stable_mosaic_gpu\.arith\.constant"\(\) \{value = (\d+)',
                                self.text).group(1)) for v in operands[-7:]]
        return tuple(values[:3]), tuple(values[3:6]), values[6]

    def wgmmas(self) -> set[Wgmma]:
        return {Wgmma(int(m), int(n), int(k), a, brace == "{")
                for m, n, k, a, _, brace in _WGMMA.findall(self.text)}

    def f32_constants(self) -> set[np.float32]:
        return {np.float32(v) for v in re.findall(r"value = ([-\d.e+]+) : f32", self.text)}


def lowered_kernels(exported) -> list[LoweredKernel]:
    """The Mosaic GPU kernels of a ``jax.export.Exported`` (platforms=["cuda"])."""
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib.mlir import ir
    from jax.experimental.mosaic.gpu import dialect as mosaic_gpu_dialect

    kernels = []
    context = jax_mlir.make_ir_context()
    mosaic_gpu_dialect.register_dialect(context)  # its memref element types
    context.allow_unregistered_dialects = True  # the serialized module's versioned op names
    with context:
        module = ir.Module.parse(exported.mlir_module())
        ops = [op for func in module.body.operations for block in func.regions[0].blocks for op in block.operations]
        for op in ops:
            if op.name != "stablehlo.custom_call" or "mosaic_gpu" not in str(op.attributes["call_target_name"]):
                continue
            config = op.attributes["mhlo.backend_config"]
            kernel = ir.Module.parse(ir.StringAttr(config["module"]).value_bytes)
            kernels.append(LoweredKernel(ir.StringAttr(config["kernel_hash"]).value_bytes, str(kernel)))
    return kernels
