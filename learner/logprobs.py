"""Token logprobs of a causal LM, with the vocabulary projection done a chunk of positions at a time.

Full logits are B x T x V floats: at T = 16k and Qwen's V = 152k that is ~10 GB in float32, and
log_softmax's backward wants more of the same. The chunked path runs the decoder once, then
projects, normalises and gathers `chunk_tokens` positions at a time; each chunk sits inside a
non-reentrant activation checkpoint, so autograd keeps only the chunk's inputs and its B x chunk
gathered logprobs, and recomputes the chunk's logits during backward. Neither pass ever holds
more than one chunk's B x chunk x V logits.

`PolicyLogprobs` is the module the learner hands DeepSpeed: its forward IS token_logprobs, so the
engine's forward and backward bookkeeping (ZeRO's backward prologue, micro-step counting, the
gradient accumulation boundary) wrap the whole computation, the chunks included.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def token_logprobs(model, input_ids: Tensor, attention_mask: Tensor, temperature: float,
                   chunk_tokens: int = 0, *, min_chunks: int = 0) -> Tensor:
    """log p(token t+1 | tokens <= t) of logits / temperature for every position t, [B, T-1].

    model: a Hugging Face causal LM (not a DeepSpeed engine: wrap the model in PolicyLogprobs and
    call the engine instead). chunk_tokens > 0 projects that many positions at a time; this
    assumes logits = output_embeddings(last hidden state), true for the Qwen and Llama families
    (no logit soft-capping or scaling). min_chunks: call the head at least that often, on empty
    chunks past the end; under ZeRO-3 each call gathers the head's weight from every rank, so
    ranks with sequences of different lengths must still make the same number of calls.
    """
    if chunk_tokens <= 0:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
        return _gathered_logprobs(logits, input_ids[:, 1:], temperature)

    decoder_out = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = decoder_out.last_hidden_state[:, :-1]
    targets = input_ids[:, 1:]
    # The module, not F.linear on its weight: under ZeRO-3 its hooks gather the partitioned weight.
    head = model.get_output_embeddings()
    chunks = []
    num_chunks = max(-(-hidden.shape[1] // chunk_tokens), min_chunks)
    for start in range(0, num_chunks * chunk_tokens, chunk_tokens):
        h, t = hidden[:, start:start + chunk_tokens], targets[:, start:start + chunk_tokens]
        if torch.is_grad_enabled():
            chunks.append(checkpoint(_chunk_logprobs, head, h, t, temperature, use_reentrant=False))
        else:
            chunks.append(_chunk_logprobs(head, h, t, temperature))
    return torch.cat(chunks, dim=1)


def _chunk_logprobs(head: torch.nn.Module, hidden: Tensor, targets: Tensor, temperature: float) -> Tensor:
    return _gathered_logprobs(head(hidden), targets, temperature)


def _gathered_logprobs(logits: Tensor, targets: Tensor, temperature: float) -> Tensor:
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


class PolicyLogprobs(torch.nn.Module):
    """A causal LM whose forward returns token_logprobs: what DeepSpeed wraps in the learner."""

    def __init__(self, causal_lm: torch.nn.Module, *, temperature: float, chunk_tokens: int = 0):
        super().__init__()
        self.causal_lm = causal_lm
        self.temperature = temperature
        self.chunk_tokens = chunk_tokens

    def forward(self, input_ids: Tensor, attention_mask: Tensor, min_chunks: int = 0) -> Tensor:
        return token_logprobs(self.causal_lm, input_ids, attention_mask, self.temperature, self.chunk_tokens,
                              min_chunks=min_chunks)
