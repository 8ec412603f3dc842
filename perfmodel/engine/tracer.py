"""Per-operator measurements: FLOPs counted from the real tensor shapes, bytes from the real tensors, wall time."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class OpRecord:
    phase: str
    step: int
    name: str
    kind: str
    layer: int
    flops: int
    weight_bytes: int = 0
    act_read_bytes: int = 0
    kv_read_bytes: int = 0
    act_write_bytes: int = 0
    kv_write_bytes: int = 0
    time_s: float = 0.0

    @property
    def bytes(self) -> int:
        return (self.weight_bytes + self.act_read_bytes + self.kv_read_bytes + self.act_write_bytes
                + self.kv_write_bytes)


@dataclass
class Tracer:
    """Collects OpRecords while enabled. phase/step are set by the generation loop."""

    enabled: bool = True
    timed: bool = True
    phase: str = "prefill"
    step: int = 0
    records: list[OpRecord] = field(default_factory=list)
    sync: object = None
    experts_touched: list[int] = field(default_factory=list)

    def start(self) -> float:
        if not self.enabled:  # nothing to time (and nothing torch.compile must trace through)
            return 0.0
        if self.timed and self.sync:
            self.sync()
        return time.perf_counter()

    def stop(self) -> None:
        """Mark the end of the operator being timed, before its counts are computed (the tracer's own
        bookkeeping then stays outside the operator's time); the next record() uses this end."""
        if self.enabled and self.timed:
            if self.sync:
                self.sync()
            self._end = time.perf_counter()

    def record(self, t0: float, name: str, kind: str, layer: int, flops: int, **nbytes) -> None:
        """t0 from start(); the duration ends at the last stop(), or now (a caller summing sub-steps passes
        now - their total)."""
        if not self.enabled:
            return
        end = getattr(self, "_end", None)
        self._end = None
        if end is None and self.timed:
            if self.sync:
                self.sync()
            end = time.perf_counter()
        dt = end - t0 if self.timed else 0.0
        self.records.append(OpRecord(self.phase, self.step, name, kind, layer, int(flops),
                                     **{k: int(v) for k, v in nbytes.items()}, time_s=dt))

    def clear(self) -> None:
        self.records.clear()
        self.experts_touched.clear()
