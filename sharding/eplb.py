"""EPLB: the expert-parallel load balancer (DeepSeek's, vectorised over layers in NumPy).

Heavily loaded experts get redundant replicas, and the replicas are packed onto GPUs so every GPU
carries a similar load. Hierarchical policy (when expert groups divide evenly over nodes):
  Step 1: pack expert groups onto nodes, balancing the nodes' loads;
  Step 2: within each node, replicate its experts into the node's physical slots;
  Step 3: pack the node's replicas onto its GPUs, balancing the GPUs' loads.
The global policy is the same with one group and one node. Beyond the original: no two replicas of an
expert share a GPU when avoidable; a previous placement can be kept or re-aligned so few expert weights
move; every placement reports its balancedness (mean / max GPU load, 1 is perfect).

Ties break deterministically: stable sorts, and the lowest index among equal choices.
"""

from __future__ import annotations

import dataclasses

import numpy as np


COLOCATION_MARGIN = 0.01  # balancedness a layer may give up to keep replicas of an expert on distinct GPUs


def _check_divides(divisor: int, value: int, divisor_name: str, value_name: str) -> None:
    if divisor <= 0 or value % divisor:
        raise ValueError(f"{divisor_name}: {divisor} must be positive and divide {value_name}={value}")


def balanced_packing(weight: np.ndarray, num_packs: int, *, conflict: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Packs n weighted items into ``num_packs`` packs of n / num_packs items, greedily: heaviest item
    first, into the lightest pack that has room (and, with ``conflict``, holds no item of the same key).

    Args:
      weight: [X, n] item weights for X independent rows.
      conflict: optional [X, n] int keys; items with equal keys avoid sharing a pack when possible.
    Returns:
      (pack_index [X, n], rank_in_pack [X, n]) int64.
    """
    rows, n = weight.shape
    per_pack = n // num_packs
    if per_pack == 1 and conflict is None:
        return np.tile(np.arange(n), (rows, 1)), np.zeros((rows, n), np.int64)
    order = np.argsort(-weight, axis=1, kind="stable")  # [X, n] heaviest first
    loads = np.zeros((rows, num_packs))
    counts = np.zeros((rows, num_packs), np.int64)
    pack_index = np.zeros((rows, n), np.int64)
    rank_in_pack = np.zeros((rows, n), np.int64)
    row = np.arange(rows)
    if conflict is not None:
        keys_in_pack = np.zeros((rows, num_packs, int(conflict.max()) + 1), bool)
    for item in order.T:  # [X] the i-th heaviest item of every row
        candidates = np.where(counts < per_pack, loads, np.inf)  # [X, packs]
        if conflict is not None:
            clash = keys_in_pack[row, :, conflict[row, item]]  # [X, packs]
            free = np.where(clash, np.inf, candidates)
            candidates = np.where(np.isfinite(free).any(1, keepdims=True), free, candidates)
            keys_in_pack[row, np.argmin(candidates, 1), conflict[row, item]] = True
        pack = np.argmin(candidates, axis=1)  # lowest index among equally light packs
        pack_index[row, item] = pack
        rank_in_pack[row, item] = counts[row, pack]
        counts[row, pack] += 1
        loads[row, pack] += weight[row, item]
    return pack_index, rank_in_pack


def replicate_experts(weight: np.ndarray, num_physical: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Adds replicas one at a time to the expert with the highest load per replica.

    Args:
      weight: [X, num_logical] loads.
    Returns:
      (phy2log [X, num_physical], replica rank of each physical slot [X, num_physical],
       logcnt [X, num_logical] replicas per logical expert).
    """
    rows, num_logical = weight.shape
    phy2log = np.tile(np.arange(num_physical), (rows, 1))
    rank = np.zeros((rows, num_physical), np.int64)
    logcnt = np.ones((rows, num_logical), np.int64)
    row = np.arange(rows)
    for slot in range(num_logical, num_physical):
        expert = np.argmax(weight / logcnt, axis=1)  # [X]
        phy2log[:, slot] = expert
        rank[:, slot] = logcnt[row, expert]
        logcnt[row, expert] += 1
    return phy2log, rank, logcnt


def _inverse(permutation: np.ndarray) -> np.ndarray:
    """Row-wise inverse of [X, n] permutations."""
    inverse = np.empty_like(permutation)
    np.put_along_axis(inverse, permutation, np.arange(permutation.shape[1])[None].repeat(len(permutation), 0), 1)
    return inverse


def rebalance_experts_hierarchical(weight: np.ndarray, num_physical: int, num_groups: int, num_nodes: int,
                                   num_gpus: int, *, avoid_colocation: bool = True
                                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[L, E] loads -> (phy2log [L, R], replica rank [L, R], logcnt [L, E])."""
    layers, num_logical = weight.shape
    group_size = num_logical // num_groups
    groups_per_node = num_groups // num_nodes
    gpus_per_node = num_gpus // num_nodes
    slots_per_gpu = num_physical // num_gpus
    logical_per_node = num_logical // num_nodes

    # Step 1: pack groups to nodes. "mlog" numbers experts node-major: node 0's experts first.
    tokens_per_group = weight.reshape(layers, num_groups, group_size).sum(-1)  # [L, groups]
    group_pack, group_rank = balanced_packing(tokens_per_group, num_nodes)
    log2mlog = (((group_pack * groups_per_node + group_rank) * group_size)[..., None]
                + np.arange(group_size)).reshape(layers, num_logical)  # [L, E]
    mlog2log = _inverse(log2mlog)

    # Step 2: replicate experts within each node, into num_physical / num_nodes slots per node.
    tokens_per_mlog = np.take_along_axis(weight, mlog2log, 1).reshape(layers * num_nodes, logical_per_node)
    phy2mlog, phy_rank, mlogcnt = replicate_experts(tokens_per_mlog, num_physical // num_nodes)

    # Step 3: pack each node's replicas onto its GPUs by per-replica load.
    tokens_per_phy = np.take_along_axis(tokens_per_mlog / mlogcnt, phy2mlog, 1)  # [L * nodes, R / nodes]
    pack, rank_in_pack = balanced_packing(tokens_per_phy, gpus_per_node,
                                          conflict=phy2mlog if avoid_colocation else None)
    phy2pphy = pack * slots_per_gpu + rank_in_pack
    pphy2phy = _inverse(phy2pphy)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, 1)  # [L * nodes, R / nodes]
    node_offset = (np.arange(num_nodes) * logical_per_node)[None, :, None]
    pphy2mlog = (pphy2mlog.reshape(layers, num_nodes, -1) + node_offset).reshape(layers, -1)
    pphy2log = np.take_along_axis(mlog2log, pphy2mlog, 1)  # [L, R]
    pphy_rank = np.take_along_axis(phy_rank, pphy2phy, 1).reshape(layers, -1)
    logcnt = np.take_along_axis(mlogcnt.reshape(layers, -1), log2mlog, 1)
    return pphy2log, pphy_rank, logcnt


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where every physical expert slot lives and what it holds. Unpacks like the original's result:
    ``phy2log, log2phy, logcnt = rebalance_experts(...)``."""

    phy2log: np.ndarray  # [L, R] logical expert of each physical slot; slot s lives on GPU s // (R / gpus)
    log2phy: np.ndarray  # [L, E, max_replicas] physical slots of each logical expert, padded with -1
    logcnt: np.ndarray  # [L, E] replicas per logical expert
    gpu_load: np.ndarray  # [L, gpus] load per GPU, each replica carrying load / logcnt of its expert
    balancedness: np.ndarray  # [L] mean / max GPU load
    moved_slots: int = 0  # physical slots whose expert changed against the previous placement

    def __iter__(self):
        return iter((self.phy2log, self.log2phy, self.logcnt))

    @property
    def num_gpus(self) -> int:
        return self.gpu_load.shape[1]

    def gpu_of_slot(self) -> np.ndarray:
        """[R] the GPU (expert-parallel rank) of each physical slot."""
        slots = self.phy2log.shape[1]
        return np.arange(slots) // (slots // self.num_gpus)


def gpu_loads(weight: np.ndarray, phy2log: np.ndarray, logcnt: np.ndarray, num_gpus: int) -> np.ndarray:
    """[L, E] loads and a placement -> [L, num_gpus] load of each GPU."""
    per_replica = weight / logcnt
    slot_load = np.take_along_axis(per_replica, phy2log, 1)  # [L, R]
    return slot_load.reshape(weight.shape[0], num_gpus, -1).sum(-1)


def balancedness(loads: np.ndarray) -> np.ndarray:
    """[L, gpus] -> [L] mean / max load (1 when perfectly balanced; 1 for an all-zero layer)."""
    peak = loads.max(-1)
    return np.where(peak > 0, loads.mean(-1) / np.where(peak > 0, peak, 1), 1.0)


def _log2phy(phy2log: np.ndarray, rank: np.ndarray, logcnt: np.ndarray) -> np.ndarray:
    layers, num_logical = logcnt.shape
    width = int(logcnt.max())
    table = np.full((layers, num_logical * width), -1, np.int64)
    np.put_along_axis(table, phy2log * width + rank, np.arange(phy2log.shape[1])[None].repeat(layers, 0), 1)
    return table.reshape(layers, num_logical, width)


def _align_to_previous(phy2log: np.ndarray, previous: np.ndarray, num_gpus: int, num_nodes: int) -> np.ndarray:
    """Relabels GPUs within each node and slots within each GPU so that as many slots as possible keep
    the expert they already hold (greedy matching by overlap); the load per GPU does not change."""
    layers, slots = phy2log.shape
    per_gpu = slots // num_gpus
    gpus_per_node = num_gpus // num_nodes
    aligned = phy2log.copy()
    for layer in range(layers):
        new = phy2log[layer].reshape(num_gpus, per_gpu)
        old = previous[layer].reshape(num_gpus, per_gpu)
        result = np.empty_like(new)
        for node in range(num_nodes):
            gpus = range(node * gpus_per_node, (node + 1) * gpus_per_node)
            overlap = {(g, h): len(np.intersect1d(new[g], old[h])) for g in gpus for h in gpus}
            free_new, free_old = set(gpus), set(gpus)
            for (g, h), _ in sorted(overlap.items(), key=lambda item: (-item[1], item[0])):
                if g in free_new and h in free_old:
                    free_new.discard(g)
                    free_old.discard(h)
                    result[h] = _keep_slots(new[g], old[h])
        aligned[layer] = result.reshape(-1)
    return aligned


def _keep_slots(experts: np.ndarray, old: np.ndarray) -> np.ndarray:
    """Orders one GPU's experts so each one the GPU already held stays in its old slot."""
    out = np.full_like(experts, -1)
    remaining = list(experts)
    for slot, expert in enumerate(old):
        if expert in remaining:
            out[slot] = expert
            remaining.remove(expert)
    out[out == -1] = remaining
    return out


def rebalance_experts(weight, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int, *,
                      previous: np.ndarray | None = None, min_improvement: float = 0.02,
                      avoid_colocation: bool = True) -> Placement:
    """Places ``num_replicas`` physical experts per layer on ``num_gpus`` GPUs.

    Args:
      weight: [L, E] load statistics of every logical expert (e.g. tokens routed), non-negative.
      num_replicas: physical experts per layer, a multiple of num_gpus, >= E.
      num_groups: expert groups (hierarchical policy when num_nodes divides it, else global).
      num_nodes: server nodes; num_gpus: GPUs in all, a multiple of num_nodes.
      previous: [L, R] phy2log of the current placement. Layers whose balancedness would improve by less
        than ``min_improvement`` keep it; the others are re-aligned to it so few weights move.
      avoid_colocation: keep two replicas of one expert off one GPU when another choice exists, unless
        the greedy placement without that rule is more balanced by more than COLOCATION_MARGIN.
    Every layer's placement is at least as balanced as leaving each expert, unreplicated, on GPU
    e // (E / gpus) (when gpus divides E): that layout, with spare slots holding replicas of a GPU's own
    experts, is a candidate too.
    Returns:
      Placement (unpacks to phy2log [L, R], log2phy [L, E, max_replicas] padded with -1, logcnt [L, E]).
    """
    weight = np.asarray(weight, np.float64)
    if weight.ndim != 2:
        raise ValueError(f"weight: expected [layers, experts], got shape {weight.shape}")
    if (weight < 0).any() or not np.isfinite(weight).all():
        raise ValueError("weight: loads must be finite and non-negative")
    layers, num_logical = weight.shape
    _check_divides(num_nodes, num_gpus, "num_nodes", "num_gpus")
    _check_divides(num_gpus, num_replicas, "num_gpus", "num_replicas")
    if num_replicas < num_logical:
        raise ValueError(f"num_replicas: {num_replicas} must be >= the {num_logical} logical experts")
    _check_divides(num_groups, num_logical, "num_groups", "the number of experts")
    if num_groups % num_nodes == 0:
        groups, nodes = num_groups, num_nodes
    else:  # global policy: one group, one node
        groups, nodes = 1, 1
    phy2log, rank, logcnt = rebalance_experts_hierarchical(weight, num_replicas, groups, nodes, num_gpus,
                                                           avoid_colocation=avoid_colocation)
    if avoid_colocation:  # the greedy placement that ignores colocation, if avoiding it costs > 1% balance
        alternative = rebalance_experts_hierarchical(weight, num_replicas, groups, nodes, num_gpus,
                                                     avoid_colocation=False)
        phy2log, rank, logcnt = _best_per_layer(weight, num_gpus, (phy2log, rank, logcnt), alternative,
                                                margin=COLOCATION_MARGIN)
    if num_logical % num_gpus == 0:  # never worse than leaving the experts where they are
        phy2log, rank, logcnt = _best_per_layer(weight, num_gpus, (phy2log, rank, logcnt),
                                                _in_place_layout(weight, num_replicas, num_gpus))
    moved = 0
    if previous is not None:
        previous = np.asarray(previous)
        if previous.shape != phy2log.shape:
            raise ValueError(f"previous: expected phy2log of shape {phy2log.shape}, got {previous.shape}")
        old_cnt = np.stack([np.bincount(p, minlength=num_logical) for p in previous])
        old_balance = balancedness(gpu_loads(weight, previous, np.maximum(old_cnt, 1), num_gpus))
        new_balance = balancedness(gpu_loads(weight, phy2log, logcnt, num_gpus))
        keep = (new_balance - old_balance < min_improvement) & (old_cnt > 0).all(1)
        phy2log = np.where(keep[:, None], previous, _align_to_previous(phy2log, previous, num_gpus, nodes))
        logcnt = np.stack([np.bincount(p, minlength=num_logical) for p in phy2log])
        rank = _replica_ranks(phy2log)
        moved = int((phy2log != previous).sum())
    loads = gpu_loads(weight, phy2log, logcnt, num_gpus)
    return Placement(phy2log, _log2phy(phy2log, rank, logcnt), logcnt, loads, balancedness(loads), moved)


def _in_place_layout(weight: np.ndarray, num_replicas: int, num_gpus: int):
    """Every expert on GPU e // (E / gpus), the spare slots of a GPU filled with replicas of its own
    heaviest experts: GPU loads equal those without any replication."""
    layers, num_logical = weight.shape
    per_gpu, experts_per_gpu = num_replicas // num_gpus, num_logical // num_gpus
    phy2log = np.zeros((layers, num_replicas), np.int64)
    for gpu in range(num_gpus):
        own = np.arange(gpu * experts_per_gpu, (gpu + 1) * experts_per_gpu)
        by_load = own[np.argsort(-weight[:, own], axis=1, kind="stable")]  # [L, experts_per_gpu]
        spare = by_load[:, np.arange(per_gpu - experts_per_gpu) % experts_per_gpu]
        phy2log[:, gpu * per_gpu:(gpu + 1) * per_gpu] = np.concatenate([np.tile(own, (layers, 1)), spare], 1)
    logcnt = np.stack([np.bincount(p, minlength=num_logical) for p in phy2log])
    return phy2log, _replica_ranks(phy2log), logcnt


def _best_per_layer(weight: np.ndarray, num_gpus: int, preferred, alternative, margin: float = 1e-12):
    """Per layer, ``alternative`` where its balancedness beats ``preferred``'s by more than ``margin``."""
    scores = [balancedness(gpu_loads(weight, candidate[0], candidate[2], num_gpus))
              for candidate in (preferred, alternative)]
    take = (scores[1] > scores[0] + margin)[:, None]
    return tuple(np.where(take, b, a) for a, b in zip(preferred, alternative))


def _replica_ranks(phy2log: np.ndarray) -> np.ndarray:
    """[L, R] -> [L, R] 0, 1, ... numbering the replicas of each expert in slot order."""
    ranks = np.zeros_like(phy2log)
    for layer, row in enumerate(phy2log):
        seen: dict[int, int] = {}
        for slot, expert in enumerate(row):
            ranks[layer, slot] = seen.get(int(expert), 0)
            seen[int(expert)] = ranks[layer, slot] + 1
    return ranks


def no_replication_balancedness(weight: np.ndarray, num_gpus: int) -> np.ndarray:
    """[L] balancedness of the plain layout: expert e on GPU e // (E / gpus), one replica each."""
    weight = np.asarray(weight, np.float64)
    return balancedness(weight.reshape(weight.shape[0], num_gpus, -1).sum(-1))


__all__ = ["rebalance_experts", "Placement", "balancedness", "gpu_loads", "no_replication_balancedness"]
