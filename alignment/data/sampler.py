"""Which examples each optimizer step trains on: deterministic epoch shuffles cut into global batches."""

from __future__ import annotations

import random

from alignment.data.sources import DataError


class GlobalBatchSampler:
    """Deterministic epoch shuffles, cut into global batches, each split across ranks and micro-batches.

    Global batch `step` of an epoch holds the same examples whatever the world
    size; rank r takes micro-batch m from slots [(m * world + r) * micro, +micro).
    An epoch's incomplete last global batch is left out (a different `tail` examples each epoch, as
    the order is reshuffled); the stages print :meth:`describe` so it is never silent.
    """

    def __init__(self, num_items: int, layout, seed: int, shuffle: bool = True):
        self.num_items = num_items
        self.layout = layout
        self.seed = seed
        self.shuffle = shuffle
        self.steps_per_epoch = num_items // layout.global_batch_size
        self.tail = num_items % layout.global_batch_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"only {num_items} training examples, fewer than one global batch "
                f"(train.global_batch_size = {layout.global_batch_size})"
            )

    def describe(self) -> str:
        g = self.layout.global_batch_size
        text = (f"epoch: {self.steps_per_epoch} steps of {g} = {self.steps_per_epoch * g} of {self.num_items} "
                "training examples")
        if self.tail:
            text += (f"; {self.tail} left out of each epoch (an incomplete global batch; a different {self.tail} each "
                     f"epoch, the order is reshuffled). A train.global_batch_size dividing {self.num_items} uses all.")
        return text

    def epoch_order(self, epoch: int) -> list[int]:
        order = list(range(self.num_items))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Item indices of this rank's micro-batches for global step `step` (0-based, across epochs)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        g = self.layout.global_batch_size
        batch = order[within * g : (within + 1) * g]
        micro, world = self.layout.micro_batch_size, self.layout.world_size
        return [
            batch[(m * world + rank) * micro : (m * world + rank + 1) * micro]
            for m in range(self.layout.grad_accum_steps)
        ]


