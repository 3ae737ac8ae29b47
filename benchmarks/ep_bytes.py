"""Part 1 of ``benchmarks/ep.py``: bytes per token, pure NumPy arithmetic on a DeepSeek-V3-like routing (no
devices): the theoretical minimum, what the fixed-capacity dispatch moves, DeepEP's per-pair count, the
low-latency buffer and the bytes that cross nodes flat vs hierarchical."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from sharding.ep.hierarchical import inter_node_bytes
from sharding.ep.low_latency import message_bytes
from sharding.ep.normal import expanded_rows, pair_capacity

CAPACITY_FACTORS = (None, 1.0, 1.25, 2.0)  # None = dropless
WIRES = ("bf16", "fp8")


class RoutingShape(NamedTuple):
    ranks: int
    tokens: int  # per rank
    hidden: int
    experts: int = 256
    top_k: int = 8
    groups: int = 8
    topk_group: int = 4


BYTE_SHAPES = (RoutingShape(8, 4096, 7168), RoutingShape(64, 4096, 7168))
MEASURED = RoutingShape(8, 256, 1024)
QUICK = RoutingShape(8, 64, 256)


# --- 1. bytes per token ------------------------------------------------------------------------------

def deepseek_routing(shape: RoutingShape, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[ranks * tokens, top_k] int32 expert ids and float32 weights (token t lives on rank t // tokens).

    Sigmoid of N(0, 1) scores plus a per-expert popularity offset N(0, 0.25^2); the topk_group groups with the
    largest top-2 sums are kept and top_k experts taken inside them (DeepSeek-V3's routing, bias 0)."""
    rng = np.random.default_rng(seed)
    popularity = 0.25 * rng.standard_normal(shape.experts).astype(np.float32)
    per_group = shape.experts // shape.groups
    ids, weights = [], []
    total = shape.ranks * shape.tokens
    for start in range(0, total, 32768):  # chunks keep the [tokens, experts] scores small
        n = min(32768, total - start)
        scores = 1 / (1 + np.exp(-(rng.standard_normal((n, shape.experts), np.float32) + popularity)))
        grouped = scores.reshape(n, shape.groups, per_group)
        group_score = np.sort(grouped, axis=2)[:, :, -2:].sum(2)  # [n, groups]
        dropped_groups = np.argsort(-group_score, axis=1)[:, shape.topk_group:]
        np.put_along_axis(grouped, dropped_groups[:, :, None], -np.inf, axis=1)  # scores is masked in place
        idx = np.argpartition(-scores, shape.top_k, axis=1)[:, :shape.top_k]  # [n, top_k]
        w = np.take_along_axis(scores, idx, axis=1)
        ids.append(idx.astype(np.int32))
        weights.append((w / w.sum(1, keepdims=True)).astype(np.float32))
    return np.concatenate(ids), np.concatenate(weights)


