"""This process's rows of every step, prepared off the training thread by DataLoader workers, resumable exactly.

In memory (`StepBatches`): the rows of step `s` are a pure function of `(seed, s)`. The global batch is what it
always was (each source's blocks in a permutation seeded by epoch; a mixture's quotas, then a seeded shuffle of
the step's rows), and each process gathers only its own rows from the memory-mapped token cache, so N processes
train on exactly the rows one process trains on. A resume needs no data state: it starts at the next step.

Streaming (`StreamBatches`): each process's stream is split further into one part per worker; part `p` of
process `r` reads documents `i` with `i % (N * W) == r * W + p` (or whole shards, when the source's shard count
divides `N * W` and nothing is held out), tokenizes and packs only those, and serves steps `s` with
`(s - 1) % W == p`. The DataLoader asks its workers in turn, so step `s` always comes from part `(s - 1) % W`.
A part's batches carry its stream state when a checkpoint may follow within `W` steps; the loop keeps the
state of the last batch it consumed from each part, so batches prefetched but not trained on are read again
after a resume. The batches depend on `N * W` (fixed for a run: a checkpoint resumes only under the same pair).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from fractions import Fraction

import torch

from convert.uptrain import mixture

PERM_SEED, SOURCE_SEED, STEP_SEED = 100_003, 1_000_003, 7_777_777


class Rows:
    """Blocks of one source by index: a token cache cut into blocks, or a tensor of prepared rows."""

    def __init__(self, cached=None, block_size: int = 0, tensor: torch.Tensor | None = None):
        self.cached, self.block_size, self.tensor = cached, block_size, tensor
        self.n = len(tensor) if tensor is not None else cached.blocks(block_size)

    def take(self, indices: list[int]) -> torch.Tensor:
        if self.tensor is not None:
            return self.tensor[torch.tensor(indices, dtype=torch.long)]
        return self.cached.rows(indices, self.block_size)


class StepBatches(torch.utils.data.Dataset):
    """Map-style: item `step` is this process's rows of that step, micro-batch after micro-batch."""

    def __init__(self, sources: list[Rows], weights: list[Fraction], seed: int, micro: int, accum: int, rank: int,
                 procs: int):  # fmt: skip
        self.sources, self.weights, self.seed = sources, weights, seed
        self.micro, self.accum, self.rank, self.procs = micro, accum, rank, procs
        self.global_batch = micro * accum * procs
        self.orders: dict[tuple[int, int], torch.Tensor] = {}

    def __len__(self) -> int:  # any step may be asked for; the sampler says which
        return 1 << 62

    def _order(self, k: int, epoch: int) -> torch.Tensor:
        if (k, epoch) not in self.orders:
            for old in [key for key in self.orders if key[0] == k]:
                del self.orders[old]
            seed = self.seed * PERM_SEED + epoch + SOURCE_SEED * k
            self.orders[(k, epoch)] = torch.randperm(self.sources[k].n, generator=torch.Generator().manual_seed(seed))
        return self.orders[(k, epoch)]

    def slots(self, step: int) -> list[tuple[int, int]]:
        """(source, position in that source's sequence) of each row of the global batch of `step` (1-based)."""
        j, g = step - 1, self.global_batch
        before = mixture.cumulative(j, g, self.weights)
        counts = mixture.batch_counts(j, g, self.weights)
        slots = [(k, before[k] + t) for k, n in enumerate(counts) for t in range(n)]
        if len(self.sources) > 1:  # every process's share mixes the sources
            order = torch.randperm(g, generator=torch.Generator().manual_seed(self.seed * STEP_SEED + j)).tolist()
            slots = [slots[i] for i in order]
        return slots

    def __getitem__(self, step: int) -> torch.Tensor:
        slots = self.slots(step)
        micro, procs = self.micro, self.procs
        mine = [slots[(m * procs + self.rank) * micro + i] for m in range(self.accum) for i in range(micro)]
        rows: list[torch.Tensor | None] = [None] * len(mine)
        for k, source in enumerate(self.sources):
            wanted = [(r, q) for r, (kk, q) in enumerate(mine) if kk == k]
            if not wanted:
                continue
            picks = [int(self._order(k, q // source.n)[q % source.n]) for _, q in wanted]
            for (r, _), row in zip(wanted, source.take(picks)):
                rows[r] = row
        return torch.stack(rows)  # type: ignore[arg-type]


class StreamBatches(torch.utils.data.IterableDataset):
    """Iterable: this process's rows of every step, from its stream parts (one per worker), with their state."""

    def __init__(
        self,
        open_part: Callable[[int, list | None], list],  # (global part, source states) -> a PackedStream per source
        weights: list[Fraction],
        rows: int,
        rank: int,
        workers: int,
        start_step: int,
        save_every: int,
        seed: int,
        states: dict[int, dict] | None,
    ):
        self.open_part, self.weights, self.rows, self.rank = open_part, weights, rows, rank
        self.parts, self.start_step, self.save_every, self.seed = max(workers, 1), start_step, save_every, seed
        self.states = states or {}

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        p = ((info.id if info is not None else 0) + self.start_step) % self.parts  # the part of the next step
        state = self.states.get(p)
        j = state["batches"] if state else 0
        streams = self.open_part(self.rank * self.parts + p, state["sources"] if state else None)
        blocks = [s.blocks() for s in streams]
        step = self.start_step + 1 + (p - self.start_step) % self.parts
        while True:
            counts = mixture.batch_counts(j, self.rows, self.weights)
            rows = [next(blocks[k]) for k, n in enumerate(counts) for _ in range(n)]
            if len(streams) > 1:
                random.Random(self.seed * STEP_SEED + j * 1_009 + p).shuffle(rows)
            j += 1
            due = self.save_every and (-step) % self.save_every < self.parts  # a checkpoint may follow
            out = {"step": step, "part": p, "batch": torch.tensor(rows, dtype=torch.long), "state": None}
            if due:
                out["state"] = {"batches": j, "sources": [s.state() for s in streams]}
            yield out
            step += self.parts


def make_loader(dataset, workers: int, start_step: int, total_steps: int, prefetch: int = 4):
    """A DataLoader over `StepBatches` (steps after `start_step`) or `StreamBatches`, one item a step."""
    kwargs: dict = {"batch_size": None, "num_workers": workers}
    if workers > 0:
        kwargs.update(prefetch_factor=prefetch, persistent_workers=False)
    if isinstance(dataset, StepBatches):
        kwargs["sampler"] = range(start_step + 1, total_steps + 1)
    return torch.utils.data.DataLoader(dataset, **kwargs)
