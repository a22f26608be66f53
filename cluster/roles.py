"""The named Ray actors of a run and the group calls the coordinator makes on them.

Every worker class is plain Python (tests build them without Ray); this module is the only
place that turns them into actors, names them and gives them resources.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import ray
from transformers import AutoTokenizer

from actors.engine import SamplingParams
from actors.rollout_worker import RolloutWorker, Sample
from cluster import NAMESPACE
from cluster.judge_pool import start_reward_pool
from cluster.netutil import free_port
from cluster.placement import Placement, PlacementPlan, balance_requests, plan_placement, reserve
from cluster.sync_faults import SyncFault
from cluster.sync_verify import probe_token_ids, probe_tolerance, verify_sync
from cluster.transport import WeightSyncError
from conf.errors import EnvironmentSetupError, RoleLostError
from conf.schema import Config, SyncFaultConfig
from learner.settings import DTYPES, LearnerSettings, resolve_optimizer
from learner.worker import LearnerWorker, TrainBatch, TrainRow, combine_rank_metrics
from reward.pool import RewardPool


@ray.remote(num_cpus=0)
def _rendezvous_address() -> tuple[str, int]:
    """Host and free port for a group whose rank 0 is on this node. Loopback while the cluster is
    one node (nothing listens on the network); the node's address once there are several."""
    single_node = len([n for n in ray.nodes() if n["Alive"]]) == 1
    host = "127.0.0.1" if single_node else ray.util.get_node_ip_address()
    return host, free_port(host)


