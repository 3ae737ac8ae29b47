"""The 3FS KV-cache store (``storage.kvcache.ThreeFSPrefixStore``): time to first token with and without a
prefix hit, and the store's write and read rates for DeepSeek-V3-sized FP8 pages.

* **TTFT**: the ``tiny`` preset model (random weights), prompts of a 512-token shared prefix plus a 16-token
  suffix, one new token each (``Generator.generate``, compilation done before timing). "miss": a prefix
  never seen (a full prefill, then the store writes its 8 blocks); "hit": a stored prefix with a new suffix
  (the 512 rows read from the store, 16 tokens computed). Median over the rounds.
* **pages**: 64-token blocks of DeepSeek-V3's FP8 rows (61 layers x 656 bytes a token: 2.56 MB a block),
  a chain of 8 (quick) or 32 blocks stored and looked up, on an embedded 3FS against the same store on a
  local directory (POSIX files). MB/s = 1e6 bytes/s of rows.

Called by ``benchmarks/storage_adapters.py`` (``bench_kvcache``); alone::

    python benchmarks/adapters_kvcache.py [--quick]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from storage.kvcache import ThreeFSPrefixStore  # noqa: E402
from storage.location import open_location  # noqa: E402

PREFIX, SUFFIX = 512, 16
V3_LAYERS, V3_FP8_ROW = 61, 656


def _ttft(work_dir: pathlib.Path, rounds: int) -> dict:
    import jax
    from flax import nnx

    from jaxseek.generate import Generator, SamplingConfig, cache_fingerprint
    from jaxseek.model.transformer import Transformer
    from jaxseek.presets import get_preset

    model = Transformer(get_preset("tiny")[0], rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    sampling = SamplingConfig(max_new_tokens=1)
    with ThreeFSPrefixStore(f"3fs+embedded://{work_dir}/ttft", capacity_bytes=1 << 30,
                            fingerprint=cache_fingerprint(model)) as store:
        generator = Generator(model, num_blocks=32, max_blocks_per_seq=16, prefix_store=store)
        prompt = lambda prefix: prefix + list(rng.integers(0, 256, SUFFIX))  # noqa: E731
        fresh = lambda: list(rng.integers(0, 256, PREFIX))  # noqa: E731
        shared = fresh()
        generator.generate([prompt(shared)], sampling)  # compiles the full prefill, stores the prefix
        generator.generate([prompt(shared)], sampling)  # compiles the suffix-only prefill
        times = {"miss": [], "hit": []}
        for _ in range(rounds):
            for kind, prefix in (("miss", fresh()), ("hit", shared)):
                before = generator.prefill_tokens_reused
                start = time.perf_counter()
                jax.block_until_ready(generator.generate([prompt(prefix)], sampling))
                times[kind].append(time.perf_counter() - start)
                assert (generator.prefill_tokens_reused - before) == (PREFIX if kind == "hit" else 0)
    hit, miss = statistics.median(times["hit"]), statistics.median(times["miss"])
    return {"operation": f"time to first token, {PREFIX}-token prefix + {SUFFIX} (tiny model, CPU)",
            "adapter": "prefix hit (ThreeFSPrefixStore, embedded 3FS)", "peer": "no hit: full prefill + store",
            "seconds": hit, "peer_seconds": miss, "ratio": miss / hit}


def _pages(work_dir: pathlib.Path, blocks: int, rounds: int) -> list[dict]:
    rng = np.random.default_rng(1)
    rows = rng.integers(0, 256, (V3_LAYERS, blocks * 64, V3_FP8_ROW), dtype=np.uint8)
    megabytes = rows.nbytes / 1e6
    rates: dict[str, dict[str, float]] = {}
    for name, url in (("3fs", f"3fs+embedded://{work_dir}/pages3fs"), ("posix", str(work_dir / "pages_posix"))):
        location = open_location(url, create=True)
        try:
            samples = {"store": [], "lookup": []}
            for round_ in range(rounds):
                store = ThreeFSPrefixStore(location.child(f"r{round_}"), capacity_bytes=1 << 34, fingerprint="v3")
                tokens = tuple(int(t) for t in rng.integers(0, 256, blocks * 64))
                start = time.perf_counter()
                store.store(tokens, rows)
                samples["store"].append(time.perf_counter() - start)
                start = time.perf_counter()
                n, got = store.lookup(tokens)
                samples["lookup"].append(time.perf_counter() - start)
                assert n == blocks * 64 and np.array_equal(got, rows)
            rates[name] = {op: megabytes / statistics.median(s) for op, s in samples.items()}
        finally:
            location.close()
    return [{"operation": f"KV pages {op} ({blocks} blocks of 64 DeepSeek-V3 FP8 rows, {megabytes:.0f} MB)",
             "adapter": "ThreeFSPrefixStore on embedded 3FS", "peer": "the same store on a local directory",
             "MB/s": rates["3fs"][op], "peer_MB/s": rates["posix"][op], "ratio": rates["3fs"][op] / rates["posix"][op]}
            for op in ("store", "lookup")]


def bench_kvcache(work_dir: pathlib.Path, *, quick: bool, console) -> list[dict]:
    """Rows {"operation", "adapter", "peer", "seconds"/"MB/s", peer's, "ratio"} (ratio > 1: ours is faster)."""
    work_dir = pathlib.Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    rows = [_ttft(work_dir, rounds=3 if quick else 7)]
    rows += _pages(work_dir, blocks=8 if quick else 32, rounds=2 if quick else 3)
    for row in rows:
        value = f"{row['seconds'] * 1e3:.1f} ms vs {row['peer_seconds'] * 1e3:.1f} ms" if "seconds" in row else \
            f"{row['MB/s']:.0f} MB/s vs {row['peer_MB/s']:.0f} MB/s"
        console.print(f"{row['operation']}: {value} ({row['adapter']} vs {row['peer']}), ratio {row['ratio']:.2f}")
    return rows


if __name__ == "__main__":
    from rich.console import Console

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_kvcache_") as tmp:
        bench_kvcache(pathlib.Path(tmp), quick=args.quick, console=Console())
