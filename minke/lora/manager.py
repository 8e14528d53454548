"""One rank's adapters: host copies (an LRU of max_cpu_loras, reloaded from disk when evicted), device slots (an LRU
of max_loras), and each step's per-token slot indices. Every rank runs the same calls in the same order (the
engine's requests and each step's chunks), so slots agree across tensor-parallel ranks without talking."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from .adapter import AdapterError, LoRAAdapter, load_adapter
from .model import LoRAModel
from .request import LoRARequest


class LoRAManager:
    def __init__(self, model: LoRAModel):
        self.model, self.cfg, self.ctx = model, model.config, model.ctx
        self.requests: dict[int, LoRARequest] = {}  # every adapter added (and not removed), by lora_int_id
        self.cpu: OrderedDict[int, LoRAAdapter] = OrderedDict()  # host copies, least recently used first
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # device-resident adapters -> slot, LRU first
        self._host = np.full(self.ctx.token_slots.shape[0], -1, dtype=np.int32)
        self._dirty = False  # the device index buffer holds some slot >= 0
        self.num_loads = 0  # adapters written into a device slot (stats, tests)

    # ------------------------------------------------------------------ adapters
    def check(self, adapter: LoRAAdapter) -> None:
        """Raises AdapterError when the adapter cannot be served by this model with these settings."""
        m, cfg = self.model, self.cfg
        if adapter.rank > cfg.max_lora_rank:
            raise AdapterError(f"adapter {adapter.name!r} has rank {adapter.rank}, above max_lora_rank "
                               f"{cfg.max_lora_rank} (--max-lora-rank)")
        unknown = [n for n in adapter.linears if n not in m.linears and n not in m.shared]
        unknown += [n for n in adapter.experts if n not in m.experts]
        if unknown:
            hint = ("; routed-expert adapters are not served under expert parallelism"
                    if m.expert_parallel and adapter.experts else "")
            leaves = sorted({n.rsplit(".", 1)[-1] for n in m.linears} | ({"experts"} if m.experts else set()))
            raise AdapterError(f"adapter {adapter.name!r} targets modules this model cannot serve adapters on: "
                               f"{unknown[:4]}{' ...' if len(unknown) > 4 else ''}; adaptable: {leaves}{hint}")
        for n, (a, b) in adapter.linears.items():
            err = m.linears[n].check(n, a, b) if n in m.linears else m.experts[m.shared[n][0]].check_shared(
                n, m.shared[n][1], a, b)
            if err:
                raise AdapterError(f"adapter {adapter.name!r}: {err}")
        for n, targets in adapter.experts.items():
            for p, (a, b) in targets.items():
                err = m.experts[n].check(n, p, a, b)
                if err:
                    raise AdapterError(f"adapter {adapter.name!r}: {err}")

    def load(self, req: LoRARequest) -> LoRAAdapter:
        """Reads and checks the adapter at req.lora_path (nothing is registered)."""
        adapter = load_adapter(req.lora_path, req.lora_name, req.lora_int_id, self.model.num_experts)
        self.check(adapter)
        return adapter

    def add(self, req: LoRARequest) -> bool:
        """Registers the adapter (loaded into host memory); False if this id is already there with this path."""
        old = self.requests.get(req.lora_int_id)
        if old is not None and old.lora_path == req.lora_path:
            return False
        adapter = self.load(req)
        if old is not None:
            self.remove(req.lora_int_id)
        self.requests[req.lora_int_id] = req
        self._keep_cpu(adapter)
        return True

    def remove(self, int_id: int) -> bool:
        if int_id not in self.requests:
            return False
        del self.requests[int_id]
        self.cpu.pop(int_id, None)
        slot = self.slot_of.pop(int_id, None)
        if slot is not None:
            self._write(slot, None)
        return True

    def _keep_cpu(self, adapter: LoRAAdapter) -> None:
        self.cpu[adapter.int_id] = adapter
        self.cpu.move_to_end(adapter.int_id)
        while len(self.cpu) > self.cfg.cpu_capacity:
            self.cpu.popitem(last=False)

    def _host_copy(self, int_id: int) -> LoRAAdapter:
        adapter = self.cpu.get(int_id)
        if adapter is None:  # evicted from host memory: read it again
            req = self.requests.get(int_id)
            if req is None:
                raise ValueError(f"LoRA adapter id {int_id} was never added (or was removed)")
            adapter = self.load(req)
        self._keep_cpu(adapter)
        return adapter

    # ------------------------------------------------------------------ device slots
    def _write(self, slot: int, adapter: LoRAAdapter | None) -> None:
        m = self.model
        for name, w in m.linears.items():
            a, b = adapter.linears.get(name, (None, None)) if adapter is not None else (None, None)
            w.write(slot, a, b)
        for name, w in m.experts.items():
            if adapter is None:
                w.write(slot, {})
                continue
            shared = {leaf: adapter.linears[n] for n, (e, leaf) in m.shared.items()
                      if e == name and n in adapter.linears}
            w.write(slot, adapter.experts.get(name, {}), shared)

    def activate(self, int_ids) -> dict[int, int]:
        """Slots of these adapters (at most max_loras), loading the missing ones over the least recently used
        slots not needed now."""
        need = list(dict.fromkeys(int_ids))
        if len(need) > self.cfg.max_loras:
            raise ValueError(f"one step mixes {len(need)} adapters; max_loras is {self.cfg.max_loras}")
        for i in need:
            if i in self.slot_of:
                self.slot_of.move_to_end(i)
        for i in need:
            if i in self.slot_of:
                continue
            adapter = self._host_copy(i)
            used = set(self.slot_of.values())
            free = [s for s in range(self.cfg.max_loras) if s not in used]
            if free:
                slot = free[0]
            else:
                victim = next(v for v in self.slot_of if v not in need)
                slot = self.slot_of.pop(victim)
            self._write(slot, adapter)
            self.slot_of[i] = slot
            self.num_loads += 1
        return {i: self.slot_of[i] for i in need}

    # ------------------------------------------------------------------ the step
    def prepare_step(self, chunks) -> None:
        """Per-token slots of the step's chunks (SeqChunk.lora_id, 0 = base; decodes first) into the device
        buffer. Also the context tokens' slots for MLA prefills that read cached context."""
        ctx = self.ctx
        ctx.pending.clear()  # (a step that raised mid-forward may have left some LoRA math behind)
        ids = [c.lora_id for c in chunks]
        if not any(ids):
            ctx.active = False
            ctx.context_slots = ctx.token_slots
            if self._dirty:
                self._clear()
            return
        slots = self.activate([i for i in ids if i])
        per_chunk = np.fromiter((slots[i] if i else -1 for i in ids), dtype=np.int32, count=len(ids))
        n_new = np.fromiter((len(c.token_ids) for c in chunks), dtype=np.int64, count=len(chunks))
        total = int(n_new.sum())
        if total > len(self._host):
            raise ValueError(f"a step of {total} tokens exceeds the LoRA index buffer ({len(self._host)} rows)")
        host = self._host
        host[:total] = np.repeat(per_chunk, n_new)
        # Only the step's rows: rows past them are CUDA-graph padding, whose outputs nobody reads (a stale slot
        # there costs nothing but the padding's own LoRA math). A pageable source: staged before copy_ returns.
        ctx.token_slots[:total].copy_(torch.from_numpy(host[:total]), non_blocking=ctx.token_slots.is_cuda)
        self._dirty = True
        ctx.active = True
        nd = 0
        while nd < len(chunks) and chunks[nd].is_decode:
            nd += 1
        if ctx.heads and nd and not ctx.use_kernels:  # the torch path's per-(token, head) indices of the decode
            # rows (the kernels read token_slots with a row divisor: two host-to-device copies a step fewer)
            h, s = ctx.heads, per_chunk[:nd].astype(np.int64)
            per_head = np.where(s[:, None] >= 0, s[:, None] * h + np.arange(h), -1).astype(np.int32).reshape(-1)
            ctx.head_slots[: nd * h].copy_(torch.from_numpy(per_head), non_blocking=ctx.token_slots.is_cuda)
            ctx.row_slots[: nd * h].copy_(torch.from_numpy(np.repeat(per_chunk[:nd], h)),
                                          non_blocking=ctx.token_slots.is_cuda)
        starts = [c.start_pos for c in chunks[nd:]]
        if any(starts):  # prefill chunks read cached context: one index per context token (positions 0..end)
            k_lens = np.asarray([c.start_pos + len(c.token_ids) for c in chunks[nd:]], dtype=np.int64)
            ctx_host = np.repeat(per_chunk[nd:], k_lens)
            ctx.context_slots = torch.from_numpy(ctx_host).to(ctx.token_slots.device)
        else:  # contexts are the prefill chunks' own tokens, rows nd.. of the step
            ctx.context_slots = ctx.token_slots[int(n_new[:nd].sum()):]

    def _clear(self) -> None:
        ctx = self.ctx
        for buf in (ctx.token_slots, ctx.head_slots, ctx.row_slots):
            if buf is not None:
                buf.fill_(-1)
        self._dirty = False

    def begin_capture(self) -> None:
        """Before CUDA-graph capture (and the memory profile): the LoRA math is recorded whatever the step
        (indices decide at replay)."""
        self._clear()
        self.ctx.context_slots = self.ctx.token_slots
        self.ctx.pending.clear()
        self.ctx.active = True

    def end_capture(self) -> None:
        self.ctx.active = False
