"""The vLLM engine on the tiny model (float32, CPU): it samples per-request-seeded tokens whose
logprobs equal the learner's recomputation, and it takes weights broadcast by a sender process
over the gloo weight group (one or many buckets), refusing a version it did not ask for.

One engine serves the whole module (startup ~20 s). Tests run in file order: the broadcast
tests change the engine's weights and record which weights it holds in `held`.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from actors.engine import Generation, GenerationRequest, SamplingParams
from cluster.netutil import free_port
from cluster.transport import WeightSyncError
from learner.worker import token_logprobs

pytestmark = pytest.mark.slow
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[2]
ROLLOUT = SamplingParams(temperature=1.0, top_p=0.95, top_k=20, repetition_penalty=1.1, max_new_tokens=24)

# A weight sender: rank 0 of a gloo group, sending the tiny model perturbed with each seed of
# its plan as the given version, the way learner rank 0 does (tied embeddings: lm_head.weight too).
SENDER = """
import json, sys, torch
from cluster.transport import make_transport
sys.path.insert(0, "tests/actors")
from test_vllm_engine import perturbed_model
path, port, world, bucket_mb, plan = sys.argv[1], *map(int, sys.argv[2:4]), float(sys.argv[4]), json.loads(sys.argv[5])
transport = make_transport("gloo", "127.0.0.1", port, 0, world, bucket_mb=bucket_mb, timeout_s=120)
for version, seed in plan:
    model = perturbed_model(path, seed)
    named = list(model.named_parameters()) + [("lm_head.weight", model.get_input_embeddings().weight)]
    print("SUMS", json.dumps(transport.send(named, version)), flush=True)
transport.close()
"""


def perturbed_model(path: str, seed: int | None):
    """The tiny model, its weights moved by seeded noise (seed None: as built)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if seed is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in model.named_parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    assert model.config.tie_word_embeddings  # so the sender's lm_head.weight is the perturbed embedding
    return model


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


@pytest.fixture(scope="module")
def engine(tiny_model_path, tokenizer):
    from actors.engine import build_engine

    stop = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id]
    engine = build_engine("vllm", tiny_model_path, dtype=torch.float32, device="cpu", stop_token_ids=stop,
                          pad_token_id=tokenizer.pad_token_id, max_model_len=512, seed=0)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def held():
    return {"seed": None}  # the perturbation seed of the weights the engine holds


def requests(tokenizer, seeds, texts=("Write a story about a lighthouse.", "A tale of two cats.", "The storm.")):
    out = []
    for k, seed in enumerate(seeds):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": texts[k % len(texts)]}],
                                            add_generation_prompt=True, tokenize=True, return_dict=False)
        out.append(GenerationRequest(f"r{k}", tuple(ids), seed))
    return out


def max_logprob_gap(model, reqs, gens, temperature):
    """Largest |engine logprob - learner recomputation| over all sampled tokens."""
    gap = 0.0
    for r, g in zip(reqs, gens):
        ids = torch.tensor([r.prompt_token_ids + g.token_ids])
        with torch.no_grad():
            lp = token_logprobs(model, ids, torch.ones_like(ids), temperature)[0, len(r.prompt_token_ids) - 1:]
        assert lp.shape[0] == len(g.logprobs)
        gap = max(gap, (lp - torch.tensor(g.logprobs)).abs().max().item())
    return gap


def start_sender(path, plan, bucket_mb, world_size):
    port = free_port()
    args = [sys.executable, "-c", SENDER, path, str(port), str(world_size), str(bucket_mb), json.dumps(plan)]
    return port, subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, text=True)


def broadcast(engine, path, plan, bucket_mb, expect, fault=None):
    """Form a new weight group with a sender process, then receive each version of `expect`;
    returns the errors raised (None where the version was applied, its bucket checksums equal to
    the sender's)."""
    port, sender = start_sender(path, plan, bucket_mb, 2)
    errors, received = [], []
    try:
        engine.init_weight_sync("gloo", "127.0.0.1", port, 1, 2, bucket_mb, 60)  # blocks until the sender joins
        for version in expect:
            try:
                received.append(list(engine.receive_weights(version, fault)[0]))
                errors.append(None)
            except WeightSyncError as e:
                errors.append(str(e))
        out, _ = sender.communicate(timeout=120)
        assert sender.returncode == 0
    finally:
        sender.kill()
    sent = [json.loads(line[5:]) for line in out.splitlines() if line.startswith("SUMS ")]
    assert received == [sums for sums, error in zip(sent, errors) if error is None] and all(received)
    return errors


