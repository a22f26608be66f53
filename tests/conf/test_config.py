"""The config system: setups, overrides, and one clear error per bad key or value."""
import pytest

from conf import ConfigError, available_confs, load_config, to_yaml


def test_default_is_tiny_on_cpu():
    c = load_config([])
    assert c.model.path == "tiny" and c.trainer.device == "cpu" and c.judge.backend == "local"
    assert c.rollout.engine == "hf" and c.rollout.n == 6


def test_polaris_reproduces_the_original_run():
    c = load_config(["conf=polaris"])
    assert c.model.path == "Qwen/Qwen3.5-9B"
    assert (c.trainer.total_steps, c.data.prompts_per_step, c.rollout.n) == (160, 8, 6)
    assert c.algorithm.hri.enable and (c.algorithm.hri.peak_weight, c.algorithm.hri.warmup_steps) == (0.4, 15)
    assert c.algorithm.hri.decay_steps == 0
    assert (c.learner.lr, c.learner.warmup_steps, c.learner.lr_schedule, c.learner.grad_clip) == (1e-6, 0, "constant", 1.0)
    assert (c.algorithm.clip_low, c.algorithm.clip_high) == (0.20, 0.28)
    s = c.rollout.sampling
    assert (s.temperature, s.top_p, s.top_k, s.repetition_penalty, s.max_new_tokens) == (1.0, 0.95, 20, 1.10, 8192)
    assert c.rollout.val_sampling.temperature == 0.8
    assert (c.data.max_prompt_tokens, c.reward.score_mode) == (256, "sum")
    assert (c.trainer.save_every, c.trainer.eval_every) == (5, 20)
    assert c.model.gradient_checkpointing and c.model.enable_thinking
    assert (c.judge.model, c.judge.temperature, c.judge.top_p, c.judge.service_tier) == (
        "gemini-3-flash-preview", 0.2, 0.9, "flex")
    w, v = c.reward.weights, c.reward.val_weights
    assert (w.self_rep, w.length, w.blank) == (1.5, 0.8, 1.0) and (v.self_rep, v.length, v.blank) == (0.8, 0.2, 1.0)


def test_no_hri_variant_inherits_polaris():
    c = load_config(["conf=polaris_no_hri"])
    assert not c.algorithm.hri.enable and c.rollout.n == 6 and c.model.path == "Qwen/Qwen3.5-9B"
    assert c.trainer.output_dir == "outputs/polaris_no_hri"


def test_overrides_apply_in_any_position():
    c = load_config(["rollout.n=4", "conf=polaris", "algorithm.hri.enable=false"])
    assert c.rollout.n == 4 and not c.algorithm.hri.enable and c.model.path == "Qwen/Qwen3.5-9B"


def test_resolved_config_round_trips_as_yaml():
    text = to_yaml(load_config(["trainer.total_steps=7"]))
    assert "total_steps: 7" in text


def test_setups_are_listed():
    assert {"tiny", "polaris", "polaris_no_hri"} <= set(available_confs())


