"""How prompts, rollouts and reference stories become tokens: the chat template and tokenizer
conventions every role shares, and the per-sample seed."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from actors.data import PromptRecord
from reward.components import find_story_start


@dataclass(frozen=True)
class Tokenized:
    """One response as the reward and the learner need it."""

    ids: tuple[int, ...]
    text: str  # decoded, the end token removed, <think> markers kept
    story: str  # what the judge reads: the tokens from story_start on, decoded, stripped
    story_start: int  # index of the first story token; the tokens before it are thinking
    truncated: bool


class ChatCodec:
    """Chat template + tokenizer conventions shared by prompts, rollouts and reference rows."""

    def __init__(self, tokenizer, *, enable_thinking: bool, max_new_tokens: int):
        self.tok = tokenizer
        self.enable_thinking = enable_thinking
        self.max_new_tokens = max_new_tokens
        self.end_of_turn = self._end_of_turn_id()
        self.stop_ids = sorted({self.end_of_turn, tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                tokenizer.convert_tokens_to_ids("<|endoftext|>")} - {None, tokenizer.unk_token_id})
        self.think_end = tokenizer.convert_tokens_to_ids("</think>")

    @classmethod
    def from_config(cls, tokenizer, cfg) -> ChatCodec:
        """A run's codec: model.enable_thinking; reference rows cut at rollout.sampling.max_new_tokens."""
        return cls(tokenizer, enable_thinking=cfg.model.enable_thinking,
                   max_new_tokens=cfg.rollout.sampling.max_new_tokens)

    def _end_of_turn_id(self) -> int:
        """The token the chat template closes an assistant turn with (<|im_end|> for Qwen): the one
        a policy emits to stop, so the reference row ends with it too."""
        marker = "polaris-end-of-turn-probe"
        text = self.tok.apply_chat_template([{"role": "user", "content": "?"}, {"role": "assistant", "content": marker}],
                                            tokenize=False, enable_thinking=self.enable_thinking)
        after = text[text.rindex(marker) + len(marker):]
        ids = self.tok.encode(after, add_special_tokens=False)
        if not ids:
            raise ValueError("the chat template writes nothing after an assistant turn: no end-of-turn token")
        return ids[0]

    def _render(self, record: PromptRecord) -> str:
        return self.tok.apply_chat_template(list(record.messages), tokenize=False, add_generation_prompt=True,
                                            enable_thinking=self.enable_thinking)

    def prompt_ids(self, record: PromptRecord) -> tuple[int, ...]:
        return tuple(self.tok.encode(self._render(record), add_special_tokens=False))

    def response(self, ids: tuple[int, ...], finish_reason: str) -> Tokenized:
        """Split by the one rule of reward/components.py: thinking ends at the first </think>."""
        body = ids[:-1] if ids and ids[-1] in self.stop_ids else ids
        start = find_story_start(ids, self.think_end, thinking=self.enable_thinking)
        return Tokenized(ids, self.tok.decode(body, skip_special_tokens=False),
                         self.tok.decode(body[start:], skip_special_tokens=False).strip(), start,
                         finish_reason == "length")

    def reference(self, record: PromptRecord) -> Tokenized:
        r"""The human reference written as a policy turn: "<think>\n{reasoning}\n</think>\n\n{story}"
        (the story alone without thinking) and the template's end-of-turn token, truncated to the
        response limit. A template whose generation prompt already opens the thinking block
        (ends with "<think>\n") gets the reasoning without that opening."""
        if self.enable_thinking:
            opening = "" if self._render(record).endswith("<think>\n") else "<think>\n"
            text = f"{opening}{record.reasoning}\n</think>\n\n{record.story}"
        else:
            text = record.story
        ids = tuple(self.tok.encode(text, add_special_tokens=False)) + (self.end_of_turn,)
        truncated = len(ids) > self.max_new_tokens
        return self.response(ids[:self.max_new_tokens], "length" if truncated else "stop")


def sample_seed(seed: int, step: int, uid: str, index: int) -> int:
    """Depends only on (run seed, step, prompt, sample index), not on which engine serves it."""
    digest = hashlib.sha256(f"{seed}/{step}/{uid}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
