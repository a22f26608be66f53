"""Reward side: components (POLARIS reward formula, pure), rubric (judge prompt, schema, score),
judge_api + gemini_api / openai_api (one judge call per service), judge_client (retries under the
rate limit), limiter (the project-wide rate limit), worker (judge + reward, an async Ray actor),
pool (the driver's side: batching, per-story futures, cache, spend, per-step metrics), cache,
spend, judge_watch (a dead judge noticed), and judge_server (the loopback test double of the
judge services, with stand_in_faults, stand_in_scores and stand_in_wire)."""
