"""The learner's optimizer step is one token-mean over the whole batch: the same gradient whether
the rows go through one rank or two (ZeRO-3), in one micro-batch or many, with logits chunked or
not, with the optimizer state offloaded or not. Rows sampled by older weights are corrected
towards the engine that sampled them; on-policy rows get a weight of exactly 1."""
import json
import math

import pytest
import ray
import torch
from transformers import AutoTokenizer

from actors.codec import ChatCodec
from actors.data import PromptRecord
from cluster.placement import plan_placement, reserve
from cluster.roles import start_learners
from conf import load_config
from learner.grpo import truncated_importance_weights
from learner.settings import deepspeed_config
from learner.worker import TrainBatch, TrainRow, behaviour_logprobs, combine_rank_metrics, pad_rows

pytestmark = pytest.mark.slow


def random_rows(response_lengths, advantages, seed=0) -> tuple[TrainRow, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(TrainRow(tuple(torch.randint(1, 1000, (5,), generator=g).tolist()),
                          tuple(torch.randint(1, 1000, (n,), generator=g).tolist()), a, False)
                 for n, a in zip(response_lengths, advantages))


def with_engine_logprobs(row: TrainRow, logprobs, policy_lag: int) -> TrainRow:
    return TrainRow(row.prompt_ids, row.response_ids, row.advantage, row.is_reference, tuple(logprobs), policy_lag)


# --- configuration ---


def test_denormals_are_flushed_without_numpy_warning_that_its_smallest_subnormal_is_zero():
    """In a fresh process (the flush is process-wide), with warnings as errors: numpy's float limits,
    which matplotlib and W&B read at the end of every run, come out right and silently."""
    import subprocess
    import sys

    code = ("import numpy as np, torch; from learner.worker import flush_denormals; flush_denormals(); "
            "assert (torch.tensor([1e-40]) * 1.0).item() == 0.0, 'not flushed'; "
            "[str(np.finfo(t)) + str(np.finfo(t).smallest_subnormal) for t in (np.float32, np.float64)]")
    proc = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]

def test_cpu_adam_is_chosen_for_an_offloading_gpu_run_only(learner_settings):
    from learner.settings import resolve_optimizer

    assert resolve_optimizer("auto", device="cuda", offload_optimizer=True) == "cpu_adam"
    assert resolve_optimizer("auto", device="cuda", offload_optimizer=False) == "torch_adamw"
    assert resolve_optimizer("auto", device="cpu", offload_optimizer=True) == "torch_adamw"  # no 90 s build for tiny
    assert resolve_optimizer("torch_adamw", device="cuda", offload_optimizer=True) == "torch_adamw"
    with pytest.raises(ValueError, match="learner.offload_optimizer=true"):
        resolve_optimizer("cpu_adam", device="cuda", offload_optimizer=False)
    # DeepSpeed takes our torch AdamW for an offloaded state only when told to
    ds = {o: deepspeed_config(learner_settings(offload_optimizer=True, optimizer=o)) for o in ("torch_adamw", "cpu_adam")}
    assert ds["torch_adamw"]["zero_force_ds_cpu_optimizer"] is False and ds["cpu_adam"]["zero_force_ds_cpu_optimizer"] is True


def test_offload_is_refused_where_the_zero_stage_cannot_do_it(learner_settings):
    settings = learner_settings
    with pytest.raises(ValueError, match="learner.offload_optimizer"):
        deepspeed_config(settings(zero_stage=0, offload_optimizer=True))
    with pytest.raises(ValueError, match="learner.offload_params"):
        deepspeed_config(settings(zero_stage=2, offload_params=True))
    zero = deepspeed_config(settings(zero_stage=3, offload_optimizer=True, offload_params=True))["zero_optimization"]
    assert zero == {"stage": 3, "offload_optimizer": {"device": "cpu"}, "offload_param": {"device": "cpu"}}


# --- off-policy correction ---

