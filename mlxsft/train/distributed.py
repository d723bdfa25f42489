"""Data parallelism with `mx.distributed`: every rank builds the same global batch, takes its
rows, and the train step all-sums gradient sums and trained-token counts, so N ranks x b rows
train exactly like 1 rank x N*b rows. Only rank 0 prints and writes files.

World size 1 (a plain `mlxsft train`) needs no launcher; `mlx.launch -n 2 --backend ring --
mlxsft train ...` runs 2 ranks over loopback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from mlxsft.data.batching import Batch
from mlxsft.errors import UserError


@dataclass
class World:
    group: Any  # mx.distributed.Group
    rank: int
    size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def all_reduce(self) -> Callable[[Any], Any] | None:
        """Sum over ranks, or None for a single process. Takes an array or a tree of arrays;
        a tree goes through ONE collective (flattened and concatenated), because several
        collectives in one compiled graph may run in different orders on different ranks."""
        if self.size == 1:
            return None
        group = self.group

        def all_sum(tree: Any) -> Any:
            if isinstance(tree, mx.array):
                return mx.distributed.all_sum(tree, group=group)
            from mlx.utils import tree_flatten, tree_unflatten

            leaves = tree_flatten(tree)
            dtype = mx.float32
            flat = mx.concatenate([v.astype(dtype).reshape(-1) for _, v in leaves])
            flat = mx.distributed.all_sum(flat, group=group)
            out, start = [], 0
            for key, v in leaves:
                out.append((key, flat[start : start + v.size].reshape(v.shape).astype(v.dtype)))
                start += v.size
            return tree_unflatten(out)

        return all_sum

    def shard(self, batch: Batch) -> Batch:
        """This rank's rows of a global batch."""
        return batch if self.size == 1 else batch.split(self.size)[self.rank]

    def check_batch_size(self, batch_size: int, grad_accum: int) -> None:
        if batch_size % (self.size * grad_accum):
            raise UserError(
                f"batch_size {batch_size} is not divisible by ranks x grad_accum "
                f"({self.size} x {grad_accum})",
                hint="batch_size counts rows per optimizer step over all ranks",
            )

    def barrier(self) -> None:
        """Wait for every rank (a tiny all_sum)."""
        if self.size > 1:
            mx.eval(mx.distributed.all_sum(mx.array(0.0), group=self.group))


def init_world() -> World:
    """The distributed group if launched by `mlx.launch`, else a world of one."""
    group = mx.distributed.init(strict=False)
    return World(group, group.rank(), group.size())
