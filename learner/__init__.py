"""Learner side: grpo (GRPO/HRI math, pure), worker (DeepSpeed learner rank + weight send),
tiny_model (the locally built CPU policy)."""