def test_only_policy_rows_sampled_by_older_weights_carry_the_engine_logprobs():
    prompt = (1, 2)
    rows = [
        TrainRow(prompt, (3, 4, 5), 1.0, False, (-1.0, -2.0, -3.0)),  # on-policy: lag 0
        TrainRow(prompt, (3, 4), 1.0, False, (-5.0, -0.5), policy_lag=2),  # off-policy
        TrainRow(prompt, (3, 4, 5), 1.0, True),  # the reference row: teacher forced
        TrainRow(prompt, (3,), 1.0, False, policy_lag=1),  # no engine logprobs to correct with
    ]
    mask = pad_rows(rows, 0)["response_mask"]
    learner = -torch.rand(mask.shape, generator=torch.Generator().manual_seed(0)) - 1.0
    behaviour, off_policy = behaviour_logprobs(rows, learner, mask)

    assert off_policy.tolist() == [False, True, False, False]
    weights, capped = truncated_importance_weights(learner, behaviour, mask, 2.0)
    on_policy = weights[[0, 2, 3]][mask[[0, 2, 3]]]
    assert on_policy.mean().item() == 1.0 and on_policy.max().item() == 1.0  # exactly
    lag_row = weights[1][mask[1]]
    expected = [min(math.exp(learner[1, 1 + j].item() - b), 2.0) for j, b in enumerate((-5.0, -0.5))]
    assert lag_row.tolist() == pytest.approx(expected, rel=1e-6)
    assert capped[1][mask[1]].tolist() == [True, False]  # exp(-1.x + 5) > 2


@pytest.fixture(scope="module")
def frozen_worker(build_worker):
    """lr 0: train_step computes the loss, metrics and gradient norm but keeps the weights."""
    return build_worker(lr=0.0, logprob_chunk_tokens=16, max_tokens_per_micro_batch=128)


def test_on_policy_rows_take_the_same_step_whatever_the_engine_reported(frozen_worker):
    rows = random_rows([20, 12, 7], [1.0, -0.5, 0.25])
    learner = frozen_worker.compute_logprobs(list(rows))
    noisy = tuple(with_engine_logprobs(r, [x + 0.3 for x in lp], policy_lag=0) for r, lp in zip(rows, learner))

    plain = frozen_worker.train_step(TrainBatch(rows, step=1))
    reported = frozen_worker.train_step(TrainBatch(noisy, step=1))

    assert (reported["loss"], reported["grad_norm"]) == (plain["loss"], plain["grad_norm"])  # bit for bit
    metrics = combine_rank_metrics([reported])
    assert (metrics["tis_ratio_mean"], metrics["tis_ratio_max"], metrics["tis_clipped_fraction"]) == (1.0, 1.0, 0.0)
    assert metrics["engine_learner_kl"] == pytest.approx(0.3, abs=1e-5)
    assert metrics["logprob_diff"] == pytest.approx(0.3, abs=1e-5)


def test_off_policy_rows_are_weighted_by_the_truncated_importance_ratio(frozen_worker):
    off_row, on_row = random_rows([20, 12], [1.0, 0.0], seed=1)
    learner = frozen_worker.compute_logprobs([off_row, on_row])
    # engine = learner + delta, so each token's weight is min(exp(-delta), 2): 2 (cut from e^2), e^-0.5, 1, e^-1
    deltas = [-2.0, 0.5, 0.0, 1.0] * 5
    batch = TrainBatch((with_engine_logprobs(off_row, [x + d for x, d in zip(learner[0], deltas)], policy_lag=1),
                        with_engine_logprobs(on_row, [x + 0.3 for x in learner[1]], policy_lag=0)), step=1)

    metrics = combine_rank_metrics([frozen_worker.train_step(batch)])

    weights = [2.0, math.exp(-0.5), 1.0, math.exp(-1.0)]
    # A = 1 on the off-policy row, 0 on the other; the PPO ratio is 1: the loss is -sum(w) / all tokens
    assert metrics["loss"] == pytest.approx(-5 * sum(weights) / 32, rel=1e-5)
    # over the 20 off-policy tokens only
    assert metrics["tis_ratio_mean"] == pytest.approx(sum(weights) / 4, rel=1e-5)
    assert metrics["tis_ratio_max"] == 2.0
    assert metrics["tis_clipped_fraction"] == 0.25
    # over all 32 sampled tokens: mean(engine - learner) and mean |engine - learner|
    assert metrics["engine_learner_kl"] == pytest.approx((5 * -0.5 + 12 * 0.3) / 32, abs=1e-5)
    assert metrics["logprob_diff"] == pytest.approx((5 * 3.5 + 12 * 0.3) / 32, abs=1e-5)


