"""conf=tiny35 end to end: the Qwen3.5-architecture tiny model (Gated DeltaNet and gated full
attention) through the HF engine, the weight broadcast, checkpoints and an exact resume, the
export (the text model, and the multimodal checkpoint with a base model's vision tower) and
mode=eval. (The learner under ZeRO 1 and 3: tests/learner/test_worker.py; vLLM's names, stacked
projections and float32 parameters: tests/cluster/test_names.py.)"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
COMPARED = ("reward/mean", "train/loss", "train/grad_norm", "length/tokens_mean", "judge/stories")


def launch(args, env, timeout=900):
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "conf=tiny35", "trainer.progress_bar=false",
                           "trainer.eval_every=0", *args], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_address, tiny35_model_path, quick_run):
    """Three steps straight, and the same run resumed from its second step's checkpoint for the third."""
    root = tmp_path_factory.mktemp("tiny35")
    env = {"RAY_ADDRESS": ray_address, "POLARIS_CACHE": str(Path(tiny35_model_path).parent), "WANDB_MODE": "offline"}
    quick = quick_run.one_engine_args
    straight = launch([*quick, f"trainer.output_dir={root / 'straight'}", "trainer.total_steps=3", "trainer.save_every=1"],
                      env)
    # the learner's start-up lines: its optimizer and threads, and the kernel path per layer type
    assert "optimizer torch AdamW (state on cpu)" in straight.stdout, straight.stdout[-3000:]
    assert ("kernels: linear_attention -> chunk_gated_delta_rule=torch reference (flash-linear-attention not "
            "installed), causal_conv1d_fn=torch reference (causal-conv1d not installed); full_attention -> sdpa\n"
            in straight.stdout)
    # the run as it stood after its second step: its folder without the third step's checkpoint and export
    shutil.copytree(root / "straight", root / "resumed", ignore=shutil.ignore_patterns("step_000003", "hf_model"))
    resumed = launch([*quick, f"trainer.output_dir={root / 'resumed'}", "trainer.total_steps=3", "trainer.save_every=1"],
                     env)
    assert "resume: from" in resumed.stdout and "step_000002" in resumed.stdout
    return root, env


def test_tiny35_trains_and_its_engine_scores_the_sampled_tokens_as_the_learner_does(runs, tiny35_model_path):
    root, _ = runs
    rows = metrics(root / "straight")
    assert [r["step"] for r in rows] == [0, 1, 2] and [r["weight_version"] for r in rows] == [0, 1, 2]
    assert all(r["groups/rows_trained"] > 0 for r in rows)
    # the engine-vs-learner logprob gap, after each broadcast of the hybrid model's weights
    assert all(r["rollout/logprob_diff"] < 1e-3 for r in rows), [r["rollout/logprob_diff"] for r in rows]
    config = json.loads((Path(tiny35_model_path) / "config.json").read_text())
    assert config["model_type"] == "qwen3_5_text" and config["layer_types"].count("linear_attention") == 3


def test_a_resumed_tiny35_run_continues_exactly(runs):
    root, _ = runs
    straight, resumed = metrics(root / "straight"), metrics(root / "resumed")
    assert [{k: r[k] for k in COMPARED} for r in resumed] == [{k: r[k] for k in COMPARED} for r in straight]
    a, b = load_file(root / "straight" / "hf_model" / "model.safetensors"), \
        load_file(root / "resumed" / "hf_model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def tiny_multimodal_base(text_model_path, folder):
    """A Qwen3_5ForConditionalGeneration around the tiny text model's shapes, with a tiny vision
    tower: what a Qwen/Qwen3.5-9B folder is at full size."""
    from transformers import AutoConfig, Qwen3_5Config, Qwen3_5ForConditionalGeneration

    text = AutoConfig.from_pretrained(text_model_path)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=text.hidden_size)
    torch.manual_seed(0)
    Qwen3_5ForConditionalGeneration(Qwen3_5Config(text_config=text.to_dict(), vision_config=vision,
                                                  tie_word_embeddings=False)).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text('{"processor_class": "Qwen3VLProcessor"}')
    return folder


def test_export_writes_the_text_model_and_with_a_vision_tower_the_multimodal_checkpoint(runs, tiny35_model_path,
                                                                                        tmp_path):
    from transformers import AutoModelForCausalLM, Qwen3_5ForConditionalGeneration

    root, _ = runs
    step = root / "straight" / "checkpoints" / "step_000003"
    export = [sys.executable, "-m", "learner.export", str(step)]
    for args in ([str(tmp_path / "text")],
                 [str(tmp_path / "multimodal"), "--vision-from", str(tiny_multimodal_base(tiny35_model_path,
                                                                                          tmp_path / "base"))]):
        proc = subprocess.run([*export, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    trained = load_file(root / "straight" / "hf_model" / "model.safetensors")

    text = AutoModelForCausalLM.from_pretrained(tmp_path / "text")
    assert type(text).__name__ == "Qwen3_5ForCausalLM"
    assert all(torch.equal(p, trained[n]) for n, p in text.state_dict().items())

    multimodal = Qwen3_5ForConditionalGeneration.from_pretrained(tmp_path / "multimodal")
    state, base = multimodal.state_dict(), load_file(tmp_path / "base" / "model.safetensors")
    language = {n: t for n, t in state.items() if n.startswith("model.language_model.")}
    assert len(language) == len(trained) - 1  # every weight of the text model but its head, which stays lm_head
    assert all(torch.equal(t, trained["model." + n.removeprefix("model.language_model.")]) for n, t in language.items())
    assert torch.equal(state["lm_head.weight"], trained["lm_head.weight"])
    visual = {n for n in state if n.startswith("model.visual.")}
    assert visual and all(torch.equal(state[n], base[n]) for n in visual)
    assert (tmp_path / "multimodal" / "preprocessor_config.json").is_file()


def test_mode_eval_runs_on_an_exported_tiny35(runs, tmp_path, quick_run):
    root, env = runs
    subprocess.run([sys.executable, "-m", "learner.export", str(root / "straight"), str(tmp_path / "policy")],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    proc = launch(["mode=eval", f"eval.checkpoint={tmp_path / 'policy'}", f"trainer.output_dir={tmp_path / 'out'}",
                   *quick_run.one_engine_args], env)
    stories = [json.loads(line) for line in (tmp_path / "out" / "eval" / "policy" / "generations.jsonl").open()]
    assert len(stories) == 24 and all(s["judgment"] is not None for s in stories), proc.stdout[-2000:]


def test_the_planned_shape_of_tiny35_is_the_built_model_s(tiny35_model_path):
    """mode=check plans conf=tiny35 before building it: from the table, which must match the build."""
    from conf import load_config
    from learner.model_shapes import ModelShape, model_config, run_model_name

    cfg = load_config(["conf=tiny35"])
    planned = ModelShape.from_hf_config(model_config(run_model_name(cfg.model)))
    built = ModelShape.from_hf_config(json.loads((Path(tiny35_model_path) / "config.json").read_text()))
    assert built.vocab_size <= planned.vocab_size  # the table bounds the trained tokenizer's size
    assert planned == dataclasses.replace(built, vocab_size=planned.vocab_size)
