"""Hands out fixed-size KV-cache blocks. Block 0 is reserved as the write target of padding tokens."""

from __future__ import annotations

from collections import deque

from twinbatch.core.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.num_usable_blocks = num_blocks - 1
        self.free_blocks: deque[int] = deque(range(1, num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def blocks_needed(self, req: Request, num_new_tokens: int) -> int:
        total = req.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(req.block_ids))

    def can_allocate(self, req: Request, num_new_tokens: int) -> bool:
        return self.blocks_needed(req, num_new_tokens) <= self.num_free_blocks

    def allocate(self, req: Request, num_new_tokens: int) -> None:
        """Grows req's block table to hold num_new_tokens more tokens. Call can_allocate first."""
        for _ in range(self.blocks_needed(req, num_new_tokens)):
            req.block_ids.append(self.free_blocks.popleft())

    def free(self, req: Request) -> None:
        self.free_blocks.extend(req.block_ids)
        req.block_ids = []
