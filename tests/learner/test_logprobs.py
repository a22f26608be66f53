"""Chunked token logprobs are the unchunked ones (values and gradients), computed without ever
materialising more than one chunk of B x chunk x vocab logits."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from learner.logprobs import token_logprobs
from learner.worker import flush_denormals

pytestmark = pytest.mark.slow  # builds the tiny model once per session


@pytest.fixture(scope="module")
def model(tiny_model_path):
    from transformers import AutoModelForCausalLM

    flush_denormals()
    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)


def right_padded_batch(vocab: int, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    input_ids = torch.randint(0, vocab, (len(lengths), width), generator=g)
    attention_mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return input_ids, attention_mask


def logprobs_and_grads(model, input_ids, attention_mask, temperature, chunk_tokens, min_chunks=0):
    model.zero_grad()
    lp = token_logprobs(model, input_ids, attention_mask, temperature, chunk_tokens, min_chunks=min_chunks)
    weights = torch.linspace(-1.0, 1.0, lp.numel()).view_as(lp)  # every position matters, differently
    (lp * weights * attention_mask[:, 1:]).sum().backward()
    return lp.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("chunk_tokens, temperature", [(7, 0.7), (64, 1.0)])
def test_chunked_logprobs_and_gradients_equal_the_unchunked_ones(model, chunk_tokens, temperature):
    # 40 positions: 7 does not divide them, 64 covers them in one short chunk
    input_ids, attention_mask = right_padded_batch(model.config.vocab_size, [41, 30, 12])
    full_lp, full_grads = logprobs_and_grads(model, input_ids, attention_mask, temperature, 0)
    chunk_lp, chunk_grads = logprobs_and_grads(model, input_ids, attention_mask, temperature, chunk_tokens)

    assert chunk_lp.shape == full_lp.shape == (3, 40)
    torch.testing.assert_close(chunk_lp, full_lp, rtol=0, atol=1e-5)
    for name, grad in full_grads.items():
        torch.testing.assert_close(chunk_grads[name], grad, rtol=1e-4, atol=1e-6 * float(grad.abs().max()))
    assert all(g.abs().sum() > 0 for g in full_grads.values())


def test_chunked_logprobs_without_grad_equal_the_unchunked_ones(model):
    input_ids, attention_mask = right_padded_batch(model.config.vocab_size, [25, 19], seed=1)
    with torch.no_grad():
        full = token_logprobs(model, input_ids, attention_mask, 0.8)
        chunked = token_logprobs(model, input_ids, attention_mask, 0.8, chunk_tokens=5)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-5)


def test_min_chunks_adds_empty_chunks_that_change_nothing(model):
    # ZeRO-3 ranks must call the head equally often whatever their sequence lengths
    input_ids, attention_mask = right_padded_batch(model.config.vocab_size, [21])  # 20 positions
    calls = []
    hook = model.get_output_embeddings().register_forward_hook(lambda *_: calls.append(1))
    try:
        chunked, chunk_grads = logprobs_and_grads(model, input_ids, attention_mask, 1.0, 8)
        assert len(calls) == 2 * 3  # 8 + 8 + 4 positions, run again in backward
        calls.clear()
        padded, padded_grads = logprobs_and_grads(model, input_ids, attention_mask, 1.0, 8, min_chunks=5)
        assert len(calls) == 2 * 5  # and two empty chunks
    finally:
        hook.remove()
    assert torch.equal(padded, chunked)
    for name, grad in chunk_grads.items():
        assert torch.equal(padded_grads[name], grad), name


class VocabSizedTensors(TorchDispatchMode):
    """Records, for every tensor an op allocates with shape [batch, positions, vocab], the
    positions: logits, their softmax, and the gradients of either."""

    def __init__(self, batch: int, vocab: int):
        super().__init__()
        self.batch, self.vocab, self.positions = batch, vocab, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None for r in func._schema.returns):  # views allocate nothing
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[::2] == (self.batch, self.vocab):
                    self.positions.append(t.shape[1])
        return out


def vocab_sized_footprint(model, input_ids, attention_mask, chunk_tokens):
    """(largest [B, n, V] tensor allocated in forward + backward, as n; shapes of the [B, n, V]
    tensors autograd keeps from forward for backward)."""
    vocab = model.config.vocab_size
    saved = []

    def pack(t):
        if t.dim() == 3 and t.shape[-1] == vocab:
            saved.append(tuple(t.shape))
        return t

    allocated = VocabSizedTensors(input_ids.shape[0], vocab)
    with allocated, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp = token_logprobs(model, input_ids, attention_mask, 0.9, chunk_tokens)
        lp.sum().backward()
    model.zero_grad()
    return max(allocated.positions), saved


def test_chunking_bounds_the_logits_held_to_one_chunk(model):
    # The unchunked path allocates T-sized logits and keeps its log_softmax for backward; the
    # chunked one allocates chunk-sized ones only and keeps none (the checkpoint recomputes).
    input_ids, attention_mask = right_padded_batch(model.config.vocab_size, [97, 60])
    vocab = model.config.vocab_size

    largest, saved = vocab_sized_footprint(model, input_ids, attention_mask, 0)
    assert largest == 97
    assert (2, 96, vocab) in saved

    largest, saved = vocab_sized_footprint(model, input_ids, attention_mask, 20)
    assert largest == 20
    assert saved == []