BAD = [
    # (argv, words the one-line message must contain)
    (["rollout.fo=1"], ["rollout.fo", "valid keys under rollout", "engine"]),
    (["trainer.totl_steps=3"], ["trainer.totl_steps", "did you mean 'total_steps'"]),
    (["nope=1"], ["'nope'", "valid keys under the top level", "trainer"]),
    (["rollout.n=six"], ["rollout.n", "six"]),
    (["trainer.total_steps=1.5"], ["trainer.total_steps"]),
    (["conf=nosuch"], ["nosuch", "polaris, polaris_no_hri, tiny"]),
    (["conf=tiny", "conf=polaris"], ["conf= given 2 times"]),
    (["algorithm.clip_low=0.3", "algorithm.clip_high=0.2"], ["algorithm.clip_high", "algorithm.clip_low"]),
    (["learner.lr=-1e-6"], ["learner.lr", ">= 0"]),
    (["rollout.n=2"], ["rollout.n", "policy row"]),
    (["rollout.n=1", "algorithm.hri.enable=false"], ["rollout.n"]),
    (["rollout.engine=sglang"], ["rollout.engine", "hf, vllm"]),
    (["judge.backend=claude"], ["judge.backend", "local, gemini, openai"]),
    (["judge.num_workers=0"], ["judge.num_workers", ">= 1"]),
    (["judge.rpm=-5"], ["judge.rpm", ">= 0"]),
    (["judge.local.fault_rate=1.5"], ["judge.local.fault_rate", "[0, 1]"]),
    (["judge.local.latency_min_s=2", "judge.local.latency_max_s=1"], ["judge.local.latency_max_s"]),
    (["judge.thinking_level=extreme"], ["judge.thinking_level", "medium"]),
    (["judge.order=random"], ["judge.order", "deadline, fifo"]),
    (["judge.local.capacity=[48,0]"], ["judge.local.capacity", "[48, 0]", ">= 1"]),
    (["judge.local.shed_factor=0.5"], ["judge.local.shed_factor", ">= 1"]),
    (["eval.judge.initial_in_flight=0"], ["eval.judge.initial_in_flight", ">= 1"]),
    (["judge.retry_budget=-0.1"], ["judge.retry_budget", ">= 0"]),
    (["rollout.sampling.top_p=1.5"], ["rollout.sampling.top_p"]),
    (["learner.zero_stage=4"], ["learner.zero_stage"]),
    (["trainer.total_steps=0"], ["trainer.total_steps"]),
    (["model.dtype=int8"], ["model.dtype"]),
    (["rollout.n"], ["rollout.n", "key=value"]),
    (["trainer.device=cpu", "weight_sync.backend=nccl"], ["weight_sync.backend", "cuda"]),
    (["algorithm.kl_coef=0.1"], ["algorithm.kl_coef", "removed: it never had an effect"]),
    (["data.val_path=data/tiny/val.jsonl"], ["data.val_path", "removed: use eval.prompts_path"]),
    (["eval.judge.budget_usd=5"], ["eval.judge.budget_usd", "removed: it never had an effect", "judge.budget_usd"]),
    (["learner.lr_schedule=exponential"], ["learner.lr_schedule", "constant, linear, cosine"]),
    (["learner.min_lr_ratio=2"], ["learner.min_lr_ratio", "[0, 1]"]),
    (["learner.optimizer=sgd"], ["learner.optimizer", "auto, torch_adamw, cpu_adam"]),
    (["learner.optimizer=cpu_adam"], ["learner.optimizer", "learner.offload_optimizer=true"]),
    (["weight_sync.timeout_s=0"], ["weight_sync.timeout_s", "> 0"]),
    (["weight_sync.verify=-1"], ["weight_sync.verify", "N = first and every N-th"]),
    (["weight_sync.fault.kind=explode"], ["weight_sync.fault.kind", "engine_dies", "learner_dies"]),
    (["rollout.num_engines=1", "weight_sync.fault.kind=engine_dies", "weight_sync.fault.engine=1"],
     ["weight_sync.fault.engine", "0..0"]),
    (["placement.learner.labels.-role=a"], ["placement.learner.labels", "'-role'", "Ray label key"]),
    (["placement.engines.labels.role=a b"], ["placement.engines.labels.role", "'a b'", "Ray label value"]),
    (["placement.engines.labels={ray.io/node-id: x}"], ["placement.engines.labels", "ray.io/"]),
    (["placement.engines.labels.example.com/role=x"], ["placement.engines.labels.example",
                                                       "placement.engines.labels={example.NAME: VALUE}"]),
    (["placement.learner.resources.GPU=1"], ["placement.learner.resources", "'GPU'", "custom one"]),
    (["placement.engines.resources.rollout_slot=0"], ["placement.engines.resources.rollout_slot", "> 0"]),
]


@pytest.mark.parametrize("argv,words", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_config_names_the_culprit(argv, words):
    with pytest.raises(ConfigError) as err:
        load_config(argv)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_rollout_n_three_is_enough_with_hri_and_two_without():
    assert load_config(["rollout.n=3"]).rollout.n == 3
    assert load_config(["rollout.n=2", "algorithm.hri.enable=false"]).rollout.n == 2


def test_negative_judge_addressed_penalty_is_refused():
    with pytest.raises(ConfigError) as err:
        load_config(["reward.judge_addressed_penalty=-0.5"])
    assert "reward.judge_addressed_penalty" in str(err.value) and ">= 0" in str(err.value)
    assert load_config(["reward.judge_addressed_penalty=0"]).reward.judge_addressed_penalty == 0.0


def test_a_removed_key_in_a_yaml_file_is_named_with_its_reason(tmp_path):
    conf = tmp_path / "old.yaml"
    conf.write_text("base: tiny\nalgorithm:\n  kl_coef: 0.0\n")
    with pytest.raises(ConfigError) as err:
        load_config([f"conf={conf}"])
    assert str(err.value) == (f"{conf}: config key 'algorithm.kl_coef' removed: it never had an effect "
                              "(there is no KL term; the original run has none)")
