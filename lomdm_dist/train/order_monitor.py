"""Watch the learned generation order and say so when it is dead.

A LoMDM run whose forward exponents k_phi all equal c1 trains the ``poly`` scheduler and nothing
else, while every loss curve looks healthy. The spread of k_phi over positions (``k_phi_std``,
logged every step) and the share of saturated NormSig sigmoids (``k_phi_saturated``) tell the two
ways it dies: the head never leaves its zero initialisation, or its sigmoids saturate so that no
gradient reaches it any more. After warm-up, ``patience`` consecutive logged steps below the floor
(or nearly all sigmoids saturated) raise one warning, until the order recovers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class OrderMonitor:
    warmup_steps: int
    """No judgement before the learning rate has warmed up: the head starts at k = c1 by design."""
    spread_floor: float
    """k_phi_std below this counts as no order (0 disables the monitor)."""
    patience: int = 5
    """Consecutive logged steps below the floor before warning."""
    saturated_ceiling: float = 0.9
    """A share of saturated sigmoids above this counts as a dying head."""

    def __post_init__(self) -> None:
        self._below = 0
        self._warned = False

    def update(self, step: int, values: dict) -> str | None:
        """A warning message the first time the order looks dead for ``patience`` logs, else None."""
        if self.spread_floor <= 0 or "k_phi_std" not in values or step <= self.warmup_steps:
            return None
        spread = float(values["k_phi_std"])
        saturated = float(values.get("k_phi_saturated", 0.0))
        if spread >= self.spread_floor and saturated <= self.saturated_ceiling:
            self._below = 0
            self._warned = False
            return None
        self._below += 1
        if self._below < self.patience or self._warned:
            return None
        self._warned = True
        reason = (f"{saturated:.0%} of the phi head's sigmoids are saturated" if saturated > self.saturated_ceiling
                  else f"the spread of k_phi is {spread:.2g} < {self.spread_floor:g}")
        return (f"step {step}: no learned order: {reason} for {self._below} logged steps "
                f"after warm-up (the head has not left k = c1, or has lost its order); the forward scheduler "
                f"is then a fixed polynomial schedule "
                f"(see docs/method.md, 'Keeping the learned order alive')")
