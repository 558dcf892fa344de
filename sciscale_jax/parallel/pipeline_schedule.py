"""Pipeline schedules as tables: GPipe, 1F1B, interleaved 1F1B and zero-bubble ZB-H1.

GPipe (Huang et al. 2019) runs every microbatch forward, then every one backward. 1F1B
(PipeDream-Flush, Narayanan et al. 2021) starts backwards as soon as they can and caps the
microbatches in flight on stage d at p - d, so the stash stays flat in the microbatch count.
Interleaved 1F1B (Narayanan et al. 2021, Megatron-LM) gives each device v model chunks
(device d holds global stages d, d + p, ...), cutting the bubble by about v. ZB-H1 (Qi et al.
2024, "Zero Bubble Pipeline Parallelism") splits the backward into B (input gradient, on the
critical path) and W (weight gradient, deferred into the bubble) while keeping at most p
microbatches in flight per device (1F1B's peak), so its bubble is about a third of 1F1B's when F, B and W cost the same.

A schedule is a table: ``table[tick][device]`` is an ``Action`` (kind ``F``, ``B`` or ``W``,
microbatch, chunk) or None (idle). Every action takes one tick; an output sent with
``ppermute`` at the end of tick t is usable from tick t + 1. The table is built by a list
scheduler: each device runs its program in order, idling while the next action waits for
its input. GPipe: all forwards, then all backwards; 1F1B: p - d - 1 warm-up forwards, then
one forward one backward; interleaved: Megatron's 2(p - d - 1) + (v - 1)p warm-up forwards
over groups of p microbatches; ZB-H1: p - d warm-up forwards, then B, the W of the
microbatch d places back, F, so W fills what would be 1F1B's bubble and at most p
microbatches (1F1B's peak, on stage 0) await their W on any device. ``validate`` re-checks
the table from the dependencies alone. Stage inputs and received cotangents live in
per-device stash slots assigned here (``Schedule.stash``), so the executor
(``sciscale_jax.parallel.pipeline``) allocates exactly that many of each.

Bubble fractions count idle device-ticks with every action one tick, so for GPipe, 1F1B and
interleaved they are the textbook values with F = B; for ZB-H1 a tick is one of F, B or W.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zbh1")


class Action(NamedTuple):
    kind: str   # "F" forward, "B" backward (input gradient; the whole backward unless split), "W" weight gradient
    mb: int     # microbatch
    chunk: int  # virtual stage on this device: global stage = chunk * p + device


@dataclasses.dataclass(frozen=True)
class Schedule:
    name: str
    num_stages: int          # p, devices on the pipeline axis
    num_microbatches: int    # m
    virtual_stages: int      # v, chunks per device
    split_backward: bool     # B and W separate (ZB-H1)
    table: tuple             # [tick][device] -> Action | None

    @property
    def num_ticks(self) -> int:
        return len(self.table)

    @property
    def total_stages(self) -> int:
        return self.num_stages * self.virtual_stages

    def stage(self, device: int, chunk: int) -> int:
        return chunk * self.num_stages + device

    def bubble_fraction(self) -> float:
        """Idle device-ticks over all device-ticks of the table."""
        idle = sum(a is None for row in self.table for a in row)
        return idle / (self.num_ticks * self.num_stages)

    def ticks_of(self) -> dict:
        """(kind, mb, global stage) -> tick."""
        return {(a.kind, a.mb, self.stage(d, a.chunk)): t for t, row in enumerate(self.table)
                for d, a in enumerate(row) if a is not None}

    def stash(self):
        """Per-device slot assignment for stage inputs and received cotangents.

        Returns ``(act_slot, cot_slot, num_act, num_cot)``: dicts (mb, global stage) -> slot and
        the slot counts (max over devices). A stage input is held from its arrival (the tick
        after the previous stage's F) to its last use (B, or W when the backward is split); a
        cotangent from its arrival to B (or W). Stage 0 reads the batch and needs no slot.
        """
        ticks, p, last = self.ticks_of(), self.num_stages, self.total_stages - 1
        use = "W" if self.split_backward else "B"
        acts, cots = [], []  # (device, start, end, key)
        for (kind, mb, s), t in ticks.items():
            if kind != "F":
                continue
            if s > 0:
                acts.append((s % p, ticks[("F", mb, s - 1)] + 1, ticks[(use, mb, s)], (mb, s)))
            if s < last:
                cots.append((s % p, ticks[("B", mb, s + 1)] + 1, ticks[(use, mb, s)], (mb, s)))
        (act_slot, num_act), (cot_slot, num_cot) = _color(acts), _color(cots)
        return act_slot, cot_slot, num_act, num_cot

    def max_in_flight(self) -> list[int]:
        """Per device: the most microbatch-chunks forwarded and not yet finished backward."""
        done = "W" if self.split_backward else "B"
        out = []
        for d in range(self.num_stages):
            live = peak = 0
            for row in self.table:
                a = row[d]
                live += a is not None and a.kind == "F"
                live -= a is not None and a.kind == done
                peak = max(peak, live)
            out.append(peak)
        return out


def _color(intervals):
    """Lowest free slot per interval [start, end] (inclusive), per device; (slots, count)."""
    slots, count = {}, 0
    for dev in {iv[0] for iv in intervals}:
        ends = {}  # slot -> end tick of its current holder
        for _, start, end, key in sorted((iv for iv in intervals if iv[0] == dev), key=lambda iv: iv[1]):
            slot = next(s for s in range(len(ends) + 1) if ends.get(s, -1) < start)
            ends[slot], slots[key] = end, slot
            count = max(count, slot + 1)
    return slots, count


def analytic_bubble(name: str, p: int, m: int, v: int = 1) -> float:
    """Textbook bubble fraction with F = B (= W) = one tick."""
    if name in ("gpipe", "1f1b"):
        return (p - 1) / (m + p - 1)
    if name == "interleaved":
        return (p - 1) / (v * m + p - 1)
    if name == "zbh1":
        return (p - 1) / (3 * m + p - 1)
    raise ValueError(f"unknown pipeline schedule {name!r}; known: {', '.join(SCHEDULES)}")


def check_schedule_args(name: str, p: int, m: int, v: int = 1) -> None:
    """ValueError (one line, naming the values) for a schedule that cannot be built."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r}; known: {', '.join(SCHEDULES)}")
    for label, value in (("pipeline stages", p), ("microbatches", m), ("virtual_stages", v)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{label}={value!r} must be a positive integer")
    if name != "interleaved" and v != 1:
        raise ValueError(f"virtual_stages={v} needs schedule 'interleaved'; got {name!r}")
    if name == "interleaved" and m % p:
        raise ValueError(f"interleaved 1F1B needs microbatches divisible by pipeline stages; "
                         f"got microbatches={m}, stages={p}")


def _programs(name: str, p: int, m: int, v: int):
    """Per-device action order of each schedule (interleaved: Megatron's order)."""
    programs = []
    for d in range(p):
        # microbatches in groups of p, chunk by chunk (v = 1: plain microbatch order)
        fwd = [Action("F", mb, c) for g in range(0, m, p) for c in range(v) for mb in range(g, min(g + p, m))]
        bwd = [Action("B", mb, c) for g in range(0, m, p) for c in reversed(range(v))
               for mb in range(g, min(g + p, m))]
        if name == "gpipe":
            programs.append(fwd + bwd)
            continue
        if name == "zbh1":  # p - d warm-up forwards; then B, the W of d microbatches back, F
            order, next_w = fwd[:p - d], 0
            for i, b in enumerate(bwd):
                order.append(b)
                if i >= d:
                    order.append(Action("W", next_w, 0))
                    next_w += 1
                if p - d + i < m:
                    order.append(fwd[p - d + i])
            programs.append(order + [Action("W", j, 0) for j in range(next_w, m)])
            continue
        warmup = min(p - d - 1 if v == 1 else 2 * (p - d - 1) + (v - 1) * p, len(fwd))
        order = fwd[:warmup]
        for i, f in enumerate(fwd[warmup:]):  # steady state: one forward, one backward
            order += [f, bwd[i]]
        programs.append(order + bwd[len(fwd) - warmup:])
    return programs


def make_schedule(name: str, p: int, m: int, v: int = 1) -> Schedule:
    """The table of schedule ``name`` for ``p`` stages, ``m`` microbatches, ``v`` chunks per device."""
    check_schedule_args(name, p, m, v)
    S, split = p * v, name == "zbh1"
    programs = _programs(name, p, m, v)
    done: dict = {}  # (kind, mb, stage) -> tick
    pos = [0] * p    # next action of each device's program
    table, total = [], sum(map(len, programs))

    def ready(d, a, t):
        if a is None:
            return False
        s = a.chunk * p + d
        before = lambda k, s_: done.get((k, a.mb, s_), t) < t  # noqa: E731
        if a.kind == "F":
            return s == 0 or before("F", s - 1)
        if a.kind == "B":
            return before("F", s) and (s == S - 1 or before("B", s + 1))
        return before("B", s)

    while len(done) < total:
        t = len(table)
        if t > 4 * total + 4:  # a scheduler bug, never bad user input
            raise RuntimeError(f"schedule {name} p={p} m={m} v={v} does not finish")
        row = [programs[d][pos[d]] if pos[d] < len(programs[d]) else None for d in range(p)]
        row = tuple(a if ready(d, a, t) else None for d, a in enumerate(row))  # idle while waiting
        for d, a in enumerate(row):
            if a is not None:
                done[(a.kind, a.mb, a.chunk * p + d)] = t
                pos[d] += 1
        table.append(row)
    return Schedule(name, p, m, v, split, tuple(table))


def validate(schedule: Schedule) -> None:
    """Check a table from its dependencies alone; ValueError naming the first violation.

    Every (kind, microbatch, stage) runs exactly once; a forward comes at least one tick after
    the previous stage's forward, a backward after its own forward and at least one tick after
    the next stage's backward, a weight gradient after its backward; no W unless split.
    """
    p, m, S = schedule.num_stages, schedule.num_microbatches, schedule.total_stages
    kinds = ("F", "B", "W") if schedule.split_backward else ("F", "B")
    seen: dict = {}
    for t, row in enumerate(schedule.table):
        if len(row) != p:
            raise ValueError(f"tick {t} has {len(row)} entries for {p} stages")
        for d, a in enumerate(row):
            if a is None:
                continue
            if a.kind not in kinds or not (0 <= a.mb < m and 0 <= a.chunk < schedule.virtual_stages):
                raise ValueError(f"tick {t} device {d}: bad action {a}")
            key = (a.kind, a.mb, schedule.stage(d, a.chunk))
            if key in seen:
                raise ValueError(f"{key} runs twice (ticks {seen[key]} and {t})")
            seen[key] = t
    expected = {(k, mb, s) for k in kinds for mb in range(m) for s in range(S)}
    if set(seen) != expected:
        raise ValueError(f"missing actions: {sorted(expected - set(seen))[:4]}")
    for (kind, mb, s), t in seen.items():
        deps = {"F": [("F", mb, s - 1)] if s else [],
                "B": [("F", mb, s)] + ([("B", mb, s + 1)] if s < S - 1 else []),
                "W": [("B", mb, s)]}[kind]
        for dep in deps:
            if seen[dep] >= t:
                raise ValueError(f"{(kind, mb, s)} at tick {t} does not come after {dep} at tick {seen[dep]}")
