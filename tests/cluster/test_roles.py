"""The roles on a real Ray cluster: engine logprobs equal the learner's (fp32) before and after a
weight broadcast, the broadcast really moves the engine, and a version jump is refused."""
import dataclasses

import pytest
import ray
from transformers import AutoTokenizer

from actors.codec import ChatCodec
from actors.data import load_prompts
from actors.engine import SamplingParams
from cluster.roles import start_roles
from cluster.transport import WeightSyncError
from conf import load_config
from learner.worker import TrainBatch, TrainRow

pytestmark = pytest.mark.slow


def max_abs_diff(samples, learner_logprobs):
    diffs = [abs(a - b) for s, lp in zip(samples, learner_logprobs) for a, b in zip(s.logprobs, lp)]
    assert sum(len(s.logprobs) for s in samples) == len(diffs)
    return max(diffs)


def started(overrides, tiny_model_path, tmp_path, max_new_tokens):
    """(config, roles, sampling at max_new_tokens, requests for the first prompts of the tiny
    validation set: two samples each of three)."""
    cfg = load_config(["learner.lr=1e-3", f"rollout.sampling.max_new_tokens={max_new_tokens}", "judge.num_workers=1",
                       *overrides])  # one reward worker: these tests judge nothing
    codec = ChatCodec(AutoTokenizer.from_pretrained(tiny_model_path), enable_thinking=True,
                      max_new_tokens=max_new_tokens)
    roles = start_roles(cfg, model_path=tiny_model_path, stop_token_ids=codec.stop_ids,
                        pad_token_id=codec.tok.pad_token_id, judge_base_url="http://127.0.0.1:9",
                        run_name=tmp_path.name, output_dir=str(tmp_path))
    prompts = load_prompts("data/tiny/val.jsonl", require_reference=False)[:3]
    requests = [(p.uid, i, codec.prompt_ids(p), 100 * k + i) for k, p in enumerate(prompts) for i in range(2)]
    s = cfg.rollout.sampling
    return cfg, roles, SamplingParams(s.temperature, s.top_p, s.top_k, s.repetition_penalty, max_new_tokens), requests


def test_engine_and_learner_logprobs_agree_across_a_broadcast(ray_address, tiny_model_path, tmp_path):
    cfg, roles, sampling, requests = started([], tiny_model_path, tmp_path, 48)
    try:

        samples = roles.generate(requests, sampling)
        assert {x.weight_version for x in samples} == {0}
        rows = [TrainRow(x.prompt_ids, x.response_ids, 1.0 if i % 2 else -1.0, False) for i, x in enumerate(samples)]
        assert max_abs_diff(samples, roles.learner_logprobs(rows)) < 1e-4

        roles.train(TrainBatch(tuple(rows), step=0))
        # the learner moved, the engine has not heard yet: the same check now fails
        assert max_abs_diff(samples, roles.learner_logprobs(rows)) > 1e-3

        assert roles.sync_weights() == 1
        assert ray.get([w.get_weight_version.remote() for w in roles.rollouts]) == [1] * cfg.rollout.num_engines
        fresh = roles.generate(requests, sampling)
        assert {x.weight_version for x in fresh} == {1}
        fresh_rows = [TrainRow(x.prompt_ids, x.response_ids, 0.0, False) for x in fresh]
        assert max_abs_diff(fresh, roles.learner_logprobs(fresh_rows)) < 1e-4

        with pytest.raises(WeightSyncError, match="refusing to jump"):
            ray.get(roles.rollouts[0].receive_weights.remote(5))

        # a group re-formed on a new port (as after an engine replacement) carries the next update
        roles.train(TrainBatch(tuple(rows), step=1))
        assert max_abs_diff(fresh, roles.learner_logprobs(fresh_rows)) > 1e-3
        roles.reform_weight_group(cfg)
        assert roles.sync_weights() == 2
        again = roles.generate(requests, sampling)
        assert {x.weight_version for x in again} == {2}
        again_rows = [TrainRow(x.prompt_ids, x.response_ids, 0.0, False) for x in again]
        assert max_abs_diff(again, roles.learner_logprobs(again_rows)) < 1e-4
    finally:
        roles.shutdown()


def test_a_bucket_corrupted_in_transit_and_a_parameter_loaded_wrong_are_both_caught(ray_address, tiny_model_path,
                                                                                   tmp_path):
    """weight_sync.fault strikes the sync of v1 (one bit of bucket 2 flipped on the engine's link)
    and of v2 (layer 0's gate and up projections swapped on their way into the engine): each
    sync raises naming the part, and the recovery's re-send is verified clean."""
    cfg, roles, sampling, requests = started(["weight_sync.verify=1", "weight_sync.bucket_mb=1",  # probe every sync
                                              "weight_sync.fault.kind=corrupt_bucket", "weight_sync.fault.after_bucket=2"],
                                             tiny_model_path, tmp_path, 16)
    try:
        for version, part in ((1, r"\(transport\): engine 0 shard 0 received bucket 2 of \d+"),
                              (2, r"\(load\): engine 0 scores the probe .* nats per token away")):
            samples = roles.generate(requests, sampling)
            rows = [TrainRow(x.prompt_ids, x.response_ids, 1.0 if i % 2 else -1.0, False) for i, x in enumerate(samples)]
            roles.train(TrainBatch(tuple(rows), step=version - 1))
            with pytest.raises(WeightSyncError, match=f"weight sync v{version} failed verification {part}"):
                roles.sync_weights()
            assert roles.weight_version == version - 1
            assert roles.recover_engines(cfg, version=version) == version  # re-sent, verified: no fault this time
            assert roles.last_sync["sync/verified"] == 1 and roles.last_sync["sync/probe_gap"] < 1e-4
            roles.sync = dataclasses.replace(roles.sync, fault=dataclasses.replace(
                roles.sync.fault, kind="corrupt_loaded", version=2))
        assert ray.get([w.get_weight_version.remote() for w in roles.rollouts]) == [2] * cfg.rollout.num_engines
    finally:
        roles.shutdown()