# --- the learning rate ---

def test_the_step_trains_at_the_scheduled_learning_rate(build_worker):
    """Step 0 of a 2-step warmup trains at half the rate. Adam's first update is lr x g / |g| per
    parameter (no weight decay here), so the whole update is exactly half the constant rate's."""
    rows = random_rows([12, 7], [1.0, -1.0], seed=4)
    lrs, updates = {}, {}
    for name, schedule in {"constant": {}, "warmup": {"warmup_steps": 2, "total_steps": 10}}.items():
        worker = build_worker(lr=1e-3, **schedule)
        before = [p.detach().clone() for p in worker.policy.parameters()]
        lrs[name] = worker.train_step(TrainBatch(rows, step=0))["lr"]
        updates[name] = torch.cat([(p.detach() - b).flatten() for p, b in zip(worker.policy.parameters(), before)])
    assert lrs == {"constant": 1e-3, "warmup": 5e-4}
    assert updates["constant"].abs().max() > 0
    # to float32 rounding of the weights (~6e-8 here), against updates of up to 5e-4
    assert torch.allclose(updates["warmup"], 0.5 * updates["constant"], rtol=0, atol=2e-7)


# --- one step, however it is computed ---

@pytest.fixture(scope="module")
def reference_step(build_worker):
    """ZeRO-2, full logits, two rows per micro-batch: the step the variants below must match."""
    rows = random_rows([30, 21, 12, 7, 3], [1.0, -1.0, 0.5, -0.5, 0.2], seed=2)
    worker = build_worker(zero_stage=2)
    metrics = worker.train_step(TrainBatch(rows, step=1))
    return rows, metrics, worker.compute_logprobs(list(rows))


