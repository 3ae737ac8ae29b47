"""EPLB at DeepSeek-V3 size: 58 MoE layers x 256 experts, 288 or 320 physical slots, 32 or 64 GPUs on
8 nodes, Zipf-skewed loads. Times ``sharding.eplb.rebalance_experts`` (vectorised over layers) against a
plain per-layer Python loop of the same algorithm in the same run (both must agree slot for slot), and
reports balancedness (mean / max GPU load) without replication and with EPLB.

    python benchmarks/eplb.py      # writes benchmarks/results/eplb.json
"""

from __future__ import annotations

import json
import pathlib
import time

import numpy as np

from sharding.eplb import no_replication_balancedness, rebalance_experts

LAYERS, EXPERTS, GROUPS, NODES = 58, 256, 8, 8


def zipf_loads(seed: int, exponent: float = 1.0) -> np.ndarray:
    """[58, 256] integer token counts (4096 tokens x top-8 per layer): expert ranks ~ Zipf(exponent),
    shuffled per layer. Integers keep sums exact, so both implementations see identical ties."""
    rng = np.random.default_rng(seed)
    base = 1.0 / np.arange(1, EXPERTS + 1) ** exponent
    return np.round(np.stack([rng.permutation(base) for _ in range(LAYERS)]) * 4096 * 8 / base.sum())


def _pack_loop(weights: list[float], num_packs: int) -> tuple[list[int], list[int]]:
    per_pack = len(weights) // num_packs
    if per_pack == 1:  # one item per pack: EPLB keeps the order
        return list(range(len(weights))), [0] * len(weights)
    loads, counts = [0.0] * num_packs, [0] * num_packs
    pack_of, rank_of = [0] * len(weights), [0] * len(weights)
    for item in sorted(range(len(weights)), key=lambda i: -weights[i]):  # stable: ties keep index order
        pack = min((p for p in range(num_packs) if counts[p] < per_pack), key=lambda p: loads[p])
        pack_of[item], rank_of[item] = pack, counts[pack]
        counts[pack] += 1
        loads[pack] += weights[item]
    return pack_of, rank_of


def _replicate_loop(weights: list[float], num_physical: int):
    counts = [1] * len(weights)
    phy2log, rank = list(range(len(weights))), [0] * len(weights)
    for _ in range(len(weights), num_physical):
        expert = max(range(len(weights)), key=lambda e: weights[e] / counts[e])  # first of equal maxima
        phy2log.append(expert)
        rank.append(counts[expert])
        counts[expert] += 1
    return phy2log, rank, counts


def loop_rebalance(weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int):
    """The same hierarchical algorithm, one layer at a time in plain Python: [L, R] phy2log."""
    group_size, per_node = weight.shape[1] // num_groups, weight.shape[1] // num_nodes
    out = []
    for row in weight.tolist():
        group_loads = [sum(row[g * group_size:(g + 1) * group_size]) for g in range(num_groups)]
        node_of, rank_of = _pack_loop(group_loads, num_nodes)
        mlog2log = [0] * len(row)
        for g in range(num_groups):
            base = (node_of[g] * (num_groups // num_nodes) + rank_of[g]) * group_size
            for i in range(group_size):
                mlog2log[base + i] = g * group_size + i
        layer = [0] * num_physical
        slots_per_node, slots_per_gpu = num_physical // num_nodes, num_physical // num_gpus
        for node in range(num_nodes):
            experts = mlog2log[node * per_node:(node + 1) * per_node]
            node_loads = [row[e] for e in experts]
            phy2mlog, _, counts = _replicate_loop(node_loads, slots_per_node)
            gpu_of, slot_of = _pack_loop([node_loads[m] / counts[m] for m in phy2mlog], num_gpus // num_nodes)
            for phy, mlog in enumerate(phy2mlog):
                layer[node * slots_per_node + gpu_of[phy] * slots_per_gpu + slot_of[phy]] = experts[mlog]
        out.append(layer)
    return np.asarray(out)


def main() -> None:
    results = []
    for replicas, gpus in ((288, 32), (320, 64), (320, 32)):
        loads = zipf_loads(seed=replicas + gpus)
        start = time.perf_counter()
        placement = rebalance_experts(loads, replicas, GROUPS, NODES, gpus, avoid_colocation=False)
        vectorised_s = time.perf_counter() - start
        start = time.perf_counter()
        looped = loop_rebalance(loads, replicas, GROUPS, NODES, gpus)
        loop_s = time.perf_counter() - start
        start = time.perf_counter()
        avoiding = rebalance_experts(loads, replicas, GROUPS, NODES, gpus)
        avoiding_s = time.perf_counter() - start
        row = {"layers": LAYERS, "experts": EXPERTS, "replicas": replicas, "gpus": gpus, "nodes": NODES,
               "vectorised_s": vectorised_s, "loop_s": loop_s, "speedup": loop_s / vectorised_s,
               "same_placement": bool((looped == placement.phy2log).all()),
               "balancedness_no_replication": float(no_replication_balancedness(loads, gpus).mean()),
               "balancedness_eplb": float(placement.balancedness.mean()),
               "balancedness_eplb_no_colocation": float(avoiding.balancedness.mean()),
               "no_colocation_s": avoiding_s}
        results.append(row)
        print(json.dumps(row), flush=True)
    out = pathlib.Path(__file__).resolve().parent / "results" / "eplb.json"
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
