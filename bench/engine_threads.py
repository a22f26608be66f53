"""Why conf=tiny runs two one-thread engines: one step's generation (conf=tiny's first 8 prompts x 6
samples, its sampling) by one HF engine on every core against the same requests split between
one-thread engines running side by side (cluster/roles.py balance_requests, one process each),
first alone, then beside a process that wakes every 5 ms and spins 0.4 ms (~7% of a core: about
what Ray's agents, the idle actors and the driver take together during a generation).

    .venv/bin/python bench/engine_threads.py [--repeats 3] [key=value ...]

No Ray: plain processes (multiprocessing, spawn), each building its engine, generating once to
warm up, then `--repeats` times in step with the others. Per layout the median wall seconds of a
generation (the slowest engine's) and the tokens generated.
Last line: engine_threads: one_engine_s=.. split_s=.. ratio=.. one_engine_noisy_s=.. split_noisy_s=.. noisy_ratio=..
(ratio = split / one engine: below 1 the split is faster).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _engine(model_path: str, stop_ids: list[int], pad_id: int, threads: int, requests: list, sampling,
            repeats: int, barrier, out) -> None:
    from actors.rollout_worker import RolloutWorker  # the actor's own class: its threads and denormal flush

    worker = RolloutWorker("hf", model_path, dtype="float32", device="cpu", stop_token_ids=stop_ids,
                           pad_token_id=pad_id, num_threads=threads)
    worker.generate(requests, sampling)
    for _ in range(repeats):
        barrier.wait()
        start = time.perf_counter()
        tokens = sum(len(s.response_ids) for s in worker.generate(requests, sampling))
        out.put((time.perf_counter() - start, tokens))


def _noise(stop) -> None:
    while not stop.is_set():
        time.sleep(0.005)
        start = time.perf_counter()
        while time.perf_counter() - start < 0.0004:
            pass


def measure(shares: list[list], threads: int, setup: tuple, sampling, repeats: int, noisy: bool) -> tuple[float, int]:
    ctx = mp.get_context("spawn")
    barrier, out, stop = ctx.Barrier(len(shares)), ctx.Queue(), ctx.Event()
    noise = ctx.Process(target=_noise, args=(stop,)) if noisy else None
    engines = [ctx.Process(target=_engine, args=(*setup, threads, share, sampling, repeats, barrier, out))
               for share in shares]
    for p in [*engines, *([noise] if noise else [])]:
        p.start()
    results = [out.get(timeout=1800) for _ in range(repeats * len(shares))]
    for p in engines:
        p.join()
    if noise:
        stop.set()
        noise.join()
    # results arrive per repeat from every engine: a generation lasts as long as its slowest engine
    walls = [max(w for w, _ in results[i:i + len(shares)]) for i in range(0, len(results), len(shares))]
    return statistics.median(walls), sum(t for _, t in results) // repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("overrides", nargs="*", help="conf=tiny key=value overrides")
    args = ap.parse_args()

    import launch
    from actors.codec import sample_seed
    from actors.data import PromptSampler
    from actors.engine import SamplingParams
    from cluster.placement import balance_requests
    from conf import load_config

    cfg = load_config(["algorithm.hri.enable=false", "rollout.n=6", *args.overrides])
    prompts, held_out = launch.check_inputs(cfg)
    model_path, codec, prompts, _ = launch.prepare(cfg, prompts, held_out)
    batch = PromptSampler.from_config(prompts, cfg).next_batch()
    requests = [(p.uid, i, tuple(codec.prompt_ids(p)), sample_seed(cfg.trainer.seed, 0, p.uid, i))
                for p in batch for i in range(cfg.rollout.n)]
    sampling = SamplingParams.from_config(cfg.rollout.sampling)
    cores = os.cpu_count() or 1
    costs = [len(ids) + sampling.max_new_tokens for _, _, ids, _ in requests]
    split = [[requests[i] for i in share] for share in balance_requests(costs, cores)]
    setup = (str(model_path), list(codec.stop_ids), codec.tok.pad_token_id)
    figures = {}
    for noisy in (False, True):
        for name, shares, threads in (("one_engine", [requests], cores), ("split", split, 1)):
            wall, tokens = measure(shares, threads, setup, sampling, args.repeats, noisy)
            key = f"{name}{'_noisy' if noisy else ''}_s"
            figures[key] = wall
            print(f"engine_threads: {len(shares)} engine(s) x {threads} thread(s){' + noise' if noisy else ''}: "
                  f"{wall:.2f} s for {tokens} tokens", flush=True)
    print(f"engine_threads: one_engine_s={figures['one_engine_s']:.2f} split_s={figures['split_s']:.2f} "
          f"ratio={figures['split_s'] / figures['one_engine_s']:.2f} "
          f"one_engine_noisy_s={figures['one_engine_noisy_s']:.2f} split_noisy_s={figures['split_noisy_s']:.2f} "
          f"noisy_ratio={figures['split_noisy_s'] / figures['one_engine_noisy_s']:.2f}")


if __name__ == "__main__":
    main()
