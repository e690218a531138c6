"""Data-parallel calibration: what a process knows of the others, over Accelerate's own collectives.

Every process holds a contiguous shard of the calibration samples: the trajectories it recorded itself. Samples
carry global indices (process 0's first, then process 1's, ...). Every random draw of the calibration is made over
global indices with generators seeded alike on every process, so all processes follow one schedule; each computes
the terms of the samples it holds, and the sums (gradients of the quantization parameters, meta-gradients, error
sums, observed activation values) are all-reduced or gathered, so every process holds the same quantizer state
after every step. With one process every collective is the identity and nothing is communicated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from accelerate.state import PartialState
from accelerate.utils import gather, pad_across_processes, reduce


@dataclass
class Shard:
    """The calibration samples of this process among those of all processes.

    ``counts`` is the number of samples every process holds (``counts[rank]`` are this process's, with global
    indices ``start`` to ``stop - 1``); ``world`` is the number of processes.
    """

    counts: list[int]
    rank: int = 0
    state: PartialState | None = field(default=None, repr=False)

    @classmethod
    def single(cls, num_samples: int) -> Shard:
        return cls([num_samples])

    @classmethod
    def across_processes(cls, num_local: int, state: PartialState) -> Shard:
        """This process's shard of ``num_local`` samples among those of every process ``state`` knows."""
        if state.num_processes == 1:
            return cls([num_local], 0, state)
        counts = gather(torch.tensor([num_local], device=state.device)).tolist()
        return cls(counts, state.process_index, state)

    @property
    def world(self) -> int:
        return len(self.counts)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def start(self) -> int:
        return sum(self.counts[: self.rank])

    @property
    def stop(self) -> int:
        return self.start + self.counts[self.rank]

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mask, local)``: which of the global ``indices`` this process holds, and their local positions."""
        mask = (indices >= self.start) & (indices < self.stop)
        return mask, indices[mask] - self.start

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over processes (all-reduced; every process gets it)."""
        return reduce(tensor, reduction="sum") if self.distributed else tensor

    def sum_all(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """:meth:`sum` of several tensors in one collective (flattened into one buffer)."""
        if not self.distributed or not tensors:
            return tensors
        flat = self.sum(torch.cat([t.reshape(-1) for t in tensors]))
        return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]

    def rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """This process's rows, then the next process's, ... : the tensor of all processes concatenated along dim 0
        (any number of rows per process)."""
        if not self.distributed:
            return tensor
        device = self.state.device
        sizes = gather(torch.tensor([tensor.shape[0]], device=device)).tolist()
        padded = gather(pad_across_processes(tensor.to(device), dim=0))
        width = max(sizes)
        return torch.cat([padded[i * width : i * width + n] for i, n in enumerate(sizes)]).to(tensor.device)

    def global_values(self, local_values: torch.Tensor) -> torch.Tensor:
        """A per-sample tensor of the local samples, made whole: one row per global sample."""
        return self.rows(local_values)
