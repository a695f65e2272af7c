"""An exponential moving average of a model's trainable weights, swapped into the model where it is used.

DiffusionNFT's old policy is such an average of the trained weights (Zheng et al. 2025; the reference code keeps it
as a second LoRA adapter), updated after each optimizer step with a decay that grows with the step. Kept here as
float32 copies of the trainable parameters: `swapped_in()` puts them into the model for a forward without grad and
puts the trained weights back. Registered with accelerate (`state_dict` / `load_state_dict`), so checkpoints hold
it and a resume continues it exactly.
"""
from contextlib import contextmanager
from typing import Callable, List

import torch


def nft_decay(step: int, schedule: int) -> float:
    """DiffusionNFT's decay of the old policy after update `step` (from 0): 0 (the old policy is the current one),
    1: min(0.001 * step, 0.5), 2: 0 for 75 updates, then 0.0075 more per update up to 0.999."""
    flat, rate, cap = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}[schedule]
    return 0.0 if step < flat else min((step - flat) * rate, cap)


class WeightAverage:
    """average = decay * average + (1 - decay) * weights after each update; `decay(update_count)` gives the decay."""

    def __init__(self, parameters: List[torch.nn.Parameter], decay: Callable[[int], float]):
        self.parameters = list(parameters)
        self.average = [p.detach().float().clone() for p in self.parameters]
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self):
        decay = self.decay(self.updates)
        for avg, p in zip(self.average, self.parameters):
            avg.mul_(decay).add_(p.detach().float(), alpha=1 - decay)
        self.updates += 1

    @contextmanager
    @torch.no_grad()
    def swapped_in(self):
        """The model computes with the average inside the block (no grad), with its own weights after it."""
        kept = [p.detach().clone() for p in self.parameters]
        for avg, p in zip(self.average, self.parameters):
            p.copy_(avg)
        try:
            yield
        finally:
            for k, p in zip(kept, self.parameters):
                p.copy_(k)

    def state_dict(self) -> dict:
        return {"average": [a.cpu() for a in self.average], "updates": self.updates}

    def load_state_dict(self, state: dict):
        self.average = [a.to(p.device) for a, p in zip(state["average"], self.parameters)]
        self.updates = state["updates"]
