"""Reward side: components (POLARIS reward formula, pure), rubric (judge prompt, schema, score),
judge_client (Gemini via google-genai), judge_server (loopback Gemini-compatible judge),
worker (judge + reward for a batch of stories)."""
