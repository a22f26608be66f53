"""Where each role runs: Ray placement groups that give learner ranks and engines their own
devices, and the split of requests over engines.

Learner ranks are packed (PACK: one node where they fit, so ZeRO's collectives stay on NVLink);
engines are spread (SPREAD: one engine's failure or a node's loss takes out as little as
possible), each engine's tensor-parallel GPUs in one bundle so they share a node.

The 4-GPU split of conf=polaris (Qwen3.5-9B, responses to 8k-14k tokens): 2 learner GPUs +
2 engines of 1 GPU each. An engine holds 18 GB of bf16 weights and the rest as KV cache
(one 14k-token sequence of a 9B GQA model is well under 2 GB, so 40+ sequences in flight on an
80 GB card). A learner rank under ZeRO-3 over 2 GPUs holds 9 GB of bf16 weights + 9 GB of bf16
gradients; fp32 master weights and Adam moments are 12 bytes/param = 108 GB over 2 ranks =
54 GB each, which leaves too little for 14k-token activations on 80 GB, so the optimizer state
goes to CPU memory (DeepSpeed offload) on that split. With 8 GPUs, 4 learner ranks keep it on
the GPU (27 GB each).
"""
from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PlacementPlan:
    learner_bundles: list[dict[str, float]]
    engine_bundles: list[dict[str, float]]


def plan_placement(*, device: str, learner_world_size: int, num_engines: int, tensor_parallel_size: int) -> PlacementPlan:
    if device == "cuda":
        learner = [{"GPU": 1, "CPU": 1} for _ in range(learner_world_size)]
        engines = [{"GPU": tensor_parallel_size, "CPU": 1} for _ in range(num_engines)]
    else:  # CPU: a core's worth of logical CPU each; the roles take turns, so torch uses every core
        learner = [{"CPU": 1} for _ in range(learner_world_size)]
        engines = [{"CPU": 1} for _ in range(num_engines)]
    return PlacementPlan(learner, engines)


@dataclass
class Placement:
    learner_group: object | None  # ray.util.placement_group.PlacementGroup; None: no learner (mode=eval)
    engine_group: object

    def learner(self, rank: int) -> dict:
        return _strategy(self.learner_group, rank)

    def engine(self, index: int) -> dict:
        return _strategy(self.engine_group, index)

    def learner_threads(self) -> list[int]:
        """CPU threads for each learner rank of a GPU run, from the nodes Ray placed them on."""
        import ray
        from ray.util.placement_group import placement_group_table

        nodes = {n["NodeID"]: int(n["Resources"].get("CPU", 1)) for n in ray.nodes() if n["Alive"]}
        learner_nodes = list(placement_group_table(self.learner_group)["bundles_to_node_id"].values())
        engine_nodes = list(placement_group_table(self.engine_group)["bundles_to_node_id"].values())
        return [learner_threads(nodes.get(node, 1), learner_nodes.count(node), engine_nodes.count(node))
                for node in learner_nodes]

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for group in (self.learner_group, self.engine_group):
            if group is not None:
                remove_placement_group(group)


def reserve(plan: PlacementPlan, *, name: str, timeout_s: float = 120.0) -> Placement:
    """Reserve every role's resources at once, or fail with what could not be placed."""
    import ray
    from ray.util.placement_group import placement_group

    from conf.errors import EnvironmentSetupError

    learner = placement_group(plan.learner_bundles, strategy="PACK", name=f"{name}/learner") \
        if plan.learner_bundles else None
    engines = placement_group(plan.engine_bundles, strategy="SPREAD", name=f"{name}/engines")
    groups = [g.ready() for g in (learner, engines) if g is not None]
    ready, _ = ray.wait(groups, num_returns=len(groups), timeout=timeout_s)
    if len(ready) < len(groups):
        raise EnvironmentSetupError(
            f"the cluster cannot place the run within {timeout_s:.0f}s: learner needs {plan.learner_bundles}, "
            f"engines need {plan.engine_bundles}; cluster has {ray.cluster_resources()}")
    return Placement(learner, engines)


def learner_threads(node_cpus: int, learners_on_node: int, engines_on_node: int) -> int:
    """Torch and OpenMP threads per learner rank on a GPU node: the node's cores less one per engine
    (its scheduler), shared by the node's ranks. Ray's one logical CPU per actor would otherwise
    set OMP_NUM_THREADS=1, holding the offloaded optimizer step of ~4.5B parameters to one core."""
    return max(1, (node_cpus - engines_on_node) // max(1, learners_on_node))


def _strategy(group, index: int) -> dict:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)}


def balance_requests(costs: Sequence[int], num_engines: int) -> list[list[int]]:
    """Request indices per engine: each request (largest first) goes to the engine with the fewest
    outstanding tokens, so engines finish together even when prompts and budgets differ."""
    load = [(0, e) for e in range(num_engines)]
    shares: list[list[int]] = [[] for _ in range(num_engines)]
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        tokens, engine = heapq.heappop(load)
        shares[engine].append(i)
        heapq.heappush(load, (tokens + costs[i], engine))
    return [sorted(s) for s in shares]
