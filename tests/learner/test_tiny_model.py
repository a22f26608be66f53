"""The locally built tiny policy: deterministic, cached, loadable, and it stops on its own."""

import hashlib
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from learner import tiny_model  # noqa: E402
from learner.tiny_model import build_tiny_model  # noqa: E402

VAL = Path(__file__).resolve().parents[2] / "data" / "tiny" / "val.jsonl"


def weights_sha256(path: Path) -> str:
    model = AutoModelForCausalLM.from_pretrained(path)
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def cache(tiny_model_path):
    return Path(tiny_model_path).parent


@pytest.fixture(scope="module")
def full_model(tiny_model_path):
    """The default build (full warm-up): the session's shared one, as `python launch.py` builds it."""
    return Path(tiny_model_path)


def test_same_seed_gives_identical_weights(tmp_path):
    a = build_tiny_model(tmp_path / "a", warmup_steps=5, show_progress=False)
    b = build_tiny_model(tmp_path / "b", warmup_steps=5, show_progress=False)
    c = build_tiny_model(tmp_path / "c", warmup_steps=5, seed=1, show_progress=False)
    assert a.name == b.name != c.name
    assert weights_sha256(a) == weights_sha256(b) != weights_sha256(c)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_second_call_reuses_the_cached_build(full_model, cache, monkeypatch):
    def no_rebuild(*_):  # raises before anything replaces the cached folder
        raise AssertionError("the cached build was built again")

    monkeypatch.setattr(tiny_model, "_build", no_rebuild)
    path = full_model
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(cache, show_progress=False) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p.name for p in cache.iterdir() if ".tmp" in p.name]  # no half-built folder left


def test_folder_loads_as_a_qwen3_chat_model(full_model):
    path = full_model
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert config["head_dim"] == 48 and config["tie_word_embeddings"] is True
    tok = AutoTokenizer.from_pretrained(path)
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert config["eos_token_id"] == tok.eos_token_id
    assert len(tok) <= config["vocab_size"]
    chat = [{"role": "user", "content": "Write a story."}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True,
                                   enable_thinking=True) == (
        "<|im_start|>user\nWrite a story.<|im_end|>\n<|im_start|>assistant\n")
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True,
                                   enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    turn = chat + [{"role": "assistant", "content": "<think>\nplan\n</think>\n\nOnce."}]
    assert tok.apply_chat_template(turn, tokenize=False).endswith(
        "<|im_start|>assistant\n<think>\nplan\n</think>\n\nOnce.<|im_end|>\n")
    # the think tags survive decoding without special tokens (the reward splits on them)
    ids = tok("<think>\nplan\n</think>\n\nOnce.<|im_end|>", add_special_tokens=False).input_ids
    assert tok.decode(ids, skip_special_tokens=True) == "<think>\nplan\n</think>\n\nOnce."


def test_warmed_up_policy_writes_stories_that_end(full_model):
    path = full_model
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    rows = [json.loads(line) for line in VAL.read_text().splitlines()]
    rows = (rows * 2)[:48]
    prompts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}],
                                       tokenize=False, add_generation_prompt=True,
                                       enable_thinking=True) for r in rows]
    batch = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**batch, do_sample=True, temperature=1.0, top_p=0.95, top_k=20,
                             repetition_penalty=1.1, max_new_tokens=256)
    responses = out[:, batch.input_ids.shape[1]:].tolist()
    ended, story_words, target_words = 0, [], []
    for row, ids in zip(rows, responses):
        if tok.eos_token_id in ids:
            ended += 1
            text = tok.decode(ids[:ids.index(tok.eos_token_id)], skip_special_tokens=True)
            story_words.append(len(text.split("</think>")[-1].split()))
            target_words.append(row["target_word_count"])
    fraction = ended / len(rows)
    params = sum(p.numel() for p in model.parameters())
    mean_story = sum(story_words) / max(1, len(story_words))
    mean_target = sum(target_words) / max(1, len(target_words))
    print(f"\ntiny model: {params / 1e6:.2f}M params, "
          f"ended with <|im_end|>: {ended}/{len(rows)} = {fraction:.2f}, "
          f"mean story {mean_story:.1f} words vs target {mean_target:.1f}")
    assert fraction >= 0.5
