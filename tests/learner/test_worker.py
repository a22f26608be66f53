"""The learner's optimizer step is one token-mean over the whole batch: the same gradient whether
the rows go through one rank or two (ZeRO-3), in one micro-batch or many."""
import json

import pytest
from transformers import AutoTokenizer

from actors.coordinator import ChatCodec
from actors.data import PromptRecord
from cluster.roles import start_roles
from conf import load_config
from learner.worker import TrainBatch, TrainRow, shard_rows

pytestmark = pytest.mark.slow


def test_rows_are_dealt_so_every_rank_runs_the_same_number_of_micro_batches():
    rows = tuple(TrainRow((1,) * n, (2,), 0.0, False) for n in (5, 4, 3, 2, 1))
    rank0, rank1 = shard_rows(rows, 0, 2, 2), shard_rows(rows, 1, 2, 2)
    assert [[len(r.prompt_ids) for r in m] for m in rank0] == [[5, 3], [1]]
    assert [[len(r.prompt_ids) for r in m] for m in rank1] == [[4, 2], []]


def batch_from_stories(tokenizer_path):
    codec = ChatCodec(AutoTokenizer.from_pretrained(tokenizer_path), enable_thinking=True, max_new_tokens=256)
    rows = []
    lines = open("data/tiny/val.jsonl").read().splitlines()[:6]
    for i, line in enumerate(lines):
        r = json.loads(line)
        record = PromptRecord(r["uid"], ({"role": "user", "content": r["prompt"]},), r["target_word_count"],
                              r["story"], r["ground_truth_reasoning"])
        # responses of very different lengths, one teacher-forced reference row
        response = codec.reference(record).ids[: 40 + 30 * i]
        rows.append(TrainRow(codec.prompt_ids(record), response, (-1.0) ** i * (0.5 + 0.1 * i), i == 5))
    return codec, TrainBatch(tuple(rows), step=3)


def test_one_rank_and_two_ranks_take_the_same_step(ray_address, tiny_model_path, tmp_path):
    codec, batch = batch_from_stories(tiny_model_path)
    results = {}
    for world, zero, micro in [(1, 1, 16), (1, 1, 1), (2, 3, 2)]:
        cfg = load_config([f"learner.world_size={world}", f"learner.zero_stage={zero}",
                           f"learner.micro_batch_size={micro}"])
        roles = start_roles(cfg, model_path=tiny_model_path, stop_token_ids=codec.stop_ids,
                            pad_token_id=codec.tok.pad_token_id, judge_base_url="http://127.0.0.1:9",
                            run_name=f"split-{world}-{zero}-{micro}", output_dir=str(tmp_path))
        try:
            results[(world, zero, micro)] = roles.train(batch)
        finally:
            roles.shutdown()
    reference = results[(1, 1, 16)]
    for key, metrics in results.items():
        assert metrics["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4), key
        assert metrics["loss"] == pytest.approx(reference["loss"], rel=1e-4, abs=1e-7), key
    assert reference["grad_norm"] > 0
