"""How prompts, rollouts and reference stories become tokens: the chat template and tokenizer
conventions every role shares, and the per-sample seed."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from actors.data import PromptRecord


@dataclass(frozen=True)
class Tokenized:
    """One response as the reward and the learner need it."""

    ids: tuple[int, ...]
    text: str  # decoded, the stop token removed, <think> markers kept
    story_start: int
    truncated: bool


class ChatCodec:
    """Chat template + tokenizer conventions shared by prompts, rollouts and reference rows."""

    def __init__(self, tokenizer, *, enable_thinking: bool, max_new_tokens: int):
        self.tok = tokenizer
        self.enable_thinking = enable_thinking
        self.max_new_tokens = max_new_tokens
        self.stop_ids = sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                tokenizer.convert_tokens_to_ids("<|endoftext|>")} - {None, tokenizer.unk_token_id})
        self.think_end = tokenizer.convert_tokens_to_ids("</think>")

    def prompt_ids(self, record: PromptRecord) -> tuple[int, ...]:
        text = self.tok.apply_chat_template(list(record.messages), tokenize=False, add_generation_prompt=True,
                                            enable_thinking=self.enable_thinking)
        return tuple(self.tok.encode(text, add_special_tokens=False))

    def response(self, ids: tuple[int, ...], finish_reason: str) -> Tokenized:
        body = ids[:-1] if ids and ids[-1] in self.stop_ids else ids
        if self.think_end in body:
            story_start = body.index(self.think_end) + 1
        else:  # never closed its thinking: all of it is thinking (split_thinking agrees)
            story_start = len(ids) if self.enable_thinking else 0
        return Tokenized(ids, self.tok.decode(body, skip_special_tokens=False), story_start, finish_reason == "length")

    def reference(self, record: PromptRecord) -> Tokenized:
        """The human reference as a response: <think>reasoning</think> story <eos>, truncated."""
        text = f"<think>\n{record.reasoning}\n</think>\n\n{record.story}" if self.enable_thinking else record.story
        ids = tuple(self.tok.encode(text, add_special_tokens=False)) + (self.stop_ids[0],)
        truncated = len(ids) > self.max_new_tokens
        return self.response(ids[:self.max_new_tokens], "length" if truncated else "stop")


def sample_seed(seed: int, step: int, uid: str, index: int) -> int:
    """Depends only on (run seed, step, prompt, sample index), not on which engine serves it."""
    digest = hashlib.sha256(f"{seed}/{step}/{uid}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