def _threads(cfg: Config, sharers: int = 1) -> int:
    """On CPU the compute roles take turns (generate, train, sync; the coordinator never runs two
    at once there), so the learner may use every core, and the engines, which generate together,
    share them out, as the learner's ranks do. (Leaving the judge a core while the engines generate
    under max_staleness 1 was measured slower: bench/pipeline.py, 8.62 s vs 7.79 s.) Two one-thread
    engines beat one engine on two threads in a run: an OpenMP team stalls whenever any other
    process takes one of its cores (bench/engine_threads.py, bench/step_floor.py)."""
    return max(1, (os.cpu_count() or 1) // sharers) if cfg.trainer.device == "cpu" else 0


def learner_threads(cfg: Config, placement: Placement) -> list[int]:
    """Torch threads per learner rank: on GPU the node's CPU share (placement), on CPU the cores
    split between the ranks, which train together."""
    world = cfg.learner.world_size
    return placement.learner_threads() if cfg.trainer.device == "cuda" else [_threads(cfg, sharers=world)] * world


_LearnerActor = ray.remote(LearnerWorker)
_RolloutActor = ray.remote(RolloutWorker)


@dataclass(frozen=True)
class SyncSettings:
    """The weight group and its checks, resolved from weight_sync.* (docs/design.md#weight-sync)."""
    backend: str  # gloo | nccl
    bucket_mb: int
    timeout_s: float
    verify: int  # checksums on every sync, the probe on the first and every N-th; 0: neither
    tolerance: float  # of the probe, for the model's dtype
    fault: SyncFaultConfig | None = None  # a test's injected fault


@dataclass
class Roles:
    learners: list
    rollouts: list
    reward_workers: list
    limiter: object
    reward_pool: RewardPool
    weight_version: int = 0
    placement: Placement | None = None
    sync: SyncSettings | None = None
    probe: tuple[tuple[int, ...], float] | None = None  # (token ids, temperature): cluster/sync_verify.py
    syncs: int = 0  # sends in this process, recoveries included
    last_sync: dict = field(default_factory=dict)  # sync/* metrics of the last send

    # --- rollout ---
    def generate(self, requests: list[tuple[str, int, tuple[int, ...], int]], sampling: SamplingParams) -> list[Sample]:
        """Requests balanced over the engines by outstanding tokens; results in request order."""
        results = ray.get([w.generate.remote(share, sampling) for w, share in self._shares(requests, sampling)])
        by_key = {(s.uid, s.sample_index): s for part in results for s in part}
        return [by_key[(uid, i)] for uid, i, _, _ in requests]

    def start_generation(self, requests: list[tuple[str, int, tuple[int, ...], int]], sampling: SamplingParams,
                         chunk: int) -> list:
        """Like generate(), but returns one Ray streaming generator per busy engine, each yielding
        its samples chunk by chunk as they are done."""
        return [w.generate_stream.options(num_returns="streaming").remote(share, sampling, chunk)
                for w, share in self._shares(requests, sampling)]

    def _shares(self, requests, sampling: SamplingParams) -> list[tuple[object, list]]:
        """(engine, its requests) for every engine with work, balanced by outstanding tokens."""
        costs = [len(prompt) + sampling.max_new_tokens for _, _, prompt, _ in requests]
        shares = balance_requests(costs, len(self.rollouts))
        return [(w, [requests[i] for i in share]) for w, share in zip(self.rollouts, shares) if share]

    # --- reward ---
    def judge_metrics(self, step: int | None = None) -> dict[str, float]:
        """judge/* of the step's stories, with the limiter's view of the whole project now."""
        limiter = ray.get(self.limiter.stats.remote())
        return {**self.reward_pool.take_metrics(step), "judge/in_flight": limiter["in_flight"],
                "judge/queue_depth": limiter["waiting"], "judge/requests_last_window": limiter["requests_in_window"],
                "judge/window": limiter["window"], "judge/shed_rate": limiter["shed_rate"],
                "judge/goodput_per_s": limiter["answered_per_s"],
                "judge/retry_budget_used": limiter["retry_budget_used"], "judge/retries_held": limiter["retries_held"]}

    # --- learner ---
    def train(self, batch: TrainBatch) -> dict[str, float]:
        return combine_rank_metrics(ray.get([l.train_step.remote(batch) for l in self.learners]))

    def learner_logprobs(self, rows: list[TrainRow]) -> list[list[float]]:
        return ray.get(self.learners[0].compute_logprobs.remote(rows))

    def sync_weights(self) -> int:
        """After an update: the learner's weights to every engine as the next version."""
        return self.push_weights(self.weight_version + 1)

    def push_weights(self, version: int, *, restoring: bool = False, probe: bool | None = None) -> int:
        """Learner rank 0 -> every engine, then the check (cluster/sync_verify.py). Engines start
        receiving first (no deadlock either way: the group exists already; both sides block until
        everyone has joined this broadcast, at most weight_sync.timeout_s per transfer).
        restoring: after a resume or a failure, engines take this version whatever they hold.
        probe: score the probe (default: by weight_sync.verify's cadence).
        A learner rank that died raises RayActorError; anything else that failed raises
        WeightSyncError naming the engine and the part (the caller recovers the engines)."""
        s = self.sync
        assert s is not None, "these roles have no weight group (mode=eval)"
        self.syncs += 1
        if probe is None:
            probe = s.verify > 0 and (self.syncs - 1) % s.verify == 0
        probe_args = self.probe if probe and s.verify else None
        fault = s.fault if s.fault is not None and s.fault.version == version and not restoring else None
        armed = SyncFault(fault.kind, fault.after_bucket) if fault else None
        on_learner = armed is not None and armed.kind == "learner_dies"
        learner_fault = armed if on_learner else None
        receiving = [w.receive_weights.remote(version, restoring=restoring, probe=probe_args,
                                              fault=armed if armed and not on_learner and i == fault.engine else None)
                     for i, w in enumerate(self.rollouts)]
        sending = [l.broadcast_weights.remote(version, probe_args, learner_fault) for l in self.learners]
        received, sent = _settle(receiving), _settle(sending)
        for outcome in sent:
            if isinstance(outcome, ray.exceptions.RayActorError):
                raise outcome
        failed = [(f"engine {i}", e) for i, e in enumerate(received) if isinstance(e, Exception)]
        failed += [("learner rank 0", e) for e in sent if isinstance(e, Exception)]
        if failed:
            who, error = failed[0]
            raise WeightSyncError(f"weight sync v{version}: {who} failed: {str(error).splitlines()[-1][:300]}"
                                  ) from error
        self.last_sync = {"sync/verified": float(probe_args is not None)}
        if s.verify:
            self.last_sync.update(verify_sync(version, sent[0], received, s.tolerance))
        self.weight_version = version
        return version

    def dead_learners(self) -> list[int]:
        """Learner ranks whose actor is gone (learners are never restarted: their state is the run)."""
        dead = []
        for rank, learner in enumerate(self.learners):
            try:
                ray.get(learner.__ray_ready__.remote(), timeout=30)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                dead.append(rank)
        return dead

    def recover_engines(self, cfg: Config, version: int | None = None, timeout_s: float = 600.0) -> int:
        """After an engine actor crashed (Ray restarts it, up to rollout.max_engine_restarts): wait until
        every engine answers, re-form the weight group (a torch group cannot swap a member), send the
        learner's weights to every engine as `version` (default: the current one) and check that each
        holds it before it serves again. Returns that version."""
        version = self.weight_version if version is None else version
        deadline = time.monotonic() + timeout_s
        for i, engine in enumerate(self.rollouts):
            _wait_until_ready(i, engine, deadline, cfg, self.placement)
        broken = [i for i, e in enumerate(self.rollouts) if ray.get(e.needs_restart.remote())]
        for i in broken:  # a reload that failed half way: only a fresh engine process is whole again
            ray.kill(self.rollouts[i], no_restart=False)
        for i in broken:
            _wait_until_ready(i, self.rollouts[i], deadline, cfg, self.placement)
        _form_weight_group(cfg, self)
        self.push_weights(version, restoring=True, probe=True)
        held = ray.get([engine.get_weight_version.remote() for engine in self.rollouts])
        if any(v != version for v in held):
            raise WeightSyncError(f"after re-sending weights v{version} the engines hold {held}")
        return version

    def reform_weight_group(self, cfg: Config) -> None:
        """A new group on a new port (after an engine is replaced: a torch group cannot swap a
        member); versions carry on. The new engine must be at the learner's version already or
        receive a full send next."""
        _form_weight_group(cfg, self)

    def save_hf(self, path: str, tokenizer_path: str, generation: dict | None = None) -> str:
        return ray.get([l.save_hf.remote(path, tokenizer_path, generation) for l in self.learners])[0]

    def save_checkpoint(self, path: str, *, tokenizer_path: str, generation: dict) -> None:
        ray.get([l.save_checkpoint.remote(path, tokenizer_path=tokenizer_path, generation=generation)
                 for l in self.learners])

    def load_checkpoint(self, path: str) -> None:
        ray.get([l.load_checkpoint.remote(path) for l in self.learners])

    def shutdown(self) -> None:
        self.reward_pool.close()
        for actor in [*self.learners, *self.rollouts, *self.reward_workers, self.limiter]:
            ray.kill(actor)
        if self.placement is not None:
            self.placement.remove()


def _wait_until_ready(index: int, engine, deadline: float, cfg: Config, placement: Placement | None) -> None:
    """Until the engine actor answers (Ray restarting it after a crash), or RoleLostError at the
    deadline, or at once when no live node can take it (its node was lost and no other matches)."""
    while True:
        try:
            ray.get(engine.__ray_ready__.remote(), timeout=10)
            return
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
            if placement is not None and (nowhere := placement.engines_unplaceable()):
                raise RoleLostError(f"rollout engine {index} is gone and no live node can take it: "
                                    + "; ".join(nowhere)) from None
            if time.monotonic() > deadline:
                raise RoleLostError(f"rollout engine {index} did not come back after a crash ({type(e).__name__}; "
                                    f"rollout.max_engine_restarts={cfg.rollout.max_engine_restarts})") from None
            time.sleep(1.0)


def _settle(refs: list) -> list:
    """Every call's result or exception, once all have finished (none left running behind a failure)."""
    ray.wait(refs, num_returns=len(refs))
    outcomes = []
    for ref in refs:
        try:
            outcomes.append(ray.get(ref))
        except Exception as e:  # noqa: BLE001 - sorted by the caller
            outcomes.append(e)
    return outcomes


def start_roles(cfg: Config, *, model_path: str, stop_token_ids: list[int], pad_token_id: int,
                judge_base_url: str, run_name: str, output_dir: str) -> Roles:
    """Actors are named "{run_name}/{role}-{i}" in the "polaris" namespace. run_name is unique to
    the output folder (actors/checkpoint.py run_name): two runs on one cluster never collide, and a
    second run into the same output folder is refused."""
    names = [f"{run_name}/{role}-{i}" for role, n in (("learner", cfg.learner.world_size),
             ("rollout", cfg.rollout.num_engines), ("reward", cfg.judge.num_workers)) for i in range(n)]
    _wait_until_released([*names, f"{run_name}/judge-limiter"], output_dir)
    placement = reserve(placement_plan(cfg), name=run_name)
    learners = start_learners(cfg, model_path, pad_token_id=pad_token_id, run_name=run_name, placement=placement)
    rollouts = start_rollouts(cfg, model_path, stop_token_ids=stop_token_ids, pad_token_id=pad_token_id,
                              run_name=run_name, placement=placement)
    limiter, reward_workers, pool = start_reward_pool(cfg, judge_base_url, run_name, output_dir)
    roles = Roles(learners, rollouts, reward_workers, limiter, pool, placement=placement,
                  sync=weight_sync_settings(cfg), probe=(probe_token_ids(AutoTokenizer.from_pretrained(model_path)),
                                                         cfg.rollout.sampling.temperature))
    _form_weight_group(cfg, roles)
    print(ray.get(learners[0].startup_line.remote()))
    return roles


def start_learners(cfg: Config, model_path: str, *, pad_token_id: int, run_name: str, placement: Placement) -> list:
    """The learner ranks, rendezvoused on rank 0's node."""
    gpu = 1 if cfg.trainer.device == "cuda" else 0
    settings = learner_settings(cfg, model_path=model_path, pad_token_id=pad_token_id)
    world = cfg.learner.world_size
    master = ray.get(_rendezvous_address.options(**placement.learner(0)).remote())
    threads = learner_threads(cfg, placement)
    return [
        _LearnerActor.options(name=f"{run_name}/learner-{r}", namespace=NAMESPACE, num_cpus=1, num_gpus=gpu,
                              **placement.learner(r))
        .remote(settings, r, world, *master, num_threads=threads[r])
        for r in range(world)
    ]


def learner_settings(cfg: Config, *, model_path: str, pad_token_id: int) -> LearnerSettings:
    """What every learner rank is built from."""
    lr, algo = cfg.learner, cfg.algorithm
    return LearnerSettings(
        model_path=model_path, dtype=cfg.model.dtype, device=cfg.trainer.device, zero_stage=lr.zero_stage,
        lr=lr.lr, weight_decay=lr.weight_decay, betas=(lr.adam_beta1, lr.adam_beta2), grad_clip=lr.grad_clip,
        micro_batch_size=lr.micro_batch_size, gradient_checkpointing=cfg.model.gradient_checkpointing,
        clip_low=algo.clip_low, clip_high=algo.clip_high, temperature=cfg.rollout.sampling.temperature,
        pad_token_id=pad_token_id, seed=cfg.trainer.seed, checkpoint_names=cfg.rollout.engine == "vllm",
        max_tokens_per_micro_batch=lr.max_tokens_per_micro_batch, logprob_chunk_tokens=lr.logprob_chunk_tokens,
        offload_optimizer=lr.offload_optimizer, offload_params=lr.offload_params, tis_cap=algo.tis_cap,
        total_steps=cfg.trainer.total_steps, warmup_steps=lr.warmup_steps, lr_schedule=lr.lr_schedule,
        min_lr_ratio=lr.min_lr_ratio,
        optimizer=resolve_optimizer(lr.optimizer, device=cfg.trainer.device, offload_optimizer=lr.offload_optimizer),
    )


def placement_plan(cfg: Config, *, learners: bool = True) -> PlacementPlan:
    """The devices each role reserves; learners=False: mode=eval, engines only."""
    return plan_placement(device=cfg.trainer.device, learner_world_size=cfg.learner.world_size if learners else 0,
                          num_engines=cfg.rollout.num_engines, tensor_parallel_size=cfg.rollout.tensor_parallel_size,
                          learner_nodes=cfg.placement.learner, engine_nodes=cfg.placement.engines)


def start_rollouts(cfg: Config, model_path: str, *, stop_token_ids: list[int], pad_token_id: int, run_name: str,
                   placement: Placement) -> list:
    gpu = 1 if cfg.trainer.device == "cuda" else 0
    threads = _threads(cfg, sharers=cfg.rollout.num_engines)
    return [
        _RolloutActor.options(name=f"{run_name}/rollout-{i}", namespace=NAMESPACE, num_cpus=1,
                              num_gpus=gpu * cfg.rollout.tensor_parallel_size, max_restarts=cfg.rollout.max_engine_restarts,
                              **placement.engine(i))
        .remote(cfg.rollout.engine, model_path, dtype=cfg.model.dtype, device=cfg.trainer.device,
                stop_token_ids=stop_token_ids, pad_token_id=pad_token_id, num_threads=threads,
                tensor_parallel_size=cfg.rollout.tensor_parallel_size, seed=cfg.trainer.seed,
                cpu_cores=engine_cpu_cores(i, cfg.rollout.num_engines)
                if cfg.trainer.device == "cpu" and cfg.rollout.tensor_parallel_size == 1 else None,
                max_model_len=cfg.data.max_prompt_tokens + max(cfg.rollout.sampling.max_new_tokens,
                                                               cfg.rollout.val_sampling.max_new_tokens))
        for i in range(cfg.rollout.num_engines)
    ]


def engine_cpu_cores(index: int, num_engines: int, cores: int | None = None) -> str | None:
    """The cores vLLM engine `index` of `num_engines` binds its workers to on a CPU node: a share of
    its own (vLLM's "auto" would put every engine on the same first cores: two engines on two cores
    reloaded weights one after the other, measured). None for a single engine: vLLM's choice."""
    cores = cores or os.cpu_count() or 1
    if num_engines <= 1:
        return None
    if num_engines >= cores:
        return str(index % cores)
    first, last = index * cores // num_engines, (index + 1) * cores // num_engines - 1
    return str(first) if first == last else f"{first}-{last}"


def start_eval_roles(cfg: Config, *, model_path: str, stop_token_ids: list[int], pad_token_id: int,
                     judge_base_url: str, run_name: str, output_dir: str) -> Roles:
    """mode=eval: engines serving model_path and a reward pool on eval.judge (no learner)."""
    names = [f"{run_name}/{role}-{i}" for role, n in (("rollout", cfg.rollout.num_engines),
             ("reward", cfg.eval.judge.num_workers)) for i in range(n)]
    _wait_until_released([*names, f"{run_name}/judge-limiter"], output_dir)
    placement = reserve(placement_plan(cfg, learners=False), name=run_name)
    rollouts = start_rollouts(cfg, model_path, stop_token_ids=stop_token_ids, pad_token_id=pad_token_id,
                              run_name=run_name, placement=placement)
    limiter, reward_workers, pool = start_reward_pool(cfg, judge_base_url, run_name, output_dir, evaluation=True)
    return Roles([], rollouts, reward_workers, limiter, pool, placement=placement)


def _wait_until_released(names: list[str], output_dir: str, timeout_s: float = 60.0) -> None:
    """A run resumed right after its driver was killed finds its actors' names still taken until
    Ray notices the death (seconds); a live run into the same folder keeps them: refused."""
    deadline = time.monotonic() + timeout_s
    for name in names:
        while True:
            try:
                ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:
                break
            if time.monotonic() > deadline:
                raise EnvironmentSetupError(f"another run on this cluster is writing trainer.output_dir={output_dir} "
                                            f"(its actor {name!r} is alive); stop it or choose another output_dir")
            time.sleep(0.5)


def weight_sync_settings(cfg: Config) -> SyncSettings:
    """The learner-to-engines weight group; backend auto: nccl on cuda, gloo on cpu."""
    w = cfg.weight_sync
    backend = w.backend if w.backend != "auto" else "nccl" if cfg.trainer.device == "cuda" else "gloo"
    return SyncSettings(backend, w.bucket_mb, w.timeout_s, w.verify,
                        probe_tolerance(DTYPES[cfg.model.dtype], w.probe_tolerance), w.fault if w.fault.kind else None)


def _form_weight_group(cfg: Config, roles: Roles) -> None:
    s = roles.sync
    assert s is not None, "these roles have no weight group (mode=eval)"
    host, port = ray.get(_rendezvous_address.options(**roles.placement.learner(0)).remote())
    shards = cfg.rollout.tensor_parallel_size if cfg.rollout.engine == "vllm" else 1
    world = 1 + len(roles.rollouts) * shards
    ray.get([a.__ray_ready__.remote() for a in [roles.learners[0], *roles.rollouts]])  # started: the join's
    # deadline (weight_sync.timeout_s) is then for joining alone; engine side first: their joins
    # wait on the store that learner rank 0 then hosts
    joins = [w.init_weight_sync.remote(s.backend, host, port, 1 + i * shards, world, s.bucket_mb, s.timeout_s)
             for i, w in enumerate(roles.rollouts)]
    joins.append(roles.learners[0].init_weight_sync.remote(s.backend, host, port, world, s.bucket_mb, s.timeout_s))
    ray.get(joins)
