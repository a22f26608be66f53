"""Judge spend: billed tokens times the price table (docs/design.md#the-judge). Pure."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Prices:
    input_per_mtok: float = 0.50  # dollars per million input tokens, standard tier
    output_per_mtok: float = 3.00  # output, thought tokens included
    flex_factor: float = 0.5  # flex is half price


def dollars(input_tokens: int, output_tokens: int, prices: Prices, *, flex: bool) -> float:
    usd = (input_tokens * prices.input_per_mtok + output_tokens * prices.output_per_mtok) / 1e6
    return usd * (prices.flex_factor if flex else 1.0)


def budget_stop_reason(total_usd: float, last_step_usd: float, budget_usd: float) -> str | None:
    """Why the run must stop before its next step, or None. The next step is assumed to cost what
    the last one did, so the cap is not overshot by a whole step."""
    if budget_usd <= 0:
        return None
    if total_usd + last_step_usd > budget_usd:
        return (f"judge spend ${total_usd:.4f} plus the next step's expected ${last_step_usd:.4f} would exceed "
                f"judge.budget_usd=${budget_usd:g}")
    return None
