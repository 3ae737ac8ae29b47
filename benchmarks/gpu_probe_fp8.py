"""One-off GPU probe of the FP8 kernel: correctness and speed for a few tile configs (development aid)."""
import itertools, statistics, sys, time, traceback
import jax, jax.numpy as jnp, numpy as np
from pallas_kernels.fp8_gemm.mosaic_gpu import grouped_fp8_gemm, KernelConfig
from pallas_kernels.quant import per_token_cast_to_fp8, per_block_cast_to_fp8

def bench(f, *args, n=20):
    for _ in range(3): jax.block_until_ready(f(*args))
    ts = []
    for _ in range(n):
        t = time.perf_counter(); jax.block_until_ready(f(*args)); ts.append(time.perf_counter() - t)
    return statistics.median(ts)

print(jax.__version__, jax.devices()[0].device_kind, jax.devices()[0].core_count, flush=True)
for m, n, k in [(4096, 7168, 16384), (4096, 4096, 7168), (128, 7168, 16384), (4096, 2112, 7168)]:
    x = jax.random.normal(jax.random.key(0), (m, k), jnp.bfloat16); w = jax.random.normal(jax.random.key(1), (n, k), jnp.bfloat16)
    a, sa = jax.jit(per_token_cast_to_fp8)(x); b, sb = jax.jit(per_block_cast_to_fp8)(w)
    sa_t = sa.T; sb_cols = jnp.repeat(sb, 128, axis=0)[:n].T[None]; b3 = b[None]
    mp = -(-m // 128) * 128
    tiles = jnp.stack([jnp.zeros(mp // 128, jnp.int32), jnp.arange(mp // 128, dtype=jnp.int32), jnp.arange(mp // 128, dtype=jnp.int32) * 128, jnp.minimum(jnp.arange(1, mp // 128 + 1, dtype=jnp.int32) * 128, m)], 1)
    ref = jax.jit(lambda x, w: jnp.dot(x, w.T, preferred_element_type=jnp.float32))(x, w)
    t_bf16 = bench(jax.jit(lambda x, w: x @ w.T), x, w)
    flops = 2 * m * n * k
    print(f"M={m} N={n} K={k}: bf16 jnp.dot {flops / t_bf16 / 1e12:.0f} TFLOPS", flush=True)
    for tile_n, steps in [(128, 4), (128, 6), (160, 4), (112, 5), (96, 6)]:
        if n % tile_n: continue
        cfg = KernelConfig(tile_n=tile_n, max_concurrent_steps=steps, num_sms=132)
        f = jax.jit(lambda *args: grouped_fp8_gemm(*args, out_dtype=jnp.bfloat16, config=cfg))
        try:
            out = f(a, sa_t, b3, sb_cols, tiles)[:m]
            o, r = np.asarray(out, np.float64), np.asarray(ref, np.float64)
            diff = 1 - 2 * (o * r).sum() / ((o * o).sum() + (r * r).sum())
            t = bench(f, a, sa_t, b3, sb_cols, tiles)
            print(f"  tile_n={tile_n} steps={steps}: {flops / t / 1e12:.0f} TFLOPS ({t*1e6:.0f} us) diff={diff:.2e}", flush=True)
        except Exception as e:
            print(f"  tile_n={tile_n} steps={steps}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
