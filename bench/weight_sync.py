"""How close is our weight sync to the floor, and what does verifying it cost? Broadcasts a
~30M-parameter float32 model from learner rank 0 into vLLM engines and compares, in the same run
and on the same processes, with the floor: a plain broadcast of the same bytes over the same
group plus one bare in-place reload of the same weights in one engine (no communication). The
sync runs interleaved three ways: checked (bucket checksums compared), probed (checksums and the
probe scored by the learner and every engine) and unverified (weight_sync.verify=0). sync_s is a
verified sync at the default cadence (weight_sync.verify=N: checksums on every sync, the probe on
every N-th): ((N - 1) x checked + probed) / N.

    .venv/bin/python bench/weight_sync.py [--engines 2] [--hidden 640] [--layers 7] [--repeats 10]

Last line: weight_sync: model_mb=<x> engines=<n> sync_s=<t> floor_s=<f> ratio=<t/f> verify=<N>
           unverified_s=<u> checksum_cost=<checked/u - 1> probe_cost=<probed/checked - 1>
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_model(folder: Path, hidden: int, layers: int) -> str:
    """A random Qwen3 model of the requested size with the tiny model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from learner.tiny_model import build_tiny_model

    tiny = build_tiny_model(show_progress=False)
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    config = Qwen3Config(vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=hidden // 8,
                         intermediate_size=int(hidden * 2.7), max_position_embeddings=1024, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).to(torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def weights_bytes(learner) -> int:
    return sum(t.numel() * t.element_size() for _, t in learner.named_weights())


def send_raw(learner, nbytes: int) -> None:
    import torch

    learner.transport._broadcast_bytes(torch.empty(nbytes, dtype=torch.uint8))


def receive_raw(rollout, nbytes: int) -> None:
    def in_worker(worker, n):
        import torch

        worker._polaris_transport._broadcast_bytes(torch.empty(n, dtype=torch.uint8))

    rollout.engine.llm.collective_rpc(in_worker, args=(nbytes,))


def reload_timed(rollout, model_path: str) -> float:
    """Seconds of one in-place reload from weights already in memory (read outside the timing)."""
    def in_worker(worker, path):
        import time

        from safetensors.torch import load_file

        tensors = load_file(f"{path}/model.safetensors")
        if "lm_head.weight" not in tensors:
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
        start = time.perf_counter()
        worker.reload_weights(weights_iterator=iter(tensors.items()), is_checkpoint_format=True)
        return time.perf_counter() - start

    return rollout.engine.llm.collective_rpc(in_worker, args=(model_path,))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=640)
    parser.add_argument("--layers", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--bucket-mb", type=int, default=16)
    parser.add_argument("--settle-s", type=float, default=0.5,
                        help="idle time before each timed call: every measurement starts from a quiet machine")
    args = parser.parse_args()

    import ray
    from transformers import AutoTokenizer

    from actors.codec import ChatCodec
    from cluster import connect
    from cluster.roles import start_roles
    from conf import load_config

    folder = Path(tempfile.mkdtemp(prefix="polaris-bench-"))
    model_path = build_model(folder, args.hidden, args.layers)
    cfg = load_config(["rollout.engine=vllm", f"rollout.num_engines={args.engines}", f"model.path={model_path}",
                       f"weight_sync.bucket_mb={args.bucket_mb}", "rollout.sampling.max_new_tokens=64"])
    # the floor runs our own functions inside vLLM's workers (collective_rpc with a callable):
    # vLLM only pickles those when told to; a bench-only setting, never set by launch.py
    connect.RUNTIME_ENV["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    connect.connect_ray(cfg)
    codec = ChatCodec(AutoTokenizer.from_pretrained(model_path), enable_thinking=True, max_new_tokens=64)
    roles = start_roles(cfg, model_path=model_path, stop_token_ids=codec.stop_ids,
                        pad_token_id=codec.tok.pad_token_id, judge_base_url="http://127.0.0.1:9", run_name="bench-sync",
                        output_dir=str(folder))
    learner, engines = roles.learners[0], roles.rollouts
    nbytes = ray.get(learner.call.remote(weights_bytes))

    roles.sync_weights()  # warm-up: the first send also carries the metadata
    ray.get([e.call.remote(receive_raw, nbytes) for e in engines] + [learner.call.remote(send_raw, nbytes)])
    checked, unverified = roles.sync, dataclasses.replace(roles.sync, verify=0)
    series: dict[str, list[float]] = {"checked": [], "probed": [], "unverified": [], "broadcast": []}
    for _ in range(args.repeats):  # interleaved, so all see the same background load
        for name, settings, probe in (("checked", checked, False), ("probed", checked, True),
                                      ("unverified", unverified, False)):
            roles.sync = settings
            time.sleep(args.settle_s)
            start = time.perf_counter()
            roles.push_weights(roles.weight_version + 1, probe=probe)
            series[name].append(time.perf_counter() - start)
        time.sleep(args.settle_s)
        start = time.perf_counter()
        ray.get([e.call.remote(receive_raw, nbytes) for e in engines] + [learner.call.remote(send_raw, nbytes)])
        series["broadcast"].append(time.perf_counter() - start)
    reload_s = statistics.median(ray.get(engines[0].call.remote(reload_timed, model_path)) for _ in range(args.repeats))
    roles.shutdown()

    median = {name: statistics.median(times) for name, times in series.items()}
    every = cfg.weight_sync.verify  # the default cadence: checksums on every sync, the probe on every N-th
    sync_s = (median["checked"] * (every - 1) + median["probed"]) / every if every else median["unverified"]
    floor_s = median["broadcast"] + reload_s
    print("; ".join(f"{name} {[round(t, 3) for t in times]} s" for name, times in series.items()),
          f"; bare reload {reload_s:.3f} s")
    print(f"weight_sync: model_mb={nbytes / 2**20:.1f} engines={args.engines} sync_s={sync_s:.3f} "
          f"floor_s={floor_s:.3f} ratio={sync_s / floor_s:.2f} verify={every} unverified_s={median['unverified']:.3f} "
          f"checksum_cost={median['checked'] / median['unverified'] - 1:.3f} "
          f"probe_cost={median['probed'] / median['checked'] - 1:.3f}")


if __name__ == "__main__":
    main()
