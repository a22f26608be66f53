"""A tiny Qwen3 (or Qwen3.5-architecture) policy built locally: the CPU stand-in for the real
base model.

No registry ships a small causal LM with a chat template and a thinking switch, so we build
one from the synthetic corpus the project ships (data/tiny/corpus.jsonl):

  (a) a byte-level BPE tokenizer (the `tokenizers` library), Qwen-style special tokens;
  (b) a Qwen3-like chat template with `enable_thinking` and `add_generation_prompt`;
  (c) a seeded model: architecture "qwen3", a Qwen3ForCausalLM (hidden 192, 6 layers, 4 heads /
      2 kv heads, tied head); or "qwen3_5", a Qwen3_5ForCausalLM shaped like Qwen3.5-9B's text
      model at small dims (hidden 192, Gated DeltaNet linear attention and gated full attention
      in the 9B's 3:1 ratio, partial rotary 0.25, untied head);
  (d) a short deterministic causal-LM warm-up on the corpus in chat format (loss on the
      assistant turn), so the policy writes story-like text and stops with <|im_end|>: 150 steps
      for qwen3, 300 for qwen3_5 (after 150, RL on one seed of three drifted into thinking it
      never closed with </think>: bench/learning.py conf=tiny35, measured);
  (e) save_pretrained (safetensors) + tokenizer + build_info.json.

The result lives in `cache_root/tiny-<hash>` (tiny35-<hash> for qwen3_5), where the hash covers every build parameter,
the recipe version and the corpus bytes; it is built once (atomically, under a file lock)
and reused after. Same parameters and seed -> bit-identical weights.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from conf.errors import DataError

RECIPE_VERSION = 1  # bump when the recipe below changes: invalidates cached builds
DEFAULT_CORPUS = Path(__file__).resolve().parents[1] / "data" / "tiny" / "corpus.jsonl"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # special: hidden on decode
THINK_TOKENS = ["<think>", "</think>"]  # added but not special: the reward splits on them
NO_THINKING_SHARE = 0.1  # warm-up rows rendered with enable_thinking=False
ARCHITECTURES = {"qwen3": (6, 150), "qwen3_5": (4, 300)}  # -> default (layers, warm-up steps)

# Qwen3's template, minus tools: an assistant turn with reasoning renders as
# "<think>\n{reasoning}\n</think>\n\n{content}"; the generation prompt with
# enable_thinking=False inserts the empty think block, so the model writes the story only.
CHAT_TEMPLATE = """\
{%- for message in messages %}
    {%- if message.role == 'assistant' %}
        {%- set content = message.content if message.content is string else '' %}
        {%- set reasoning = message.reasoning_content if message.reasoning_content is string else '' %}
        {%- if not reasoning and '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].split('<think>')[-1] %}
            {%- set content = content.split('</think>')[-1] %}
        {%- endif %}
        {{- '<|im_start|>assistant\\n' }}
        {%- if reasoning %}
            {{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' }}
        {%- endif %}
        {{- content.lstrip('\\n') + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""


def build_tiny_model(
    cache_root: str | Path | None = None,
    *,
    seed: int = 0,
    architecture: str = "qwen3",
    hidden_size: int = 192,
    num_layers: int | None = None,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 512,
    vocab_size: int = 8192,
    max_position_embeddings: int = 1024,
    warmup_steps: int | None = None,
    batch_size: int = 16,
    lr: float = 3e-3,
    corpus_path: str | Path | None = None,
    show_progress: bool = True,
) -> Path:
    """Return a folder loadable by AutoModelForCausalLM/AutoTokenizer.from_pretrained.

    `vocab_size` caps the BPE vocabulary; the corpus is small, so the tokenizer usually
    stops below it, and the model's embedding is the tokenizer size padded to a multiple
    of 64 (as Qwen pads its vocabulary). num_layers: 6 for qwen3, 4 for qwen3_5 (three linear-
    attention layers, then a full-attention one).
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown tiny model architecture {architecture!r}; valid: {', '.join(ARCHITECTURES)}")
    corpus_path = Path(corpus_path) if corpus_path is not None else DEFAULT_CORPUS
    if not corpus_path.is_file():
        raise DataError(f"tiny model corpus {corpus_path} not found; "
                        "run `python data/make_synthetic.py` to write it")
    params = dict(recipe=RECIPE_VERSION, seed=seed, hidden_size=hidden_size,
                  num_layers=num_layers or ARCHITECTURES[architecture][0], num_heads=num_heads, num_kv_heads=num_kv_heads,
                  intermediate_size=intermediate_size, vocab_size=vocab_size,
                  max_position_embeddings=max_position_embeddings,
                  warmup_steps=ARCHITECTURES[architecture][1] if warmup_steps is None else warmup_steps,
                  batch_size=batch_size, lr=lr)
    if architecture != "qwen3":  # the Qwen3 build's key (and its cached folders) stay as they were
        params["architecture"] = architecture
    corpus_bytes = corpus_path.read_bytes()
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()
                         + hashlib.sha256(corpus_bytes).digest()).hexdigest()[:12]
    root = Path(cache_root if cache_root is not None
                else os.environ.get("POLARIS_CACHE", Path.home() / ".cache" / "polaris-rl"))
    name = "tiny" if architecture == "qwen3" else "tiny35"
    final = root / f"{name}-{key}"
    if (final / "build_info.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{name}-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (final / "build_info.json").is_file():  # another process built it meanwhile
            return final
        for stale in root.glob(f".{name}-{key}.tmp-*"):  # a crashed build's leftovers
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-{key}.tmp-", dir=root))
        try:
            _build(tmp, params, _read_corpus(corpus_path, corpus_bytes), show_progress)
            tmp.chmod(0o755)  # mkdtemp makes it owner-only
            if final.exists():  # a half folder someone else left without build_info.json
                shutil.rmtree(final)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def _read_corpus(path: Path, data: bytes) -> list[dict]:
    rows = []
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append({k: str(row[k]) for k in ("prompt", "story", "ground_truth_reasoning")})
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{path}:{n}: not a story row with prompt, story and "
                            f"ground_truth_reasoning ({e})") from None
    if not rows:
        raise DataError(f"{path} has no rows")
    return rows


def _build(out: Path, params: dict, rows: list[dict], show_progress: bool) -> None:
    import torch
    from transformers import GenerationConfig

    started = time.time()
    tokenizer = train_tokenizer(rows, params["vocab_size"])
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(params["seed"])
    model = _model(params, vocab_size=math.ceil(len(tokenizer) / 64) * 64, eos_id=eos_id, pad_id=pad_id)
    config = model.config
    losses = _warm_up(model, tokenizer, rows, params, show_progress)

    model.generation_config = GenerationConfig(
        bos_token_id=None, eos_token_id=[eos_id, pad_id], pad_token_id=pad_id)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    every = max(1, len(losses) // 20)
    info = {
        "params": params,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "tokenizer_size": len(tokenizer),
        "model_vocab_size": config.vocab_size,
        "corpus_rows": len(rows),
        "loss_first": losses[0] if losses else None,
        "loss_last10_mean": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
        "loss_curve": {i: round(losses[i], 4) for i in range(0, len(losses), every)},
        "build_seconds": round(time.time() - started, 1),
    }
    (out / "build_info.json").write_text(json.dumps(info, indent=1) + "\n")


def _model(params: dict, *, vocab_size: int, eos_id: int, pad_id: int):
    """The seeded, untrained model of the build's architecture, in float32."""
    import torch
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig, Qwen3Config, Qwen3ForCausalLM

    hidden, layers, heads = params["hidden_size"], params["num_layers"], params["num_heads"]
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=params["intermediate_size"],
                  num_hidden_layers=layers, num_attention_heads=heads, head_dim=hidden // heads,
                  max_position_embeddings=params["max_position_embeddings"], bos_token_id=None,
                  eos_token_id=eos_id, pad_token_id=pad_id, dtype="float32")
    if params.get("architecture", "qwen3") == "qwen3":
        config = Qwen3Config(**common, num_key_value_heads=params["num_kv_heads"], max_window_layers=layers,
                             tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                             architectures=["Qwen3ForCausalLM"])
        return Qwen3ForCausalLM(config).to(torch.float32)
    # Qwen3.5-9B's text model at small dims: 3 Gated DeltaNet layers to 1 gated full-attention layer,
    # 4:1 query to kv heads, twice as many linear value heads as key heads, value heads x head dim =
    # hidden, a quarter of each head rotary, untied head
    config = Qwen3_5TextConfig(**common, num_key_value_heads=max(1, heads // 4),
                               layer_types=[("full" if (i + 1) % 4 == 0 else "linear") + "_attention"
                                            for i in range(layers)],
                               linear_num_key_heads=heads // 2, linear_num_value_heads=heads,
                               linear_key_head_dim=hidden // heads, linear_value_head_dim=hidden // heads,
                               linear_conv_kernel_dim=4, tie_word_embeddings=False,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                "partial_rotary_factor": 0.25},
                               architectures=["Qwen3_5ForCausalLM"])
    return Qwen3_5ForCausalLM(config).to(torch.float32)


def train_tokenizer(rows: list[dict], vocab_size: int):
    """A byte-level BPE tokenizer trained on rows (prompt, reasoning, story), Qwen3's special tokens
    in Qwen's id order (<|endoftext|> < <|im_start|> < <|im_end|>), <think> markers, the chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    texts = (r[k] for r in rows for k in ("prompt", "ground_truth_reasoning", "story"))
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        model_max_length=1024, chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False)


def _warm_up(model, tokenizer, rows: list[dict], params: dict, show_progress: bool):
    """Causal-LM training on the corpus in chat format; loss on the assistant turn only.

    Deterministic: fixed seed, fixed batch order (a seeded permutation per epoch)."""
    import torch
    from tqdm.auto import tqdm

    steps, batch_size = params["warmup_steps"], params["batch_size"]
    if steps <= 0:
        return []
    from learner.worker import flush_denormals

    flush_denormals()  # process-wide; torch offers no getter to restore the caller's setting
    gen = torch.Generator().manual_seed(params["seed"])
    examples = []
    for i, row in enumerate(rows):
        thinking = (i % round(1 / NO_THINKING_SHARE)) != 0
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}], tokenize=False,
            add_generation_prompt=True, enable_thinking=thinking)
        response = (f"<think>\n{row['ground_truth_reasoning']}\n</think>\n\n" if thinking
                    else "") + row["story"] + "<|im_end|>"
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        ids = (p_ids + r_ids)[: params["max_position_embeddings"]]
        labels = ([-100] * len(p_ids) + r_ids)[: len(ids)]
        examples.append((ids, labels))

    opt = torch.optim.AdamW(model.parameters(), lr=params["lr"], betas=(0.9, 0.95),
                            weight_decay=0.01)
    ramp = max(1, steps // 10)  # linear warm-up, then cosine decay to 10% of lr
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(
        (s + 1) / ramp, 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    pad_id = tokenizer.pad_token_id
    order: list[int] = []
    losses = []
    model.train()
    bar = tqdm(range(steps), desc="tiny model warm-up", disable=not show_progress)
    for _ in bar:
        if len(order) < batch_size:
            order += torch.randperm(len(examples), generator=gen).tolist()
        batch, order = [examples[i] for i in order[:batch_size]], order[batch_size:]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses
