"""polaris-rl: GRPO (+ human reference injection) with an LLM judge, on Ray.

    python launch.py [conf=NAME] [key.sub=value ...]          # default conf=tiny: CPU, tiny model
    python launch.py conf=NAME mode=eval eval.checkpoint=HF_FOLDER [eval.compare=HF_FOLDER2]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python launch.py conf=polaris
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from conf import Config, PolarisError, load_config, resolve_path, to_yaml

def check_inputs(cfg: Config):
    """Data and environment checks: seconds, before any model, engine, judge call or Ray.
    Returns (training prompts, held-out prompts for the periodic validation or [])."""
    from actors.data import load_prompts
    from conf.errors import DataError, EnvironmentSetupError

    train = load_prompts(resolve_path(cfg.data.train_path), require_reference=cfg.algorithm.hri.enable)
    if len(train) < cfg.data.prompts_per_step:
        raise DataError(f"data.train_path={cfg.data.train_path} holds {len(train)} prompt(s), fewer than one step's "
                        f"data.prompts_per_step={cfg.data.prompts_per_step} distinct prompts")
    held_out = []
    if cfg.trainer.eval_every:
        if not Path(resolve_path(cfg.eval.prompts_path)).exists():
            raise DataError(f"eval.prompts_path={cfg.eval.prompts_path} not found: the periodic validation "
                            f"(trainer.eval_every={cfg.trainer.eval_every}) needs held-out prompts, e.g. the POLARIS "
                            "test split or data/synthetic/test.jsonl; trainer.eval_every=0 turns it off")
        held_out = load_prompts(resolve_path(cfg.eval.prompts_path), require_reference=False)
    if cfg.judge.backend == "gemini" and not cfg.judge.vertex and not os.environ.get(cfg.judge.api_key_env):
        raise EnvironmentSetupError(f"judge.backend=gemini needs an API key in ${cfg.judge.api_key_env}")
    if cfg.trainer.device == "cuda":
        import torch

        from cluster.plan import run_prediction
        from learner.kernels import planned_kernel_line
        from learner.memory_plan import startup_plan
        from learner.model_shapes import run_model_name
        from learner.settings import resolve_optimizer

        print(startup_plan(cfg))  # refuses a plan that cannot fit, with the numbers
        print(planned_kernel_line(run_model_name(cfg.model), cfg.trainer.device))
        optimizer = resolve_optimizer(cfg.learner.optimizer, device="cuda", offload_optimizer=cfg.learner.offload_optimizer)
        print(f"learner: optimizer {optimizer} (learner.optimizer={cfg.learner.optimizer}), CPU threads per rank: "
              "the node's cores less one per engine, shared by the node's ranks")
        if not torch.cuda.is_available():
            raise EnvironmentSetupError("trainer.device=cuda but no GPU is visible; use conf=tiny or trainer.device=cpu")
        print(run_prediction(cfg)[0])  # the run planner's step and run times for this layout
    print(f"checked: config, {len(train)} training prompts ({cfg.data.train_path})"
          + (f", {len(held_out)} evaluation prompts ({cfg.eval.prompts_path})" if held_out else ""))
    return train, held_out


def prepare(cfg: Config, train, held_out):
    """The model found or built, prompts over the length limit dropped."""
    from transformers import AutoTokenizer

    from actors.codec import ChatCodec
    from actors.data import filter_long_prompts

    model_path = build_or_find_model(cfg)
    codec = ChatCodec.from_config(AutoTokenizer.from_pretrained(model_path), cfg)
    train, too_long = filter_long_prompts(train, lambda r: len(codec.prompt_ids(r)), cfg.data.max_prompt_tokens)
    print(f"data: {len(train)} training prompts ({too_long} over {cfg.data.max_prompt_tokens} tokens dropped)")
    if held_out:
        held_out, _ = filter_long_prompts(held_out, lambda r: len(codec.prompt_ids(r)), cfg.data.max_prompt_tokens)
    return model_path, codec, train, held_out


def build_or_find_model(cfg: Config) -> str:
    if cfg.model.path != "tiny":
        return cfg.model.path
    from learner.tiny_model import build_tiny_model

    return str(build_tiny_model(cfg.model.tiny.cache_dir or None, seed=cfg.model.tiny.seed,
                                architecture=cfg.model.tiny.architecture))


def train(cfg: Config) -> Path | None:
    from actors.checkpoint import output_folder, prepare_resume, run_name

    prompts, held_out = check_inputs(cfg)
    output_dir = output_folder(cfg)
    resume_from, state = prepare_resume(cfg, output_dir)  # refuses a mismatched checkpoint before anything starts
    if state and state["steps_done"] >= cfg.trainer.total_steps:
        print(f"done already: {resume_from} is at step {state['steps_done']} of trainer.total_steps="
              f"{cfg.trainer.total_steps}; raise it to train further")
        return output_dir / "hf_model"
    # the heavy stack (torch, transformers, Ray: ~8 s) once the input is known to be good
    from actors.coordinator import Coordinator, stop_on_signals
    from actors.data import PromptSampler
    from actors.pipeline import join_consumers
    from actors.tracking import start_tracker
    from cluster.connect import connect_ray
    from cluster.judge_pool import judge_settings
    from cluster.roles import start_roles
    from eval.run import PeriodicValidation
    from reward.judge_client import preflight
    from reward.judge_server import judge_endpoint

    with judge_endpoint(cfg.judge) as (judge_url, judge_server):
        preflight(judge_settings(cfg.judge, judge_url))  # seconds, before any model is built or loaded
        model_path, codec, prompts, held_out = prepare(cfg, prompts, held_out)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(to_yaml(cfg))  # keys live in the environment, never in config
        name = run_name(output_dir, resume_from)
        connect_ray(cfg)
        roles = start_roles(cfg, model_path=model_path, stop_token_ids=codec.stop_ids,
                            pad_token_id=codec.tok.pad_token_id, judge_base_url=judge_url,
                            run_name=name, output_dir=str(output_dir))
        sampler = PromptSampler.from_config(prompts, cfg)
        tracker = start_tracker(cfg, output_dir, state, name)
        validation = PeriodicValidation(cfg, roles, codec, held_out, output_dir, tracker) if held_out else None
        coordinator = Coordinator(cfg, roles, codec, sampler, tracker, output_dir, model_path, validation)
        try:
            start_step, in_flight = coordinator.restore(resume_from) if resume_from else (0, None)
            with stop_on_signals(coordinator):
                stopped = coordinator.run(start_step, in_flight)
            hf_path = None if coordinator.stop_requested else coordinator.export()
        finally:
            tracker.close()
            roles.shutdown()  # a step stopped mid-generation: its streams fail now, not inside Ray's exit
            join_consumers(timeout_s=30)
    if stopped:
        print(f"stopped: {stopped}")
    if judge_server:
        print(judge_server.summary())
    print(f"done: metrics in {output_dir / 'metrics.jsonl'}; policy in {hf_path or 'the last checkpoint'}; "
          f"judge spend ${roles.reward_pool.total_usd:.4f}")
    return hf_path


def run(cfg: Config) -> None:
    """mode: check, eval or train."""
    if cfg.mode == "check":
        check_inputs(cfg)
    elif cfg.mode == "eval":
        from eval.run import evaluate

        evaluate(cfg)
    else:
        train(cfg)


def main(argv: list[str]) -> int:
    try:
        run(load_config(argv))
    except PolarisError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
