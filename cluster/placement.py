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
from dataclasses import dataclass, field

from conf.schema import NodeSelectorConfig


@dataclass(frozen=True)
class PlacementPlan:
    learner_bundles: list[dict[str, float]]
    engine_bundles: list[dict[str, float]]
    learner_labels: dict[str, str] = field(default_factory=dict)  # the node labels each role's bundles need
    engine_labels: dict[str, str] = field(default_factory=dict)


def plan_placement(*, device: str, learner_world_size: int, num_engines: int, tensor_parallel_size: int,
                   learner_nodes: NodeSelectorConfig | None = None,
                   engine_nodes: NodeSelectorConfig | None = None) -> PlacementPlan:
    """learner_nodes / engine_nodes: the nodes each role may use (config placement.*): their custom
    resources join every bundle of the role, their labels select its nodes."""
    learner_nodes, engine_nodes = learner_nodes or NodeSelectorConfig(), engine_nodes or NodeSelectorConfig()
    # CPU: a core's worth of logical CPU each; the roles take turns, so torch uses every core
    learner_gpus, engine_gpus = ({"GPU": 1}, {"GPU": tensor_parallel_size}) if device == "cuda" else ({}, {})
    learner = [{**learner_gpus, "CPU": 1, **learner_nodes.resources} for _ in range(learner_world_size)]
    engines = [{**engine_gpus, "CPU": 1, **engine_nodes.resources} for _ in range(num_engines)]
    return PlacementPlan(learner, engines, dict(learner_nodes.labels), dict(engine_nodes.labels))


@dataclass(frozen=True)
class Node:
    """What placement needs of a live Ray node (ray.nodes()): its address, labels and total resources."""
    address: str
    labels: dict[str, str]
    resources: dict[str, float]

    @classmethod
    def from_ray(cls, node: dict) -> Node:
        return cls(node["NodeManagerAddress"], dict(node.get("Labels") or {}), dict(node["Resources"]))


def live_nodes() -> list[Node]:
    import ray

    return [Node.from_ray(n) for n in ray.nodes() if n["Alive"]]


def unplaceable(plan: PlacementPlan, nodes: Sequence[Node]) -> list[str]:
    """Why each role cannot fit on these nodes, with the numbers; empty when both fit. Learners are
    packed first, then the engines into what is left, each bundle whole on one node with matching
    labels (as Ray places bundles). Totals, not what is free now: a busy cluster waits in reserve()."""
    free = [dict(n.resources) for n in nodes]  # by position: nodes on one machine share an address
    problems = []
    for role, key, bundles, labels in (("learner rank", "placement.learner", plan.learner_bundles, plan.learner_labels),
                                       ("engine", "placement.engines", plan.engine_bundles, plan.engine_labels)):
        matching = [i for i, n in enumerate(nodes) if all(n.labels.get(k) == v for k, v in labels.items())]
        placed = 0
        for bundle in bundles:
            node = next((i for i in matching if all(free[i].get(r, 0) >= a for r, a in bundle.items())), None)
            if node is None:
                continue
            placed += 1
            for r, a in bundle.items():
                free[node][r] -= a
        if placed < len(bundles):
            where = f"nodes labelled {_fmt(labels)}" if labels else "the cluster's nodes"
            offered = "; ".join(f"{nodes[i].address} {_fmt(_relevant(nodes[i].resources, bundles[0]))}" for i in matching)
            problems.append(f"{key}: {len(bundles)} {role}(s) of {_fmt(bundles[0])} each on {where}: "
                            f"{len(matching)} node(s) match{' (' + offered + ')' if offered else ''}, room for {placed}")
    return problems


def _relevant(resources: dict[str, float], bundle: dict[str, float]) -> dict[str, float]:
    return {r: resources.get(r, 0) for r in bundle}


def _fmt(mapping: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" if isinstance(v, float) else f"{k}: {v}" for k, v in mapping.items()) + "}"


@dataclass
class Placement:
    learner_group: object | None  # ray.util.placement_group.PlacementGroup; None: no learner (mode=eval)
    engine_group: object | None  # None: no engines (the learner ranks alone)
    plan: PlacementPlan | None = None

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
        engine_nodes = list(placement_group_table(self.engine_group)["bundles_to_node_id"].values()) \
            if self.engine_group is not None else []
        return [learner_threads(nodes.get(node, 1), learner_nodes.count(node), engine_nodes.count(node))
                for node in learner_nodes]

    def node_ids(self) -> dict[str, str]:
        """The Ray node of each learner rank and engine ("node/learner-0": its hex id), as placed now."""
        from ray.util.placement_group import placement_group_table

        nodes = {}
        for role, group in (("learner", self.learner_group), ("rollout", self.engine_group)):
            if group is not None:
                placed = placement_group_table(group)["bundles_to_node_id"]
                nodes.update({f"node/{role}-{i}": node for i, node in sorted(placed.items())})
        return nodes

    def engines_unplaceable(self) -> list[str]:
        """Why the engines could not all be placed on the nodes alive now (after a node was lost:
        Ray re-places the lost bundles only where their labels and resources allow); empty if they can."""
        return [p for p in unplaceable(self.plan, live_nodes()) if p.startswith("placement.engines")] if self.plan else []

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

    problems = unplaceable(plan, live_nodes())
    if problems:
        raise EnvironmentSetupError("the run fits nowhere on this cluster: " + "; ".join(problems))
    learner = placement_group(plan.learner_bundles, strategy="PACK", name=f"{name}/learner",
                              bundle_label_selector=_selectors(plan.learner_labels, plan.learner_bundles)) \
        if plan.learner_bundles else None
    engines = placement_group(plan.engine_bundles, strategy="SPREAD", name=f"{name}/engines",
                              bundle_label_selector=_selectors(plan.engine_labels, plan.engine_bundles)) \
        if plan.engine_bundles else None
    groups = [g.ready() for g in (learner, engines) if g is not None]
    ready, _ = ray.wait(groups, num_returns=len(groups), timeout=timeout_s)
    if len(ready) < len(groups):
        raise EnvironmentSetupError(
            f"the cluster cannot place the run within {timeout_s:.0f}s: learner needs {plan.learner_bundles}, "
            f"engines need {plan.engine_bundles}; cluster has {ray.cluster_resources()}")
    return Placement(learner, engines, plan)


def _selectors(labels: dict[str, str], bundles: list) -> list[dict[str, str]] | None:
    return [dict(labels) for _ in bundles] if labels else None


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