def test_generation_has_tokens_logprobs_and_finish_reasons(engine, tokenizer):
    reqs = requests(tokenizer, [1, 2, 3, 4, 5, 6])
    gens = engine.generate(reqs, ROLLOUT)
    assert [g.request_id for g in gens] == [r.request_id for r in reqs]
    for g in gens:
        assert 0 < len(g.token_ids) == len(g.logprobs) <= ROLLOUT.max_new_tokens
        assert all(-50 < lp <= 0 for lp in g.logprobs)
        if g.finish_reason == "length":
            assert len(g.token_ids) == ROLLOUT.max_new_tokens
        else:
            assert g.finish_reason == "stop" and g.token_ids[-1] in engine.stop_token_ids
    assert len({g.token_ids for g in gens}) > 1


def test_a_seed_gives_the_same_sample_in_any_batch(engine, tokenizer):
    alone = engine.generate(requests(tokenizer, [7]), ROLLOUT)[0]
    batch = requests(tokenizer, [11, 7, 12])
    batch[1] = GenerationRequest("again", requests(tokenizer, [7])[0].prompt_token_ids, 7)
    in_batch = engine.generate(batch, ROLLOUT)[1]
    assert in_batch.token_ids == alone.token_ids
    assert max(abs(a - b) for a, b in zip(in_batch.logprobs, alone.logprobs)) < 1e-5
    other_seed = engine.generate([GenerationRequest("x", batch[1].prompt_token_ids, 8)], ROLLOUT)[0]
    assert other_seed.token_ids != alone.token_ids


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_are_the_learners_at_the_sampling_temperature(engine, tokenizer, tiny_model_path, held, temperature):
    """log_softmax(logits / T) of the sampled token, before top-k/top-p/repetition penalty."""
    sampling = SamplingParams(temperature, ROLLOUT.top_p, ROLLOUT.top_k, ROLLOUT.repetition_penalty, 32)
    reqs = requests(tokenizer, [21, 22, 23])
    gens = engine.generate(reqs, sampling)
    assert max_logprob_gap(perturbed_model(tiny_model_path, held["seed"]), reqs, gens, temperature) < 1e-3


def test_broadcast_in_one_bucket_moves_the_engine(engine, tokenizer, tiny_model_path, held):
    # a long prompt, generated before the update too: its KV blocks sit in the prefix cache,
    # computed with the old weights, and must not be reused after the update
    long = GenerationRequest("long", tuple(tokenizer("a lighthouse keeper " * 100)["input_ids"][:400]), 33)
    reqs = requests(tokenizer, [31, 32]) + [long]
    engine.generate([long], ROLLOUT)
    assert broadcast(engine, tiny_model_path, [[1, 101]], 256, expect=[1]) == [None]
    held["seed"] = 101
    gens = engine.generate(reqs, ROLLOUT)
    assert max_logprob_gap(perturbed_model(tiny_model_path, 101), reqs, gens, 1.0) < 1e-3
    assert max_logprob_gap(perturbed_model(tiny_model_path, None), reqs, gens, 1.0) > 1e-2


def test_broadcast_in_many_buckets_twice(engine, tokenizer, tiny_model_path, held):
    reqs = requests(tokenizer, [41, 42])
    assert broadcast(engine, tiny_model_path, [[1, 102], [2, 103]], 0.05, expect=[1, 2]) == [None, None]
    held["seed"] = 103
    gens = engine.generate(reqs, ROLLOUT)
    assert max_logprob_gap(perturbed_model(tiny_model_path, 103), reqs, gens, 1.0) < 1e-3


def test_the_probe_scores_as_the_learner_and_shows_a_stacked_parameter_loaded_wrong(engine, tokenizer,
                                                                                     tiny_model_path, held):
    """cluster/sync_verify.py's load check on vLLM: gate and up projections swapped on their way
    into the stacked gate_up_proj arrive intact (equal checksums) but score the probe far off."""
    from cluster.sync_faults import SyncFault
    from cluster.sync_verify import PROBE_TOLERANCE, SyncReport, probe_token_ids, verify_sync

    ids = probe_token_ids(tokenizer)

    def reports(seed):
        learner = token_logprobs(perturbed_model(tiny_model_path, seed), torch.tensor([ids]),
                                 torch.ones(1, len(ids), dtype=torch.long), 1.0)[0].tolist()
        return SyncReport(((),), tuple(learner)), [SyncReport(((),), tuple(engine.score_probe(ids, 1.0)))]

    assert verify_sync(1, *reports(held["seed"]), PROBE_TOLERANCE[torch.float32])["sync/probe_gap"] < 1e-4
    assert broadcast(engine, tiny_model_path, [[1, 108]], 1, expect=[1], fault=SyncFault("corrupt_loaded")) == [None]
    with pytest.raises(WeightSyncError, match=r"\(load\): engine 0 scores the probe .* a parameter was loaded wrong"):
        verify_sync(1, *reports(108), PROBE_TOLERANCE[torch.float32])
    assert broadcast(engine, tiny_model_path, [[1, 109]], 1, expect=[1]) == [None]  # a full update mends it
    held["seed"] = 109
    assert verify_sync(1, *reports(109), PROBE_TOLERANCE[torch.float32])["sync/probe_gap"] < 1e-4


