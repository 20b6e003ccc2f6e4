"""Name a hung rank instead of waiting out the collective timeout in silence.

Every rank notes where it is (step, micro-step, phase: data, forward, backward, optimizer,
sync, checkpoint, after checkpoint) in plain attributes; a daemon thread publishes that to the process group's
key-value store every few seconds. A rank that has sat in one phase for longer than
``stall_s`` reads every rank's note: ranks behind it (an earlier step or phase) or silent
(no heartbeat for ``stall_s``) are holding the collective it waits in. It then ends the
process with one line naming them, before the process-group timeout fires. Ranks all in the
same place (a long first compile, a slow save every rank waits for) are not a hang of one rank
and are left to that timeout.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time

import torch.distributed as dist

log = logging.getLogger("ivfast.train")

# in the order a step passes them; "after checkpoint" is the wait for rank 0's write
PHASES = ("data", "forward", "backward", "optimizer", "sync", "checkpoint", "after checkpoint")
EXIT_CODE = 3
_PREFIX = "ivfast/heartbeat/"


def culprits(beats: dict[int, dict | None], me: int, now: float, stall_s: float) -> dict[int, str]:
    """rank -> why it holds ``me`` up: silent for ``stall_s``, or behind ``me``'s position."""
    mine = beats[me]
    pos = (mine["step"], mine["micro"], PHASES.index(mine["phase"]))
    out = {}
    for r, b in sorted(beats.items()):
        if r == me:
            continue
        if b is None:
            out[r] = "no heartbeat at all"
        elif now - b["beat"] > stall_s:
            out[r] = (f"no heartbeat for {now - b['beat']:.0f} s (last in phase {b['phase']} of step {b['step']})")
        elif (b["step"], b["micro"], PHASES.index(b["phase"])) < pos:
            out[r] = f"stuck in phase {b['phase']} of step {b['step']} for {now - b['since']:.0f} s"
    return out


class RankWatchdog:
    """Heartbeats of this rank, and the check that ends a run held up by another rank."""

    def __init__(self, store, rank: int, world: int, stall_s: float, timeout_s: float):
        self.store, self.rank, self.world = store, rank, world
        self.stall_s, self.timeout_s = stall_s, timeout_s
        self.period = max(0.5, min(10.0, stall_s / 8))
        self.phase, self.step, self.micro, self.since = "data", 0, 0, time.time()
        self._checked = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ivfast-rank-watchdog", daemon=True)

    @classmethod
    def for_run(cls, rank: int, world: int, timeout_s: float) -> "RankWatchdog | None":
        """One for a multi-rank run with a timeout, started; None otherwise."""
        if world <= 1 or timeout_s <= 0 or not dist.is_initialized():
            return None
        # the default group's store (torchrun's or env://): no second rendezvous to configure
        store = dist.PrefixStore(_PREFIX, dist.distributed_c10d._get_default_store())
        dog = cls(store, rank, world, stall_s=0.8 * timeout_s, timeout_s=timeout_s)
        dog._publish()
        dog._thread.start()
        return dog

    def enter(self, phase: str, step: int, micro: int = 0) -> None:
        """Called by the training loop at each phase: attribute writes only, no I/O."""
        self.since = time.time()
        self.phase, self.step, self.micro = phase, step, micro

    def stop(self) -> None:
        self._stop.set()

    def _publish(self) -> None:
        note = {"phase": self.phase, "step": self.step, "micro": self.micro, "since": self.since,
                "beat": time.time()}
        self.store.set(str(self.rank), json.dumps(note))

    def _read(self) -> dict[int, dict | None]:
        beats = {}
        for r in range(self.world):
            key = str(r)
            beats[r] = json.loads(self.store.get(key)) if self.store.check([key]) else None
        return beats

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self._publish()
                now = time.time()
                # every rank reads every heartbeat: at most a few times per stall, not every beat
                if now - self.since > self.stall_s and now - self._checked > self.stall_s / 4:
                    self._checked = now
                    self._check()
            except Exception as e:       # the store gone (peers exiting): the collectives report it
                log.debug("rank watchdog: %s", e)
                return

    def _check(self) -> None:
        now = time.time()
        beats = self._read()
        beats[self.rank] = {"phase": self.phase, "step": self.step, "micro": self.micro, "since": self.since,
                            "beat": now}
        held_by = culprits(beats, self.rank, now, self.stall_s)
        if not held_by or self._stop.is_set():
            return
        who = "; ".join(f"rank {r} {why}" for r, why in held_by.items())
        print(f"ivfast.train: hung rank: {who}. Rank {self.rank} waited {now - self.since:.0f} s in phase "
              f"{self.phase} of step {self.step} (runtime.collective_timeout_s={self.timeout_s:g}); ending the "
              "run. Look at that rank's host (data loading, file system, GPU), then resume with --resume auto",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        # the main thread is blocked inside a collective and cannot be interrupted
        os._exit(EXIT_CODE)