def row_bytes(hidden: int, wire: str) -> int:
    """Payload bytes of one row on the wire: bf16, or e4m3 + one float32 scale per 128 channels."""
    return 2 * hidden if wire == "bf16" else hidden + 4 * (hidden // 128)


def simulate_dispatch(idx: np.ndarray, shape: RoutingShape, capacity_factor: float | None) -> dict:
    """Row counts of ``sharding.ep.normal.dispatch`` for every rank at once (the same capacity, send order
    and drop rules), summed over ranks."""
    r, t, k = shape.ranks, shape.tokens, shape.top_k
    local = shape.experts // r
    dest = np.where(idx >= 0, idx // local, r)  # [R*T, K], r = none
    token = np.repeat(np.arange(r * t), k)
    pairs = np.bincount(token * (r + 1) + dest.ravel(), minlength=r * t * (r + 1)).reshape(r * t, r + 1)[:, :r]
    in_rank = pairs > 0  # [R*T, R] (token, destination rank) copies
    capacity = pair_capacity(t, k, r, capacity_factor)
    position = in_rank.reshape(r, t, r).cumsum(1).reshape(r * t, r) - 1  # order among the source's tokens
    sent = in_rank & (position < capacity)
    received_pairs = (pairs * sent).sum(0)  # [R] (token, expert) pairs each rank receives
    rows = expanded_rows(t, k, r, local, capacity, capacity_factor)
    other = (np.arange(r * t) // t)[:, None] != np.arange(r)[None]  # [R*T, R] destination is another rank
    return {"capacity": capacity, "expanded_rows": rows,
            "dropped": int((pairs * (in_rank & ~sent)).sum() + np.maximum(received_pairs - rows, 0).sum()),
            "pairs": int(pairs.sum()), "min_rows": int((in_rank & other).sum()),
            "useful_rows": int((sent & other).sum()), "buffer_rows": r * (r - 1) * capacity,
            "pair_rows": int((pairs * other).sum())}


def byte_rows(shape: RoutingShape, seed: int = 0) -> list[dict]:
    """One row per (wire, capacity factor): bytes per token of every count in the module docstring."""
    idx, _ = deepseek_routing(shape, seed)
    tokens, out = shape.ranks * shape.tokens, []
    load = np.bincount(idx[idx >= 0], minlength=shape.experts)
    balance = {"expert_load_max_over_mean": float(load.max() / load.mean()),
               "rank_load_max_over_mean": float(load.reshape(shape.ranks, -1).sum(1).max() / load.sum() * shape.ranks)}
    for factor in CAPACITY_FACTORS:
        rows = simulate_dispatch(idx, shape, factor)
        for wire in WIRES:
            payload, meta = row_bytes(shape.hidden, wire), 8 * shape.top_k
            out.append({**shape._asdict(), "wire": wire, "capacity_factor": factor, **rows, **balance,
                        "dropped_fraction": rows["dropped"] / rows["pairs"], "row_bytes": payload,
                        "min_bytes_per_token": rows["min_rows"] * payload / tokens,
                        "useful_bytes_per_token": rows["useful_rows"] * payload / tokens,
                        "buffer_bytes_per_token": rows["buffer_rows"] * (payload + meta) / tokens,
                        "buffer_payload_bytes_per_token": rows["buffer_rows"] * payload / tokens,
                        "deepep_pair_bytes_per_token": rows["pair_rows"] * payload / tokens,
                        "low_latency_buffer_bytes_per_token": low_latency_buffer_bytes(shape, wire),
                        "combine_buffer_bytes_per_token": rows["buffer_rows"] * 2 * shape.hidden / tokens})
    return out


def low_latency_buffer_bytes(shape: RoutingShape, wire: str) -> float:
    """Bytes per token ``low_latency_dispatch``'s ``all_to_all`` moves between ranks with M = tokens per rank:
    the whole [R, L*M] message buffer, (R-1) x L x M messages of ``message_bytes`` (header included)."""
    local = shape.experts // shape.ranks
    return (shape.ranks - 1) * local * message_bytes(shape.hidden, wire == "fp8")


def inter_node_rows(shape: RoutingShape) -> list[dict]:
    """Payload bytes per token that cross nodes in one dispatch (8 ranks a node; 8 ranks: 2 nodes of 4), flat
    (one row per destination rank) against hierarchical (one row per destination node), by
    ``sharding.ep.hierarchical.inter_node_bytes``."""
    nodes = max(2, shape.ranks // 8)
    idx, _ = deepseek_routing(shape)
    out = []
    for wire in WIRES:
        per_token = {kind: float(inter_node_bytes(idx, num_experts=shape.experts, num_nodes=nodes,
                                                  ranks_per_node=shape.ranks // nodes,
                                                  row_bytes=row_bytes(shape.hidden, wire),
                                                  hierarchical=kind == "hierarchical").sum()) / idx.shape[0]
                     for kind in ("flat", "hierarchical")}
        out.append({**shape._asdict(), "nodes": nodes, "wire": wire, "flat_bytes_per_token": per_token["flat"],
                    "hierarchical_bytes_per_token": per_token["hierarchical"]})
    return out
