"""Which rows each learner rank runs, in which micro-batches: pure, the same answer on every rank.

Two modes:
- by token budget (max_tokens > 0): rows are dealt to ranks so each rank's token count is about
  equal, then packed, longest first, into micro-batches whose padded size stays in the budget;
- by row count (max_tokens = 0): rows dealt round robin by length, max_rows per micro-batch.

Either way every rank runs the same number of micro-batches: ZeRO reduces gradients inside each
backward, so ranks must call it equally often; a rank with fewer gets empty ones at the end.
"""
from __future__ import annotations


def pack_micro_batches(lengths: list[int], rank: int, world_size: int, max_tokens: int,
                       max_rows: int) -> list[list[int]]:
    """Row indices of this rank's micro-batches, each micro-batch longest row first.

    lengths: every row's token count (prompt + response), for the whole batch.
    max_tokens > 0: a micro-batch's padded size, rows x its longest row, stays <= max_tokens;
    max_rows is not used. A row longer than max_tokens on its own goes into a micro-batch alone
    (over the budget: rows are never split).
    max_tokens = 0: up to max_rows rows per micro-batch.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep row order
    if max_tokens > 0:
        per_rank = [_pack_by_tokens(rows, lengths, max_tokens)
                    for rows in _deal_by_tokens(order, lengths, world_size)]
    else:
        per_rank = [_pack_by_rows(order[r::world_size], max_rows) for r in range(world_size)]
    num_micro = max(1, *(len(micro) for micro in per_rank))
    mine = per_rank[rank]
    return mine + [[] for _ in range(num_micro - len(mine))]


def _deal_by_tokens(order: list[int], lengths: list[int], world_size: int) -> list[list[int]]:
    """Longest first, each row to the rank with the fewest tokens so far (lowest rank on ties)."""
    ranks: list[list[int]] = [[] for _ in range(world_size)]
    tokens = [0] * world_size
    for i in order:
        r = tokens.index(min(tokens))
        ranks[r].append(i)
        tokens[r] += lengths[i]
    return ranks


def _pack_by_tokens(rows: list[int], lengths: list[int], max_tokens: int) -> list[list[int]]:
    """rows come longest first, so a micro-batch's first row sets its padded width."""
    micro: list[list[int]] = []
    for i in rows:
        if micro and (len(micro[-1]) + 1) * lengths[micro[-1][0]] <= max_tokens:
            micro[-1].append(i)
        else:
            micro.append([i])
    return micro


def _pack_by_rows(rows: list[int], max_rows: int) -> list[list[int]]:
    return [rows[i:i + max_rows] for i in range(0, len(rows), max_rows)]
