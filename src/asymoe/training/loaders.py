"""Training data per rank: one share of the batches per process, resumable mid-epoch."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from torch.utils.data import DataLoader, Sampler

from asymoe.config import ConfigError


class RankBatchSampler(Sampler[list[int]]):
    """Rank `rank`'s share of a batch sampler: batches rank, rank + world, ...; equal counts on all ranks.

    The image-grouped batches vary in size, so Lightning's DistributedSampler cannot be injected;
    every rank builds the same (seeded) batch list and keeps its stride. Dropping the remainder
    keeps the number of steps equal on every rank, which collective ops require. `skip` drops the
    first batches of the next epoch only (a resumed run continues where the checkpoint was taken).
    """

    def __init__(self, batch_sampler: Sampler[list[int]], rank: int, world_size: int):
        self.batch_sampler = batch_sampler
        self.rank = rank
        self.world_size = world_size
        self.skip = 0
        self.issued: deque[list[int]] = deque()  # batches handed to the loader, not yet yielded by it

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.batch_sampler, "set_epoch"):
            self.batch_sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        batches = list(self.batch_sampler)
        usable = len(batches) // self.world_size * self.world_size
        skip, self.skip = self.skip, 0
        for batch in batches[self.rank : usable : self.world_size][skip:]:
            self.issued.append(batch)
            yield batch

    def __len__(self) -> int:
        return len(self.batch_sampler) // self.world_size  # type: ignore[arg-type]


class TrainLoader(DataLoader):
    """The training loader of one rank, with Lightning's `state_dict` / `load_state_dict` protocol.

    Lightning stores `state_dict()` in the checkpoint's fit-loop state; a resumed run loads it back
    (`fit` does so explicitly: Lightning 2.6 skips the load when `estimated_stepping_batches` built
    the loader before the restore), so a mid-epoch resume continues with the next unseen batch
    instead of replaying the epoch from its start. Lightning fetches from a sized loader only when
    a step needs the batch (no prefetch), so batches pulled = batches consumed. `current_indices`
    are the sample indices of the batch last yielded (the one being trained on).
    """

    def __init__(self, loader: DataLoader, rank: int, world_size: int):
        super().__init__(
            loader.dataset,
            batch_sampler=RankBatchSampler(loader.batch_sampler, rank, world_size),
            collate_fn=loader.collate_fn,
            num_workers=loader.num_workers,
        )
        self._pulled = 0
        self.current_indices: list[int] = []

    def __iter__(self):
        self._pulled = self.batch_sampler.skip
        self.batch_sampler.issued.clear()
        for batch in super().__iter__():
            self._pulled += 1
            # Workers may fetch ahead, but batches come back in the order the sampler issued them.
            self.current_indices = self.batch_sampler.issued.popleft()
            yield batch

    def state_dict(self) -> dict:
        return {"batches_consumed": self._pulled}

    def load_state_dict(self, state: dict) -> None:
        consumed = int(state.get("batches_consumed", 0))
        self.batch_sampler.skip = consumed if consumed < len(self.batch_sampler) else 0


def shard_loader(loader: DataLoader, rank: int, world_size: int) -> TrainLoader:
    """`loader` restricted to this rank's share of the batches, resumable mid-epoch."""
    if len(loader.batch_sampler) < world_size:  # type: ignore[arg-type]
        raise ConfigError(
            f"the training split has {len(loader.batch_sampler)} batches, fewer than the {world_size} processes; "
            "lower data.images_per_batch or use fewer devices"
        )
    return TrainLoader(loader, rank, world_size)


def saved_loader_state(metadata: dict) -> dict | None:
    """The training loader's state inside a Lightning checkpoint (None for an older checkpoint)."""
    states = metadata.get("loops", {}).get("fit_loop", {}).get("state_dict", {}).get("combined_loader", [])
    return states[0] if states else None
