"""Learner side: grpo (GRPO/HRI math, pure), worker (DeepSpeed learner rank + weight send),
logprobs (chunked token logprobs), microbatch (token-budget packing), memory_plan + model_shapes
(the start-up memory plan), tiny_model (the locally built CPU policy)."""
