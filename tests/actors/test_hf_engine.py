"""The transformers engine on CPU: grouped-query attention without the KV copy samples exactly as
transformers' own sdpa attention does."""
import torch
from transformers import AutoTokenizer

from actors.engine import GenerationRequest, HFEngine, SamplingParams
from actors.hf_attention import NAME


def test_grouped_attention_samples_the_same_tokens_and_logprobs_as_sdpa(tiny_model_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    engine = HFEngine(tiny_model_path, dtype=torch.float32, device="cpu", pad_token_id=tok.pad_token_id,
                      stop_token_ids=[tok.convert_tokens_to_ids("<|im_end|>")])
    assert engine.model.config._attn_implementation == NAME
    assert engine.model.config.num_key_value_heads < engine.model.config.num_attention_heads  # grouped heads
    texts = ["Write a story about a lighthouse.", "A tale of two cats in the rain, told slowly and well.", "Storm."]
    requests = [GenerationRequest(f"r{k}", tuple(tok.apply_chat_template(  # prompts of unequal length: padded
        [{"role": "user", "content": texts[k % 3]}], add_generation_prompt=True, tokenize=True, return_dict=False)), k)
        for k in range(6)]
    sampling = SamplingParams(1.0, top_p=0.95, top_k=20, repetition_penalty=1.1, max_new_tokens=32)
    grouped = engine.generate(requests, sampling)
    engine.model.set_attn_implementation("sdpa")
    plain = engine.generate(requests, sampling)
    assert [g.token_ids for g in grouped] == [p.token_ids for p in plain]
    gap = max(abs(a - b) for g, p in zip(grouped, plain) for a, b in zip(g.logprobs, p.logprobs))
    assert gap < 1e-5
