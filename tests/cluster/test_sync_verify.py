"""The checks of a weight sync (cluster/sync_verify.py) and the injected faults' pure parts
(cluster/sync_faults.py): the checksum sees any changed byte, verification names the engine
and the part that failed, the misloading stream swaps exactly one pair of projections."""
import math

import pytest
import torch
from transformers import AutoTokenizer

from cluster.sync_faults import SyncFault, bucket_hook, misloaded
from cluster.sync_verify import PROBE_TOKENS, SyncReport, checksum, probe_token_ids, probe_tolerance, verify_sync
from conf.errors import WeightSyncError


@pytest.mark.parametrize("dtype,numel", [(torch.float32, 1001), (torch.bfloat16, 1003), (torch.int64, 7)])
def test_the_checksum_changes_with_any_byte_and_not_otherwise(dtype, numel):
    t = (torch.randn(numel) * 100).to(dtype)
    raw = t.view(torch.uint8)
    base = checksum(t).item()
    assert checksum(t.clone()).item() == base and checksum(raw).item() == base
    for at in (0, 8, raw.numel() // 2, raw.numel() - 1):  # the 64-bit words and the tail bytes
        flipped = raw.clone()
        flipped[at] ^= 0x01
        assert checksum(flipped).item() != base, at


def test_the_probe_is_the_fixed_text_and_fills_its_length(tiny_model_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    ids = probe_token_ids(tok)
    assert len(ids) == PROBE_TOKENS and probe_token_ids(tok) == ids
    assert tok.decode(ids[:8]).startswith("The lighthouse keeper")
    assert probe_tolerance(torch.bfloat16) > probe_tolerance(torch.float32) and probe_tolerance(torch.float32, 0.5) == 0.5


SENT = SyncReport(((11, 22, 33),), (-1.0, -2.0, -0.5, -3.0))


def test_a_sync_that_arrived_and_loaded_as_sent_passes_with_its_gap():
    engines = [SyncReport(((11, 22, 33),), (-1.0, -2.0, -0.5, -3.0)),
               SyncReport(((11, 22, 33), (11, 22, 33)), (-1.0, -2.0, -0.5, -3.04))]  # two TP shards
    assert verify_sync(4, SENT, engines, 0.02) == {"sync/probe_gap": pytest.approx(0.01)}
    assert verify_sync(4, SyncReport(SENT.checksums), [SyncReport(((11, 22, 33),))], 0.02) == {}  # no probe this time


@pytest.mark.parametrize("received,message", [
    (SyncReport(((11, 22, 33), (11, 99, 33)), SENT.probe), "(transport): engine 1 shard 1 received bucket 1 of 3"),
    (SyncReport(((11, 22),), SENT.probe), "(transport): engine 1 shard 0 received 2 buckets of 3"),
    (SyncReport(((11, 22, 33),), (-1.0, -2.0, -0.5, -4.0)), "(load): engine 1 scores the probe 0.25 nats per token"),
    (SyncReport(((11, 22, 33),), (-1.0, math.nan, -0.5, -3.0)), "(load): engine 1 gives non-finite"),
    (SyncReport(((11, 22, 33),), (-1.0,)), "(load): engine 1 scored 1 probe tokens, the learner 4"),
])
def test_a_sync_that_did_not_fails_naming_the_engine_and_the_part(received, message):
    with pytest.raises(WeightSyncError, match="weight sync v7 failed verification") as e:
        verify_sync(7, SENT, [SyncReport(((11, 22, 33),), SENT.probe), received], 0.02)
    assert message in str(e.value)


def test_the_bucket_hooks_strike_after_their_bucket_only():
    flat = torch.zeros(64, dtype=torch.float32)
    flip = bucket_hook(SyncFault("corrupt_bucket", after_bucket=2))
    flip(1, flat)
    assert not flat.any()
    flip(2, flat)
    assert flat.view(torch.uint8).count_nonzero() == 1
    refuse = bucket_hook(SyncFault("engine_refuses", after_bucket=0))
    with pytest.raises(WeightSyncError, match="after bucket 0 \\(injected fault\\)"):
        refuse(0, flat)
    assert bucket_hook(None) is None and bucket_hook(SyncFault("corrupt_loaded")) is None


def test_misloading_swaps_layer_0_gate_and_up_and_nothing_else():
    a, b, c, d = (torch.full((2,), float(i)) for i in range(4))
    stream = [("model.layers.0.mlp.gate_proj.weight", a), ("model.layers.0.mlp.up_proj.weight", b),
              ("model.layers.0.mlp.down_proj.weight", c), ("model.layers.1.mlp.gate_proj.weight", d)]
    out = list(misloaded(iter(stream)))
    assert [n for n, _ in out] == [n for n, _ in stream]
    assert [t[0].item() for _, t in out] == [1.0, 0.0, 2.0, 3.0]
    with pytest.raises(WeightSyncError, match="no pair of gate and up"):
        list(misloaded(iter(stream[:1])))
