"""Paged KV-cache block accounting with automatic prefix caching (pure Python, no tensors).

The KV cache is ``num_blocks`` blocks of ``block_size`` token slots each; a sequence's ``block_table`` maps its
logical block i to a physical block id. A block is shared by several sequences via ``ref_count``.

Prefix caching: once a block is FULL and its KV computed, it gets a hash chained from block 0,
``hash((parent_hash, tuple(token_ids)))`` (parent of block 0 is None), so identical content at a different
position (different prefix) never matches. A block whose ref_count drops to 0 keeps its hash and stays findable
until its slot is reused. Reuse order: blocks without a hash first (FIFO), then cached blocks least-recently
freed first (LRU eviction). A sequence's blocks are freed tail first, so the end of a chain is evicted before its
start (an evicted head would make the rest of the chain unreachable anyway).
"""

from __future__ import annotations

from collections import OrderedDict, deque

from minke.engine.sequence import Sequence


def hash_block(parent_hash: int | None, token_ids) -> int:
    """Chained hash of one full block. Stable within one process (ints and tuples hash deterministically)."""
    return hash((parent_hash, tuple(token_ids)))


class Block:
    __slots__ = ("id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.id = block_id
        self.ref_count = 0
        self.hash: int | None = None  # set only when full, computed and registered in the prefix cache
        self.token_ids: tuple[int, ...] | None = None  # contents when hashed, to reject hash collisions

    def __repr__(self) -> str:
        return f"Block(id={self.id}, ref={self.ref_count}, hash={self.hash})"


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"BlockManager: num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"BlockManager: block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.hash_to_block: dict[int, int] = {}
        # Free blocks (ref_count 0) live in exactly one of these two:
        self._free_plain: deque[int] = deque(range(num_blocks))  # no hash: reused first, FIFO
        self._free_cached: OrderedDict[int, None] = OrderedDict()  # hashed: oldest-freed first (LRU)
        self.prefix_hits_tokens = 0
        self.prefix_queries_tokens = 0

    # ---------------------------------------------------------------- capacity
    def num_free_blocks(self) -> int:
        """Blocks with ref_count 0, including evictable cached ones."""
        return len(self._free_plain) + len(self._free_cached)

    def usage(self) -> float:
        """Fraction of blocks in use (ref_count > 0)."""
        return 1.0 - self.num_free_blocks() / self.num_blocks

    def _blocks_to_cover(self, seq: Sequence, num_new_tokens: int) -> int:
        """Fresh blocks needed so block_table covers num_computed_tokens + num_new_tokens tokens."""
        if num_new_tokens < 0:
            raise ValueError(f"seq {seq.seq_id}: num_new_tokens must be >= 0, got {num_new_tokens}")
        total = seq.num_computed_tokens + num_new_tokens
        need = (total + self.block_size - 1) // self.block_size
        return max(0, need - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self._blocks_to_cover(seq, num_new_tokens) <= self.num_free_blocks()

    # ---------------------------------------------------------------- prefix cache lookup
    def _full_block_hashes(self, seq: Sequence, n: int) -> list[int]:
        """Chained hashes of seq's first n blocks (all must be full); memoised on seq (contents never change)."""
        hashes = seq.block_hashes
        bs = self.block_size
        while len(hashes) < n:
            i = len(hashes)
            parent = hashes[i - 1] if i > 0 else None
            hashes.append(hash_block(parent, seq.token_ids[i * bs : (i + 1) * bs]))
        return hashes

    def _lookup(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached prefix of seq. Never the whole sequence: at least one token must
        remain to compute (the model needs it to produce logits), so hits are capped at
        (num_tokens - 1) // block_size blocks, and below the first position whose logits prompt logprobs want."""
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        if seq.wants_prompt_logits:  # the positions whose logits prompt logprobs still want must run
            max_blocks = min(max_blocks, seq.prompt_logits_next // self.block_size)
        hashes = self._full_block_hashes(seq, max_blocks)
        bs = self.block_size
        hits: list[int] = []
        for i in range(max_blocks):
            block_id = self.hash_to_block.get(hashes[i])
            if block_id is None:
                break
            block = self.blocks[block_id]
            if block.token_ids != tuple(seq.token_ids[i * bs : (i + 1) * bs]):
                break  # hash collision: different contents
            hits.append(block_id)
        return hits

    def lookup_prefix(self, seq: Sequence) -> int:
        """Tokens allocate_prefix(seq) would serve from the cache now. Read-only, not counted in the stats."""
        return len(self._lookup(seq)) * self.block_size

    def can_admit(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether allocate_prefix(seq) followed by allocate(seq, num_new_tokens) would succeed for a seq with
        an empty block table. Cache hits on free (ref_count 0) blocks use up free blocks too."""
        if seq.block_table:
            raise RuntimeError(f"can_admit: seq {seq.seq_id} already has blocks {seq.block_table}")
        hits = self._lookup(seq)
        cached_tokens = len(hits) * self.block_size
        need = (cached_tokens + num_new_tokens + self.block_size - 1) // self.block_size
        fresh = max(0, need - len(hits))
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        return fresh + revived <= self.num_free_blocks()

    # ---------------------------------------------------------------- allocation
    def allocate_prefix(self, seq: Sequence) -> int:
        """Take the cached prefix of a newly admitted seq: share hit blocks (ref_count + 1), append them to
        block_table, set num_computed_tokens = num_cached_tokens = hit tokens and return that count."""
        if seq.block_table:
            raise RuntimeError(
                f"allocate_prefix: seq {seq.seq_id} already has blocks {seq.block_table}; call it only once, "
                "on admission of a sequence with an empty block table"
            )
        hits = self._lookup(seq)
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free_cached[block_id]  # revive: no longer evictable
            block.ref_count += 1
            seq.block_table.append(block_id)
        num_cached = len(hits) * self.block_size
        seq.num_computed_tokens = num_cached
        seq.num_cached_tokens = num_cached
        seq.num_committed_blocks = len(hits)  # already registered
        if self.enable_prefix_caching:
            self.prefix_queries_tokens += seq.num_tokens
            self.prefix_hits_tokens += num_cached
        return num_cached

    def _take_free_block(self) -> int:
        if self._free_plain:
            block_id = self._free_plain.popleft()
        else:
            block_id, _ = self._free_cached.popitem(last=False)  # evict least-recently freed
            block = self.blocks[block_id]
            del self.hash_to_block[block.hash]
            block.hash = None
            block.token_ids = None
        block = self.blocks[block_id]
        assert block.ref_count == 0, block
        block.ref_count = 1
        return block_id

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Append fresh blocks so block_table covers num_computed_tokens + num_new_tokens tokens."""
        need = self._blocks_to_cover(seq, num_new_tokens)
        if need > self.num_free_blocks():
            raise RuntimeError(
                f"allocate: seq {seq.seq_id} needs {need} more KV blocks but only {self.num_free_blocks()} are "
                "free; check can_allocate first"
            )
        for _ in range(need):
            seq.block_table.append(self._take_free_block())

    def commit(self, seq: Sequence) -> None:
        """Register in the prefix cache the blocks of seq that are now full and computed. If another block
        already holds the same contents (two sequences computed the same prefix concurrently), that one stays
        the cached copy and this block is simply freed without a hash later."""
        if not self.enable_prefix_caching:
            return
        n_full = min(seq.num_computed_tokens, seq.num_tokens) // self.block_size
        n_full = min(n_full, len(seq.block_table))
        if n_full <= seq.num_committed_blocks:
            return
        hashes = self._full_block_hashes(seq, n_full)
        bs = self.block_size
        for i in range(seq.num_committed_blocks, n_full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is not None or hashes[i] in self.hash_to_block:
                continue
            block.hash = hashes[i]
            block.token_ids = tuple(seq.token_ids[i * bs : (i + 1) * bs])
            self.hash_to_block[block.hash] = block.id
        seq.num_committed_blocks = n_full

    def free(self, seq: Sequence) -> None:
        """Drop seq's references (tail first, see module doc) and clear its block table."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"free: seq {seq.seq_id} releases block {block_id} with ref_count 0 (double free)")
            block.ref_count -= 1
            if block.ref_count == 0:
                if block.hash is not None:
                    self._free_cached[block_id] = None  # newest at the end
                else:
                    self._free_plain.append(block_id)
        seq.block_table.clear()
        seq.num_committed_blocks = 0

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash. Blocks in use keep their KV but are no longer shareable."""
        for block_id in self._free_cached:
            self._free_plain.append(block_id)
        self._free_cached.clear()
        for block_id in self.hash_to_block.values():
            self.blocks[block_id].hash = None
            self.blocks[block_id].token_ids = None
        self.hash_to_block.clear()
