"""What the loopback judge server (reward/judge_server.py) does to an accepted request besides
answering it: the seeded faults of the real services."""
from __future__ import annotations

from dataclasses import dataclass, field

OUTCOMES = ("ok", "429", "503", "slow", "hang", "truncated", "schema")


@dataclass
class Faults:
    """Seeded fault injection: each accepted request draws one outcome, rates in field order."""
    p_429: float = 0.0
    p_503: float = 0.0
    p_slow: float = 0.0
    p_hang: float = 0.0
    p_truncated: float = 0.0
    p_schema: float = 0.0
    retry_after_s: int = 1  # the Retry-After of injected 429s
    slow_s: float = 2.0
    hang_s: float = 3600.0  # past any client timeout
    seed: int = 0
    script: list[str] = field(default_factory=list)  # forced outcomes of the first requests

    def __post_init__(self) -> None:
        for outcome, p in self.rates().items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"Faults.p_{outcome} must be in [0, 1], got {p}")
        if sum(self.rates().values()) > 1.0 + 1e-9:
            names = " + ".join(f"p_{o}" for o in self.rates())
            raise ValueError(f"Faults: {names} = {sum(self.rates().values())} exceeds 1")
        unknown = [s for s in self.script if s not in OUTCOMES]
        if unknown:
            raise ValueError(f"Faults.script: unknown outcomes {unknown}; known: {OUTCOMES}")

    def rates(self) -> dict[str, float]:
        return {"429": self.p_429, "503": self.p_503, "slow": self.p_slow, "hang": self.p_hang,
                "truncated": self.p_truncated, "schema": self.p_schema}

    @classmethod
    def mixed(cls, rate: float, *, seed: int = 0, hang_s: float = 3600.0) -> Faults:
        """rate split evenly over 429, 503, hang, truncated and schema."""
        share = rate / 5
        return cls(p_429=share, p_503=share, p_hang=share, p_truncated=share, p_schema=share,
                   hang_s=hang_s, seed=seed)
