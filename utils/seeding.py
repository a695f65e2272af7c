"""Seeds that depend only on where a number is drawn (seed, step, micro-step, ...), not on the process."""
import torch


def step_generator(seed: int, *indices: int) -> torch.Generator:
    """A CPU generator seeded from (seed, step, micro-step, ...): noise that depends only on the step, so
    resuming and changing the number of processes reproduce the same samples."""
    g = torch.Generator()
    g.manual_seed(hash((seed,) + tuple(indices)) % (2**63))
    return g
