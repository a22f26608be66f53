"""Checkpoints: a fresh learner restored from one takes the next step bit for bit as the learner
that saved it (weights, Adam moments, RNG), and learner/export.py turns one into a Hugging Face
folder that transformers and vLLM load and sample from, with the run's sampling settings."""
import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from actors import checkpoint
from conf.errors import CheckpointError
from learner.export import export_checkpoint, main
from learner.worker import LearnerWorker, TrainBatch, TrainRow

ROOT = Path(__file__).resolve().parents[2]
GENERATION = {"temperature": 1.0, "top_p": 0.95, "top_k": 20, "repetition_penalty": 1.1, "max_new_tokens": 32}


def random_rows(response_lengths, advantages, seed) -> tuple[TrainRow, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(TrainRow(tuple(torch.randint(1, 1000, (5,), generator=g).tolist()),
                          tuple(torch.randint(1, 1000, (n,), generator=g).tolist()), a, False)
                 for n, a in zip(response_lengths, advantages))


FIRST = TrainBatch(random_rows([20, 12, 7], [1.0, -0.5, 0.25], seed=0), step=0)
SECOND = TrainBatch(random_rows([15, 9, 4], [-1.0, 0.5, 0.75], seed=1), step=1)


def save(worker: LearnerWorker, output_dir: Path, steps: int, tokenizer_path: str) -> Path:
    """A complete checkpoint, written the way the coordinator does (state.json is its part)."""
    partial = checkpoint.begin(output_dir, steps)
    worker.save_checkpoint(str(partial), tokenizer_path=tokenizer_path, generation=GENERATION)
    (partial / checkpoint.STATE_FILE).write_text("{}")
    return checkpoint.commit(partial)


def weights(worker: LearnerWorker) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in worker.policy.named_parameters()}


def differing(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> list[str]:
    assert got.keys() == want.keys()
    return [name for name in want if not torch.equal(got[name], want[name])]


@pytest.fixture(scope="module")
def run(build_worker, tiny_model_path, tmp_path_factory):
    """A ZeRO-1 learner: one step, checkpoint step_000001, then a second step."""
    output_dir = tmp_path_factory.mktemp("run")
    worker = build_worker()
    worker.train_step(FIRST)
    saved, rng = weights(worker), torch.get_rng_state()
    path = save(worker, output_dir, 1, tiny_model_path)
    second = worker.train_step(SECOND)
    return SimpleNamespace(output_dir=output_dir, path=path, saved=saved, rng=rng, second=second,
                           after=weights(worker))


@pytest.mark.slow
def test_a_restored_learner_takes_the_next_step_bit_for_bit(build_worker, run):
    fresh = build_worker()
    with pytest.raises(CheckpointError, match="step_000009"):
        fresh.load_checkpoint(str(run.output_dir / "checkpoints" / "step_000009"))
    torch.rand(10)  # moves the RNG on: the load must bring back the saved state

    fresh.load_checkpoint(str(run.path))

    assert torch.equal(torch.get_rng_state(), run.rng)
    assert differing(weights(fresh), run.saved) == []
    assert fresh.train_step(SECOND)["loss"] == run.second["loss"]
    assert differing(weights(fresh), run.after) == []

    # Without the Adam moments the same weights take another step: the comparison above sees them.
    weights_only = build_worker()
    weights_only.engine.load_checkpoint(str(run.path / "learner"), tag="ds", load_module_only=True,
                                        load_optimizer_states=False)
    assert differing(weights(weights_only), run.saved) == []
    weights_only.train_step(SECOND)
    assert differing(weights(weights_only), run.after) != []


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    """The run's output_dir exported through the CLI (it picks the latest checkpoint)."""
    out = tmp_path_factory.mktemp("export") / "model"
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        status = main([str(run.output_dir), str(out)])
    return SimpleNamespace(out=out, status=status, stdout=stdout.getvalue())


@pytest.mark.slow
def test_the_export_is_the_saved_policy_and_samples_with_the_run_settings(run, exported):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = exported.out
    assert (exported.status, exported.stdout) == (0, f"exported {run.path} -> {out}\n")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float32  # the learner's dtype
    assert differing(dict((n, p.detach()) for n, p in model.named_parameters()), run.saved) == []
    assert set(load_file(out / "model.safetensors")) == set(run.saved)  # the tied head is not stored twice

    generation = json.loads((out / "generation_config.json").read_text())
    assert {k: generation[k] for k in GENERATION} == GENERATION
    assert (generation["do_sample"], generation["eos_token_id"], generation["pad_token_id"]) == (True, [2, 0], 0)

    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Write a story about a lighthouse."}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    torch.manual_seed(0)
    tokens = model.generate(**prompt)[0, prompt["input_ids"].shape[1]:]
    assert 0 < len(tokens) <= GENERATION["max_new_tokens"]


@pytest.mark.slow
def test_vllm_samples_from_the_export(exported):
    from actors.engine import GenerationRequest, SamplingParams
    from actors.vllm_engine import VLLMEngine
    from learner.logprobs import token_logprobs
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = exported.out
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tuple(tokenizer.apply_chat_template([{"role": "user", "content": "The storm."}],
                                                 add_generation_prompt=True, tokenize=True, return_dict=False))
    engine = VLLMEngine(str(out), dtype=torch.float32, device="cpu", stop_token_ids=[2, 0], max_model_len=256)
    try:
        [generation] = engine.generate([GenerationRequest("r0", prompt, seed=0)], SamplingParams(**GENERATION))
    finally:
        engine.close()

    assert len(generation.token_ids) > 0
    # vLLM holds the exported weights: its logprobs are transformers' on the same folder
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([prompt + generation.token_ids])
    with torch.no_grad():
        expected = token_logprobs(model, ids, torch.ones_like(ids), GENERATION["temperature"])[0, len(prompt) - 1:]
    assert (expected - torch.tensor(generation.logprobs)).abs().max().item() < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 3])
