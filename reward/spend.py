"""Judge spend: billed tokens times the price table (docs/design.md#the-judge). Pure.

What is counted is what the service bills: every attempt's usage (thoughts as output). An attempt
that was sent and never answered (a timeout, a dropped connection, a worker that died with it in
flight) may still be processed and billed by the service, and its usage is never seen; it is
priced at our estimate of its input tokens (the limiter's, ~4 characters a token) plus
judge.unanswered_output_tokens (capped by judge.max_output_tokens). An error status answer (429,
503, 401, ...) bills nothing, nor does a connection that was never made (refused, unreachable).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Prices:
    input_per_mtok: float = 0.50  # dollars per million input tokens, standard tier
    output_per_mtok: float = 3.00  # output, thought tokens included
    flex_factor: float = 0.5  # flex is half price

    @classmethod
    def of(cls, price) -> Prices:
        """From a config's judge.price (conf.schema.JudgePriceConfig)."""
        return cls(price.input_per_mtok, price.output_per_mtok, price.flex_factor)


@dataclass(frozen=True)
class Billing:
    """One story's judge cost so far: tokens billed (an attempt without an answer at its
    estimate) and attempts sent."""

    input_tokens: int = 0
    output_tokens: int = 0
    attempts: int = 0


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
