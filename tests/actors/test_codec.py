"""actors/codec.py on a Qwen-style tokenizer (the special tokens in Qwen's id order: <|endoftext|>
below <|im_start|> below <|im_end|>), built here in milliseconds: prompt ids, the response split,
and the reference row, which ends exactly as a policy turn ends."""
import pytest

from actors.codec import ChatCodec
from actors.data import PromptRecord
from learner.tiny_model import CHAT_TEMPLATE, train_tokenizer

ROWS = [{"prompt": "Write about a fox in the snow.", "ground_truth_reasoning": "Plan: a fox, then snow.",
         "story": "The fox ran over the hill and the snow fell on the quiet wood."}] * 4
RECORD = PromptRecord("u0", ({"role": "user", "content": "Write about a fox in the snow."},), 90,
                      ROWS[0]["story"], ROWS[0]["ground_truth_reasoning"])
# a template whose generation prompt opens the thinking block itself (as newer Qwen templates do)
OPENS_THINKING = CHAT_TEMPLATE.replace(
    "{%- if enable_thinking is defined and enable_thinking is false %}",
    "{%- if enable_thinking is not defined or enable_thinking %}{{- '<think>\\n' }}{%- endif %}"
    "{%- if enable_thinking is defined and enable_thinking is false %}")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(ROWS, vocab_size=300)


def codec(tokenizer, thinking=True, max_new_tokens=256, template=None):
    if template is not None:
        tokenizer = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", chat_template=template)
    return ChatCodec(tokenizer, enable_thinking=thinking, max_new_tokens=max_new_tokens)


def ids(tokenizer, *names):
    return [tokenizer.convert_tokens_to_ids(n) for n in names]


def test_the_tokenizer_orders_its_special_tokens_as_qwen_does(tokenizer):
    end_of_text, im_start, im_end = ids(tokenizer, "<|endoftext|>", "<|im_start|>", "<|im_end|>")
    assert end_of_text < im_start < im_end


def test_prompt_ids_are_the_rendered_template_with_the_generation_prompt(tokenizer):
    c = codec(tokenizer)
    text = "<|im_start|>user\nWrite about a fox in the snow.<|im_end|>\n<|im_start|>assistant\n"
    assert c.prompt_ids(RECORD) == tuple(tokenizer.encode(text, add_special_tokens=False))
    no_thinking = tokenizer.decode(codec(tokenizer, thinking=False).prompt_ids(RECORD))
    assert no_thinking.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_the_reference_row_ends_with_the_end_of_turn_token_a_policy_stops_with(tokenizer):
    c = codec(tokenizer)
    (im_end,) = ids(tokenizer, "<|im_end|>")
    ref = c.reference(RECORD)
    assert c.end_of_turn == im_end and ref.ids[-1] == im_end  # not <|endoftext|>, the lowest stop id
    assert tokenizer.decode(ref.ids) == ("<think>\nPlan: a fox, then snow.\n</think>\n\n"
                                         "The fox ran over the hill and the snow fell on the quiet wood.<|im_end|>")
    assert ref.story == RECORD.story and not ref.truncated
    assert ref.ids[ref.story_start - 1] == tokenizer.convert_tokens_to_ids("</think>")


def test_the_reference_row_without_thinking_and_under_a_template_that_opens_thinking(tokenizer):
    (im_end,) = ids(tokenizer, "<|im_end|>")
    plain = codec(tokenizer, thinking=False).reference(RECORD)
    assert tokenizer.decode(plain.ids) == RECORD.story + "<|im_end|>" and plain.story_start == 0
    opened = codec(tokenizer, template=OPENS_THINKING)
    assert tokenizer.decode(opened.prompt_ids(RECORD)).endswith("<|im_start|>assistant\n<think>\n")
    ref = opened.reference(RECORD)
    assert tokenizer.decode(ref.ids).startswith("Plan: a fox")  # the prompt opened it: no second <think>
    assert ref.ids[-1] == im_end and ref.story == RECORD.story


def test_a_long_reference_is_cut_at_the_response_limit(tokenizer):
    ref = codec(tokenizer, max_new_tokens=5).reference(RECORD)
    assert len(ref.ids) == 5 and ref.truncated and ref.story == "" and ref.story_start == 5


def test_the_response_split_follows_the_first_close_of_thinking(tokenizer):
    c = codec(tokenizer)
    im_end, think_end = ids(tokenizer, "<|im_end|>", "</think>")
    words = tuple(tokenizer.encode(" fox snow", add_special_tokens=False))
    closed = c.response(words + (think_end,) + words + (think_end,) + words + (im_end,), "stop")
    assert closed.story_start == len(words) + 1 and closed.story == "fox snow</think> fox snow"
    assert closed.text == " fox snow</think> fox snow</think> fox snow" and not closed.truncated
    unclosed = c.response(words, "length")
    assert unclosed.story_start == len(words) and unclosed.story == "" and unclosed.truncated
    plain = codec(tokenizer, thinking=False).response(words + (im_end,), "stop")
    assert plain.story_start == 0 and plain.story == "fox snow"