def test_zero_0_and_zero_3_checkpoints_export_as_save_hf_writes_the_policy(build_worker, tiny_model_path, tmp_path,
                                                                          zero_stage):
    from safetensors.torch import load_file

    worker = build_worker(zero_stage=zero_stage)
    worker.train_step(FIRST)
    step = save(worker, tmp_path, 1, tiny_model_path)
    direct = Path(worker.save_hf(str(tmp_path / "hf"), tiny_model_path, GENERATION))  # ZeRO-3: gathered

    out = export_checkpoint(step, tmp_path / "model", dtype="bfloat16")

    got, want = load_file(out / "model.safetensors"), load_file(direct / "model.safetensors")
    assert got.keys() == want.keys()
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k].to(torch.bfloat16)) for k in want)
    assert any(want[k].abs().sum() > 0 for k in want)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert (json.loads((out / "generation_config.json").read_text()) ==
            json.loads((direct / "generation_config.json").read_text()))


# --- what the export refuses ---

def complete_step(output_dir: Path, steps: int) -> Path:
    """A folder actors/checkpoint.py counts as complete (nothing else in it)."""
    path = checkpoint.step_dir(output_dir, steps)
    path.mkdir(parents=True)
    (path / checkpoint.STATE_FILE).write_text("{}")
    return path


def test_a_partial_checkpoint_is_refused(tmp_path):
    partial = checkpoint.begin(tmp_path, 3)
    with pytest.raises(CheckpointError, match=r"step_000003\.partial is not a complete checkpoint"):
        export_checkpoint(partial, tmp_path / "model")


def test_a_run_without_a_complete_checkpoint_is_refused(tmp_path):
    checkpoint.begin(tmp_path, 3)  # only a crash's leftover
    with pytest.raises(CheckpointError, match=f"{re.escape(str(tmp_path))} holds no complete checkpoint"):
        export_checkpoint(tmp_path, tmp_path / "model")


def test_a_non_empty_out_dir_is_refused(tmp_path):
    step = complete_step(tmp_path / "run", 2)
    out = tmp_path / "model"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=f"{re.escape(str(out))} already exists and is not empty"):
        export_checkpoint(step, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_the_cli_reports_a_bad_checkpoint_in_one_line_with_exit_code_2(tmp_path):
    partial = checkpoint.begin(tmp_path, 3)
    result = subprocess.run([sys.executable, "-m", "learner.export", str(partial), str(tmp_path / "model")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().splitlines()[-1] == (f"error: {partial} is not a complete checkpoint (a .partial "
                                                      "folder is still being written or was left by a crash; use a "
                                                      "step_NNNNNN folder)")