def test_a_wrong_version_is_refused_and_the_engine_keeps_its_weights(engine, tokenizer, tiny_model_path, held):
    reqs = requests(tokenizer, [51])
    [error] = broadcast(engine, tiny_model_path, [[3, 104]], 1, expect=[1])  # expects 1, the sender sends 3
    assert "expected weight version 1, sender sent 3" in error
    gens = engine.generate(reqs, ROLLOUT)
    assert max_logprob_gap(perturbed_model(tiny_model_path, held["seed"]), reqs, gens, 1.0) < 1e-3
    # the refused send was drained: the same group carries the next one
    assert broadcast(engine, tiny_model_path, [[3, 104], [1, 105]], 1, expect=[1, 1])[1] is None
    held["seed"] = 105
    gens = engine.generate(reqs, ROLLOUT)
    assert max_logprob_gap(perturbed_model(tiny_model_path, 105), reqs, gens, 1.0) < 1e-3


def test_tensor_parallel_workers_are_one_rank_each(tokenizer, tiny_model_path, monkeypatch):
    """TP=2: both workers join the weight group (ranks 1 and 2 of 3) and reload their shards."""
    from actors.engine import build_engine

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per TP rank (auto wants spare cores)
    stop = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id]
    engine = build_engine("vllm", tiny_model_path, dtype=torch.float32, device="cpu", stop_token_ids=stop,
                          pad_token_id=tokenizer.pad_token_id, max_model_len=256, tensor_parallel_size=2)
    try:
        port, sender = start_sender(tiny_model_path, [[1, 107]], 0.5, 3)
        engine.init_weight_sync("gloo", "127.0.0.1", port, 1, 3, 0.5, 60)
        assert len(engine.receive_weights(1)) == 2  # checksums of each TP worker
        assert sender.wait(timeout=120) == 0
        reqs = requests(tokenizer, [71, 72])
        gens = engine.generate(reqs, ROLLOUT)
        assert max_logprob_gap(perturbed_model(tiny_model_path, 107), reqs, gens, 1.0) < 1e-3
    finally:
        engine.close()

def test_two_engine_actors_receive_one_broadcast(ray_address, tokenizer, tiny_model_path):
    """The cluster/roles.py call pattern: both engines' joins are Ray tasks in flight while the
    sender joins; then both receive version 1 and sample the same tokens for the same seeds."""
    import ray

    from actors.rollout_worker import RolloutWorker

    stop = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id]
    actor = ray.remote(RolloutWorker).options(num_cpus=1)
    workers = [actor.remote("vllm", tiny_model_path, dtype="float32", device="cpu", stop_token_ids=stop,
                            pad_token_id=tokenizer.pad_token_id, num_threads=1) for _ in range(2)]
    try:
        port, sender = start_sender(tiny_model_path, [[1, 106]], 0.5, 3)
        ray.get([w.init_weight_sync.remote("gloo", "127.0.0.1", port, 1 + i, 3, 0.5, 60) for i, w in enumerate(workers)])
        a, b = ray.get([w.receive_weights.remote(1) for w in workers])
        assert a.checksums == b.checksums and ray.get([w.get_weight_version.remote() for w in workers]) == [1, 1]
        assert sender.wait(timeout=120) == 0
        reqs = requests(tokenizer, [61, 62])
        wire = [(r.request_id, 0, r.prompt_token_ids, r.seed) for r in reqs]
        a, b = ray.get([w.generate.remote(wire, ROLLOUT) for w in workers])
        assert [s.response_ids for s in a] == [s.response_ids for s in b]
        assert {s.weight_version for s in a + b} == {1}
        reference = perturbed_model(tiny_model_path, 106)
        as_gens = [Generation(s.uid, s.response_ids, s.logprobs, s.finish_reason) for s in a]
        assert max_logprob_gap(reference, reqs, as_gens, 1.0) < 1e-3
    finally:
        for w in workers:
            ray.kill(w)
