"""GPU probe of the FP8 kernel (development aid): one variant per subprocess, so a crash is contained."""
import os, statistics, subprocess, sys, time
import jax, jax.numpy as jnp, numpy as np

def bench(f, *args, n=20):
    for _ in range(3): jax.block_until_ready(f(*args))
    ts = []
    for _ in range(n):
        t = time.perf_counter(); jax.block_until_ready(f(*args)); ts.append(time.perf_counter() - t)
    return statistics.median(ts)

def one(m, n, k, tile_n, steps, debug):
    from pallas_kernels.fp8_gemm.mosaic_gpu import grouped_fp8_gemm, KernelConfig
    from pallas_kernels.quant import per_token_cast_to_fp8, per_block_cast_to_fp8
    x = jax.random.normal(jax.random.key(0), (m, k), jnp.bfloat16); w = jax.random.normal(jax.random.key(1), (n, k), jnp.bfloat16)
    a, sa = jax.jit(per_token_cast_to_fp8)(x); b, sb = jax.jit(per_block_cast_to_fp8)(w)
    sa_t = sa.T; sb_cols = jnp.repeat(sb, 128, axis=0)[:n].T[None]; b3 = b[None]
    mp = -(-m // 128) * 128
    r = jnp.arange(mp // 128, dtype=jnp.int32)
    tiles = jnp.stack([jnp.zeros_like(r), r, r * 128, jnp.minimum((r + 1) * 128, m)], 1)
    ref = jnp.dot(x, w.T, preferred_element_type=jnp.float32)
    cfg = KernelConfig(tile_n=tile_n, max_concurrent_steps=steps, num_sms=132, debug=debug)
    f = jax.jit(lambda *args: grouped_fp8_gemm(*args, out_dtype=jnp.bfloat16, config=cfg))
    out = np.asarray(f(a, sa_t, b3, sb_cols, tiles)[:m], np.float64); rr = np.asarray(ref, np.float64)
    diff = 1 - 2 * (out * rr).sum() / ((out * out).sum() + (rr * rr).sum())
    t = bench(f, a, sa_t, b3, sb_cols, tiles)
    tb = bench(jax.jit(lambda x, w: x @ w.T), x, w)
    print(f"RESULT {m}x{n}x{k} tile_n={tile_n} steps={steps} debug={debug!r}: {2*m*n*k/t/1e12:.0f} TFLOPS ({t*1e6:.0f} us), bf16 dot {2*m*n*k/tb/1e12:.0f} TFLOPS, diff={diff:.2e}", flush=True)

if __name__ == "__main__":
    if len(sys.argv) > 1:
        m, n, k, tile_n, steps = map(int, sys.argv[1:6]); one(m, n, k, tile_n, steps, sys.argv[6] if len(sys.argv) > 6 else "")
        sys.exit(0)
    cases = [l.split() for l in os.environ["PROBE_CASES"].split(";")]
    for case in cases:
        r = subprocess.run([sys.executable, __file__, *case], capture_output=True, text=True, timeout=120)
        lines = [l for l in r.stdout.splitlines() if l.startswith("RESULT")]
        err = [l for l in r.stderr.splitlines() if "Error" in l or "error" in l][:3]
        print(case, "rc", r.returncode, *(lines or err), flush=True)
