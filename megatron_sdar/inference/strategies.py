"""Which masked positions of a block to finalise after a denoising forward (remasking strategies).

* ``sequential``: the leftmost masked positions, ``quota`` per step (left-to-right decoding);
* ``low_confidence_static``: the ``quota`` most confident, the block's masked count spread evenly
  over ``steps`` forwards;
* ``low_confidence_dynamic``: every position whose confidence exceeds ``tau``, at least
  ``min_per_step`` (the most confident) otherwise; ``tau = 1`` is one-per-step static decoding;
* ``entropy_bounded``: positions in increasing entropy while their summed entropy stays within
  ``entropy_bound``, at least one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

STRATEGIES = ("sequential", "low_confidence_static", "low_confidence_dynamic", "entropy_bounded")


@dataclass(frozen=True)
class StrategyConfig:
    name: str = "low_confidence_dynamic"
    steps: int | None = None  # static schedule length (default: the block size)
    tau: float = 0.9
    min_per_step: int = 1
    entropy_bound: float = 0.5

    def __post_init__(self) -> None:
        if self.name not in STRATEGIES:
            raise ValueError(f"unknown decoding strategy {self.name!r}; choose one of {STRATEGIES}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"tau must be in [0, 1], got {self.tau}")
        if self.min_per_step < 1:
            raise ValueError(f"min_per_step must be >= 1, got {self.min_per_step}")
        if self.entropy_bound < 0:
            raise ValueError(f"entropy_bound must be >= 0, got {self.entropy_bound}")

    @property
    def uses_tau(self) -> bool:
        return self.name == "low_confidence_dynamic"

    def settings(self, block_size: int) -> dict:
        """The strategy and only the knobs it reads (for reports): ``steps`` for the static schedules,
        ``tau`` and ``min_per_step`` for the dynamic one, ``entropy_bound`` for the entropy one."""
        out: dict = {"strategy": self.name}
        if self.name in ("sequential", "low_confidence_static"):
            out["steps"] = self.steps or block_size
        elif self.uses_tau:
            out.update(tau=self.tau, min_per_step=self.min_per_step)
        else:
            out["entropy_bound"] = self.entropy_bound
        return out


def static_quota(masked_at_start: torch.Tensor, steps: int, step: int) -> torch.Tensor:
    """Positions to finalise at ``step`` (0-based) when ``masked_at_start`` (per row) are spread
    over ``steps`` forwards: the remainder goes to the first steps; never below one."""
    base = masked_at_start // steps
    extra = (step < masked_at_start % steps).long()
    return (base + extra).clamp_min(1)


def select(
    config: StrategyConfig,
    masked: torch.Tensor,
    confidence: torch.Tensor,
    entropy: torch.Tensor,
    quota: torch.Tensor,
) -> torch.Tensor:
    """Boolean ``[b, n]``: the masked positions to finalise now (at least one per row that has any)."""
    b, n = masked.shape
    order_key: torch.Tensor
    if config.name == "sequential":
        order_key = -torch.arange(n, device=masked.device, dtype=torch.float32).expand(b, n)
    elif config.name == "entropy_bounded":
        order_key = -entropy.float()
    else:
        order_key = confidence.float()
    order_key = order_key.masked_fill(~masked, float("-inf"))
    ranked = torch.argsort(order_key, dim=-1, descending=True)
    rank = torch.empty_like(ranked).scatter_(-1, ranked, torch.arange(n, device=masked.device).expand(b, n))
    if config.name in ("sequential", "low_confidence_static"):
        take = rank < quota.unsqueeze(-1)
    elif config.name == "low_confidence_dynamic":
        take = (confidence > config.tau) | (rank < config.min_per_step)
    else:
        sorted_entropy = entropy.float().gather(-1, ranked).masked_fill(~masked.gather(-1, ranked), 0.0)
        within = sorted_entropy.cumsum(-1) <= config.entropy_bound
        within[:, 0] = True
        take = within.gather(-1, rank)
    return take & masked
