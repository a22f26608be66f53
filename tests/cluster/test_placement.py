"""Resource plans per role and the request split over engines."""
from cluster.placement import Node, balance_requests, plan_placement, unplaceable
from conf.schema import NodeSelectorConfig


def test_gpu_plan_gives_every_learner_rank_a_gpu_and_each_engine_its_tp_gpus():
    plan = plan_placement(device="cuda", learner_world_size=2, num_engines=3, tensor_parallel_size=2)
    assert plan.learner_bundles == [{"GPU": 1, "CPU": 1}] * 2
    assert plan.engine_bundles == [{"GPU": 2, "CPU": 1}] * 3


def test_cpu_plan_asks_for_no_gpu():
    plan = plan_placement(device="cpu", learner_world_size=1, num_engines=2, tensor_parallel_size=1)
    assert plan.learner_bundles == [{"CPU": 1}] and plan.engine_bundles == [{"CPU": 1}] * 2


def test_requests_go_to_the_engine_with_fewest_outstanding_tokens():
    # largest first: 900 -> e0; 500 -> e1; 400 -> e1 (500 < 900); 300 -> e0 (900 = 900, lower id wins)
    shares = balance_requests([300, 900, 400, 500], 2)
    loads = [sum([300, 900, 400, 500][i] for i in share) for share in shares]
    assert shares == [[0, 1], [2, 3]] and loads == [1200, 900]


def test_equal_requests_split_evenly_and_every_request_is_assigned_once():
    shares = balance_requests([100] * 7, 3)
    assert sorted(len(s) for s in shares) == [2, 2, 3]
    assert sorted(i for s in shares for i in s) == list(range(7))


def test_vllm_engines_on_a_cpu_node_bind_to_cores_of_their_own():
    from cluster.roles import engine_cpu_cores

    assert engine_cpu_cores(0, 1, cores=2) is None  # one engine: vLLM's own choice
    assert [engine_cpu_cores(i, 2, cores=2) for i in range(2)] == ["0", "1"]
    assert [engine_cpu_cores(i, 2, cores=8) for i in range(2)] == ["0-3", "4-7"]
    assert [engine_cpu_cores(i, 3, cores=2) for i in range(3)] == ["0", "1", "0"]


def test_learner_ranks_on_a_gpu_node_share_its_cores_less_one_per_engine():
    from cluster.placement import learner_threads

    assert learner_threads(16, learners_on_node=2, engines_on_node=2) == 7  # the H200 box of conf=polaris
    assert learner_threads(128, learners_on_node=4, engines_on_node=0) == 32  # a learner-only node
    assert learner_threads(2, learners_on_node=4, engines_on_node=4) == 1  # never below one


def test_node_selectors_add_their_custom_resources_to_every_bundle_and_keep_their_labels():
    plan = plan_placement(device="cuda", learner_world_size=2, num_engines=1, tensor_parallel_size=2,
                          learner_nodes=NodeSelectorConfig(labels={"polaris-role": "learner"}),
                          engine_nodes=NodeSelectorConfig(resources={"rollout_slot": 1.0}))
    assert plan.learner_bundles == [{"GPU": 1, "CPU": 1}] * 2 and plan.learner_labels == {"polaris-role": "learner"}
    assert plan.engine_bundles == [{"GPU": 2, "CPU": 1, "rollout_slot": 1.0}] and plan.engine_labels == {}


LEARNER_NODE = Node("127.0.0.2", {"polaris-role": "learner"}, {"CPU": 8, "GPU": 2})
ROLLOUT_NODE = Node("127.0.0.3", {"polaris-role": "rollout"}, {"CPU": 8, "GPU": 4, "rollout_slot": 2})


def labelled_plan(learners=2, engines=2, **kwargs):
    return plan_placement(device="cuda", learner_world_size=learners, num_engines=engines, tensor_parallel_size=1,
                          learner_nodes=NodeSelectorConfig(labels={"polaris-role": "learner"}),
                          engine_nodes=NodeSelectorConfig(labels={"polaris-role": "rollout"}, **kwargs))


def test_roles_that_fit_their_labelled_nodes_pass():
    assert unplaceable(labelled_plan(), [LEARNER_NODE, ROLLOUT_NODE]) == []
    assert unplaceable(labelled_plan(resources={"rollout_slot": 1.0}), [LEARNER_NODE, ROLLOUT_NODE]) == []


def test_a_role_that_fits_nowhere_is_refused_with_the_numbers():
    [problem] = unplaceable(labelled_plan(learners=3), [LEARNER_NODE, ROLLOUT_NODE])
    assert problem == ("placement.learner: 3 learner rank(s) of {GPU: 1, CPU: 1} each on nodes labelled "
                       "{polaris-role: learner}: 1 node(s) match (127.0.0.2 {GPU: 2, CPU: 8}), room for 2")
    [problem] = unplaceable(labelled_plan(resources={"rollout_slot": 1.0}, engines=3), [LEARNER_NODE, ROLLOUT_NODE])
    assert problem.startswith("placement.engines: 3 engine(s)") and problem.endswith("room for 2")
    # a label no live node carries: nothing matches (the worker node gone, or a typo in the value)
    [problem] = unplaceable(labelled_plan(), [LEARNER_NODE])
    assert problem.endswith("nodes labelled {polaris-role: rollout}: 0 node(s) match, room for 0")


def test_learners_are_placed_first_and_the_engines_get_what_is_left():
    shared = Node("10.0.0.1", {}, {"CPU": 4, "GPU": 3})
    plan = plan_placement(device="cuda", learner_world_size=2, num_engines=2, tensor_parallel_size=1)
    [problem] = unplaceable(plan, [shared])
    assert problem.startswith("placement.engines: 2 engine(s)") and problem.endswith("room for 1")
    assert unplaceable(plan, [shared, Node("10.0.0.2", {}, {"CPU": 4, "GPU": 1})]) == []


def test_nodes_that_share_an_address_keep_their_own_resources():
    """Two nodes of one machine (both on 127.0.0.1, as in tests/cluster/test_two_node.py)."""
    nodes = [Node("127.0.0.1", {"polaris-role": "learner"}, {"CPU": 2}), Node("127.0.0.1", {"polaris-role": "rollout"}, {"CPU": 2})]
    plan = plan_placement(device="cpu", learner_world_size=2, num_engines=2, tensor_parallel_size=1,
                          learner_nodes=NodeSelectorConfig(labels={"polaris-role": "learner"}),
                          engine_nodes=NodeSelectorConfig(labels={"polaris-role": "rollout"}))
    assert unplaceable(plan, nodes) == []
    [problem] = unplaceable(plan, nodes[::-1][:1] + [Node("127.0.0.1", {"polaris-role": "learner"}, {"CPU": 1})])
    assert problem.startswith("placement.learner: 2 learner rank(s)") and problem.endswith("room for 1")
