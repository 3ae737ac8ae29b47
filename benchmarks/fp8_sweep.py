"""The FP8 GEMM kernel's variants swept over a few shapes, to re-tune the heuristic's choice on a GPU.

Swept, per shape, beside the heuristic's own choice (first row): promotion (``per_column``, ``tile_scalar``)
x, for M > 256, tile_n (112, 128, 144, 160, 192) and pipeline depth (the deepest that fits shared memory, up
to 6, and one less), 2-CTA clusters multicasting A (tile_n 128, 160) and 256-row tiles (tile_n 112, 128); for
M <= 256, tile_m (64, 128) x tile_n (64, 128, 192) at the deepest pipeline; where N is not whole tiles, each
also with B unpadded (``pad_b=False``). And the pipeline variants (``KernelConfig``'s early_release,
pipeline_across_tiles, epilogue_buffers=2; ``_pipeline_variants``) for both promotions at tile_n 128 (and 160,
or tile_m 64 for small M, in full), the depth across tiles the deepest dividing K / 128. ``--quick``: two
shapes, 36 configs (gpu_suite's fp8_tile_sweep); in full 217. Not swept (not built): clusters along M
(multicasting B); grid_tile_width is left at 8.

    python benchmarks/fp8_gemm.py --sweep [--quick]       # on a Hopper GPU: a table of TFLOPS per config
    python benchmarks/fp8_gemm.py --sweep --dry-run       # anywhere: exports every swept config for CUDA
    python benchmarks/fp8_gemm.py --sweep --registers     # on a Hopper GPU: ptxas registers/spills per variant

On a GPU each row is also checked: kernel == XLA path (both bf16; calc_diff < 1e-6 on exp(2 randn)-scaled inputs) or
the row says ``"ok": false``. Nothing here is a measurement until it ran on the GPU.
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.fp8_gemm import kernel_ops, reference
from pallas_kernels.fp8_gemm.config import pipeline_depth, select_config
from pallas_kernels.fp8_gemm.mosaic_gpu import KernelConfig
from pallas_kernels.fp8_gemm.promotion import PROMOTIONS

SHAPES = [(4096, 7168, 16384), (4096, 2112, 7168), (128, 7168, 16384), (64, 4096, 7168)]
QUICK_SHAPES = [(4096, 7168, 16384), (128, 7168, 16384)]
SMALL_M = 256  # at or below: bandwidth-bound rows, where 64-row tiles and narrower columns may pay
OUT_ITEMSIZE = 2  # bf16 output


def _variant_grid(m: int, quick: bool):
    """(tile_m, tile_n, cluster_n, stage choices) to try at ``m`` rows."""
    if m <= SMALL_M:
        return [(tile_m, tile_n, 1, ("deepest",)) for tile_m in (64, 128)
                for tile_n in ((128,) if quick else (64, 128, 192))]
    stages = ("deepest",) if quick else ("deepest", "one less")
    return ([(128, tile_n, 1, stages) for tile_n in ((128, 160, 192) if quick else (112, 128, 144, 160, 192))]
            + [(128, tile_n, 2, ("deepest",)) for tile_n in ((128,) if quick else (128, 160))]
            + [(256, tile_n, 1, ("deepest",)) for tile_n in ((128,) if quick else (112, 128))])


PIPELINE_VARIANTS = (dict(early_release=True), dict(pipeline_across_tiles=True),
                     dict(pipeline_across_tiles=True, early_release=True),
                     dict(pipeline_across_tiles=True, early_release=True, epilogue_buffers=2))


def _pipeline_variants(m: int, k: int, num_sms: int, quick: bool) -> list[KernelConfig]:
    """tile_n 128 (and 160 in full, M > 256) with the pipeline variants, at the deepest depth that fits and,
    across tiles, divides the K steps."""
    tiles = [(128, 128)] if quick else [(128, 128), (128, 160)] if m > SMALL_M else [(64, 128), (128, 128)]
    configs = []
    for promotion in PROMOTIONS:
        for tile_m, tile_n in tiles:
            for flags in PIPELINE_VARIANTS:
                variant = dict(tile_m=tile_m, promotion=promotion, **flags)
                stages = pipeline_depth(tile_n, OUT_ITEMSIZE, max_stages=6, **variant)
                if flags.get("pipeline_across_tiles"):
                    steps = -(-k // 128)
                    stages = max(s for s in range(1, stages + 1) if steps % min(s, steps) == 0)
                configs.append(KernelConfig(tile_n=tile_n, max_concurrent_steps=stages, num_sms=num_sms, **variant))
    return configs


def sweep_configs(m: int, n: int, num_sms: int, quick: bool = False, k: int | None = None) -> list[KernelConfig]:
    """The heuristic's config first, then every variant that fits shared memory (deduplicated); with ``k``
    also the pipeline variants (``_pipeline_variants``)."""
    configs = [select_config(-(-m // 128), n, OUT_ITEMSIZE, num_sms=num_sms)[0]]
    for promotion in PROMOTIONS:
        for tile_m, tile_n, cluster_n, stage_choices in _variant_grid(m, quick):
            variant = dict(tile_m=tile_m, promotion=promotion, cluster_n=cluster_n)
            try:
                deepest = pipeline_depth(tile_n, OUT_ITEMSIZE, max_stages=6, **variant)
            except ValueError:  # e.g. tile_scalar with a tile that can span three scale blocks
                continue
            for choice in stage_choices:
                stages = deepest if choice == "deepest" else deepest - 1
                configs.append(KernelConfig(tile_n=tile_n, max_concurrent_steps=stages, num_sms=num_sms, **variant))
    if k is not None:
        configs += _pipeline_variants(m, k, num_sms, quick)
    # where N is not whole tiles: also B unpadded (TMA zero-fills the last tile instead of an XLA copy)
    configs += [dataclasses.replace(c, pad_b=False) for c in configs[1:] if n % c.n_multiple]
    unique = []
    for config in configs:
        if config not in unique:
            unique.append(config)
    return unique


def describe(config: KernelConfig) -> str:
    return (f"{config.promotion} m{config.tile_m} n{config.tile_n} s{config.max_concurrent_steps} "
            f"w{config.grid_tile_width}{'' if config.pad_b else ' unpadded-b'}"
            f"{' across-tiles' if config.pipeline_across_tiles else ''}"
            f"{' early-release' if config.early_release else ''}"
            f"{' epilogue-x2' if config.epilogue_buffers > 1 else ''} c{config.cluster_n}")


def _gemm(config):
    return jax.jit(lambda a, sa, b, sb: kernel_ops.fp8_gemm_nt(a, sa, b, sb, out_dtype=jnp.bfloat16,
                                                               interpret=False, config=config))


def export_for_cuda(m: int, n: int, k: int, config: KernelConfig):
    """Lowers the kernel at this shape and config through Mosaic GPU's CUDA lowering (no GPU needed)."""
    f8, f32 = jnp.float8_e4m3fn, jnp.float32
    args = [jax.ShapeDtypeStruct(s, d) for s, d in (((m, k), f8), ((m, -(-k // 128)), f32), ((n, k), f8),
                                                     ((-(-n // 128), -(-k // 128)), f32))]
    return jax.export.export(_gemm(config), platforms=["cuda"])(*args)


def dry_run(quick: bool = False, num_sms: int = 132, shapes=None) -> list[dict]:
    """Exports every swept (shape, config) for CUDA; a row per config, ``ok`` False with the error if it failed."""
    rows = []
    for m, n, k in shapes or (QUICK_SHAPES if quick else SHAPES):
        for config in sweep_configs(m, n, num_sms, quick, k):
            start = time.time()
            try:
                export_for_cuda(m, n, k, config)
                row = {"shape": f"{m}x{n}x{k}", "config": describe(config), "ok": True}
            except Exception as error:  # one failing variant must not hide the others
                row = {"shape": f"{m}x{n}x{k}", "config": describe(config), "ok": False,
                       "error": f"{type(error).__name__}: {error}"[:300]}
            row["export_s"] = round(time.time() - start, 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def _scaled_inputs(m, n, k):
    """FP8 operands of normal values scaled per row and per 128-block by exp(2 randn) (scale bugs show)."""
    from pallas_kernels.quant import per_block_cast_to_fp8, per_token_cast_to_fp8
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (m, k)) * jnp.exp(2 * jax.random.normal(keys[1], (m, 1)))
    w = jax.random.normal(keys[2], (n, k)) * jnp.exp(2 * jax.random.normal(keys[3], (n, 1)))
    blocks = jnp.exp(2 * jax.random.normal(keys[4], (-(-n // 128), -(-k // 128))))
    w = w * jnp.repeat(jnp.repeat(blocks, 128, 0), 128, 1)[:n, :k]
    return (*jax.jit(per_token_cast_to_fp8)(x), *jax.jit(per_block_cast_to_fp8)(w))


def run(quick: bool = False) -> list[dict]:
    """On a Hopper GPU: TFLOPS of every swept config per shape, each checked against the XLA path."""
    import sys
    import pathlib
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
    from timing import gpu_kernel_ms

    from pallas_kernels.dispatch import num_sms_of_device
    from pallas_kernels.numerics import calc_diff

    rows = []
    for m, n, k in QUICK_SHAPES if quick else SHAPES:
        a, sa, b, sb = _scaled_inputs(m, n, k)
        xla = np.asarray(jax.jit(lambda *v: reference.fp8_gemm_nt(*v, jnp.bfloat16))(a, sa, b, sb), np.float32)
        for config in sweep_configs(m, n, num_sms_of_device(), quick, k):
            row = {"shape": f"{m}x{n}x{k}", "config": describe(config)}
            try:
                fn = _gemm(config)
                diff = calc_diff(np.asarray(fn(a, sa, b, sb), np.float32), xla)
                ms = gpu_kernel_ms(fn, a, sa, b, sb)
                row.update(tflops=2 * m * n * k / ms / 1e9, us=ms * 1e3, calc_diff_vs_xla=diff, ok=diff < 1e-6)
            except Exception as error:
                row.update(ok=False, error=f"{type(error).__name__}: {error}"[:300])
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


REGISTER_VARIANTS = [dict(tile_n=128), dict(tile_n=128, promotion="tile_scalar"), dict(tile_n=160),
                     dict(tile_n=160, promotion="tile_scalar"), dict(tile_n=192, max_concurrent_steps=3),
                     dict(tile_n=192, promotion="tile_scalar", max_concurrent_steps=3),
                     dict(tile_n=128, tile_m=64), dict(tile_n=128, cluster_n=2),
                     dict(tile_n=128, tile_m=256, max_concurrent_steps=3), dict(tile_n=128, early_release=True),
                     dict(tile_n=128, pipeline_across_tiles=True, early_release=True, epilogue_buffers=2,
                          max_concurrent_steps=2)]
_REGISTER_CHILD = """
import json, sys
import jax, jax.numpy as jnp
sys.path.insert(0, "benchmarks")
import fp8_sweep
from pallas_kernels.fp8_gemm.mosaic_gpu import KernelConfig
config = KernelConfig(**{"max_concurrent_steps": 4, "num_sms": 132, **json.loads(sys.argv[1])})
a, sa, b, sb = fp8_sweep._scaled_inputs(256, 1024, 1024)
print(float(fp8_sweep._gemm(config)(a, sa, b, sb)[0, 0]))
"""


def registers(timeout_s: int = 120) -> list[dict]:
    """On a Hopper GPU: ptxas's register and spill report for each variant (``MOSAIC_GPU_DUMP_PTXAS``), one
    child process per variant (wider tiles and the per-column scale vector compete for registers)."""
    import os
    import pathlib
    import subprocess
    import sys
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "MOSAIC_GPU_DUMP_PTXAS": "1", "MOSAIC_GPU_DUMP_PTX": "0",
           "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    rows = []
    for fields in REGISTER_VARIANTS:
        try:
            done = subprocess.run([sys.executable, "-c", _REGISTER_CHILD, json.dumps(fields)], capture_output=True,
                                  text=True, timeout=timeout_s, env=env, cwd=str(root))
            lines = (done.stdout + done.stderr).splitlines()
            keep = [line.strip() for line in lines if any(w in line for w in ("registers", "spill", "stack frame"))]
            row = {"variant": fields, "exit": done.returncode, "ptxas": keep[:12],
                   "tail": lines[-4:] if done.returncode else []}
        except subprocess.TimeoutExpired:
            row = {"variant": fields, "exit": None, "error": f"timed out after {timeout_s} s"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| shape | config | TFLOPS | us | calc_diff vs XLA | ok |", "| --- | --- | ---: | ---: | ---: | --- |"]
    for r in rows:
        if "tflops" in r:
            lines.append(f"| {r['shape']} | {r['config']} | {r['tflops']:.0f} | {r['us']:.0f} | "
                         f"{r['calc_diff_vs_xla']:.1e} | {r['ok']} |")
        else:
            lines.append(f"| {r['shape']} | {r['config']} | - | - | - | {r['ok']} {r.get('error', '')[:60]} |")
    return "\n".join(lines)