@pytest.mark.parametrize("variant", [
    {"zero_stage": 1, "offload_optimizer": True},
    {"zero_stage": 2, "offload_optimizer": True, "gradient_checkpointing": True},
    {"zero_stage": 3, "offload_optimizer": True, "offload_params": True, "gradient_checkpointing": True},
    # what learner.optimizer=auto picks for an offloading GPU run (its C++ op builds once, ~90 s)
    {"zero_stage": 3, "offload_optimizer": True, "offload_params": True, "optimizer": "cpu_adam"},
], ids=["zero1-offload", "zero2-offload-ckpt", "zero3-offload-all-ckpt", "zero3-offload-cpu-adam"])
def test_chunked_logits_token_budgets_and_offload_take_the_same_step(build_worker, reference_step, variant):
    """Every variant against torch AdamW on ZeRO-2 without offload, DeepSpeed's CPU Adam included."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    rows, expected, expected_logprobs = reference_step
    worker = build_worker(logprob_chunk_tokens=8, max_tokens_per_micro_batch=40, **variant)
    optimizer = worker.engine.optimizer
    assert getattr(optimizer, "cpu_offload", None) or getattr(optimizer, "offload_optimizer", None)
    stepped_by = DeepSpeedCPUAdam if variant.get("optimizer") == "cpu_adam" else torch.optim.AdamW
    assert type(worker.engine.basic_optimizer) is stepped_by

    metrics = worker.train_step(TrainBatch(rows, step=1))

    assert metrics["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert metrics["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-5)
    assert expected["grad_norm"] > 1.0  # the clip bit: the update depends on the norm too
    for got, want in zip(worker.compute_logprobs(list(rows)), expected_logprobs):  # the same update
        assert got == pytest.approx(want, rel=1e-5)


def test_the_qwen3_5_shaped_model_takes_the_same_step_under_zero_1_and_zero_3(build_worker, tiny35_model_path):
    """Gated DeltaNet and gated full attention through DeepSpeed: ZeRO-1, and ZeRO-3 with everything
    offloaded and checkpointing, give the same loss, gradient norm and updated weights; the weights
    the learner sends are the model's own, under their vLLM checkpoint names."""
    rows = random_rows([30, 21, 12, 7], [1.0, -1.0, 0.5, -0.5], seed=5)
    steps = {}
    for stage, extra in [(1, {}), (3, {"offload_optimizer": True, "offload_params": True,
                                       "gradient_checkpointing": True})]:
        worker = build_worker(model_path=tiny35_model_path, zero_stage=stage, logprob_chunk_tokens=8,
                              checkpoint_names=True, **extra)
        metrics = worker.train_step(TrainBatch(rows, step=1))
        sent = {name: tuple(t.shape) for name, t in worker.named_weights()}
        steps[stage] = metrics, worker.compute_logprobs(list(rows)), sent
    (m1, lp1, sent1), (m3, lp3, sent3) = steps[1], steps[3]
    assert m3["loss"] == pytest.approx(m1["loss"], rel=1e-5) and m3["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-5)
    for got, want in zip(lp3, lp1):  # the linear attention's chunked recurrence adds float32 noise ~1.5e-5
        assert got == pytest.approx(want, rel=1e-4)
    assert sent3 == sent1 and "model.language_model.layers.0.linear_attn.A_log" in sent1
    assert sent1["model.language_model.layers.0.linear_attn.conv1d.weight"][1] == 1  # [conv_dim, 1, kernel]
    assert "lm_head.weight" in sent1 and len(sent1) == 1 + sum(1 for _ in model_parameter_names(tiny35_model_path))


def model_parameter_names(model_path):
    """The model's parameter names but its head's (every one is sent, the head too)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    return [n for n, _ in model.named_parameters() if n != "lm_head.weight"]


def batch_from_stories(tokenizer_path):
    codec = ChatCodec(AutoTokenizer.from_pretrained(tokenizer_path), enable_thinking=True, max_new_tokens=256)
    rows = []
    lines = open("data/tiny/val.jsonl").read().splitlines()[:6]
    for i, line in enumerate(lines):
        r = json.loads(line)
        record = PromptRecord(r["uid"], ({"role": "user", "content": r["prompt"]},), r["target_word_count"],
                              r["story"], r["ground_truth_reasoning"])
        # responses of very different lengths, one teacher-forced reference row
        response = codec.reference(record).ids[: 40 + 30 * i]
        rows.append(TrainRow(codec.prompt_ids(record), response, (-1.0) ** i * (0.5 + 0.1 * i), i == 5))
    return codec, TrainBatch(tuple(rows), step=3)


def test_one_rank_and_two_ranks_take_the_same_step(ray_address, tiny_model_path, tmp_path):
    codec, batch = batch_from_stories(tiny_model_path)  # rows of 80 to 216 tokens
    variants = {
        "1 rank, one micro-batch": ["learner.world_size=1", "learner.zero_stage=1", "learner.micro_batch_size=16"],
        "1 rank, a row per micro-batch": ["learner.world_size=1", "learner.zero_stage=1", "learner.micro_batch_size=1"],
        "2 ranks, ZeRO-3": ["learner.world_size=2", "learner.zero_stage=3", "learner.micro_batch_size=2"],
        # ranks' micro-batches differ in width (216 vs 201 tokens, an empty one vs 80): they must
        # still call the ZeRO-3-gathered head equally often
        "2 ranks, ZeRO-3, token budget, chunked logits": [
            "learner.world_size=2", "learner.zero_stage=3", "learner.max_tokens_per_micro_batch=300",
            "learner.logprob_chunk_tokens=16"],
    }
    results = {}
    for i, (name, overrides) in enumerate(variants.items()):  # the learner ranks alone: no engine, no judge
        cfg = load_config(overrides)
        placement = reserve(plan_placement(device="cpu", learner_world_size=cfg.learner.world_size, num_engines=0,
                                           tensor_parallel_size=1), name=f"split-{i}")
        learners = start_learners(cfg, tiny_model_path, pad_token_id=codec.tok.pad_token_id, run_name=f"split-{i}",
                                  placement=placement)
        try:
            results[name] = combine_rank_metrics(ray.get([rank.train_step.remote(batch) for rank in learners]))
        finally:
            for rank in learners:
                ray.kill(rank)
            placement.remove()
    reference = results["1 rank, one micro-batch"]
    for name, metrics in results.items():
        assert metrics["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4), name
        assert metrics["loss"] == pytest.approx(reference["loss"], rel=1e-4, abs=1e-7), name
    assert reference["grad_norm"] > 0
