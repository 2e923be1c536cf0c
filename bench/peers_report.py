"""The pure half of bench/peers.py: kernel-log parsing, stalls, percentiles, room taken and the
tables.

Nothing here touches a device, so tests/unit/test_bench_peers.py runs it on any host.
"""

from __future__ import annotations

import itertools
import json
import re
import statistics
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

LOW_WATER = "reached low water mark for data device"
GROWING = "growing the data device"
MODE_RX = re.compile(r"switching pool to (.+?) mode")
DD_BYTES_RX = re.compile(r"^(\d+) bytes", re.M)
MiB = 1 << 20

Record = tuple[float, str]  # (seconds since boot, message), as KernelLog.read() gives them


def pool_tag(major: int, minor: int) -> str:
    """dm-thin names a pool by its device number in the kernel log: "253:4: reached ..."."""
    return f"{major}:{minor}:"


def for_pool(records: Iterable[Record], tag: str) -> list[Record]:
    return [(t, m) for t, m in records if tag in m]


def out_of_space_episodes(records: Sequence[Record]) -> list[tuple[float, float | None]]:
    """(start, seconds) of each stay in out-of-data-space mode; seconds is None if it never left.

    The kernel logs "(queue IO)" on entry and, when no_space_timeout expires, "(error IO)"
    within the same episode: only a switch from another mode starts a new one.
    """
    episodes: list[tuple[float, float | None]] = []
    since: float | None = None
    for t, message in records:
        m = MODE_RX.search(message)
        if not m:
            continue
        full = m.group(1).startswith("out-of-data-space")
        if full and since is None:
            since = t
        elif not full and since is not None:
            episodes.append((since, t - since))
            since = None
    if since is not None:
        episodes.append((since, None))
    return episodes


def event_to_grown(records: Sequence[Record]) -> list[float]:
    """Seconds from each low-water event to the next "growing the data device" (if any).

    Events with no growth after them (a pool that never grows) give nothing.
    """
    grown = [t for t, m in records if GROWING in m]
    out = []
    for t, message in records:
        if LOW_WATER in message:
            later = next((g for g in grown if g >= t), None)
            if later is not None:
                out.append(later - t)
    return out


def unanswered_event(records: Sequence[Record]) -> bool:
    """Whether the newest low-water event has no growth after it (yet)."""
    events = [t for t, m in records if LOW_WATER in m]
    grown = [t for t, m in records if GROWING in m]
    return bool(events) and (not grown or grown[-1] < events[-1])


def growths(records: Sequence[Record]) -> int:
    return sum(1 for _, m in records if GROWING in m)


def longest_stall(samples: Sequence[tuple[float, int]], end: float) -> float:
    """The longest time the writer made no progress, from (time, bytes written) samples.

    Measured between the times progress was seen to change, from its first write (a process's
    start-up is not a stall) to the writer's end: a writer stuck until it fails counts up to
    its failure. A writer that never wrote stalled from the first sample to its end.
    """
    if not samples:
        return 0.0
    changes: list[float] = []
    last = samples[0][1]
    for t, value in samples[1:]:
        if value != last:
            changes.append(t)
            last = value
    changes = changes or [samples[0][0]]
    changes.append(max(end, changes[-1]))
    return max(b - a for a, b in itertools.pairwise(changes))


def dd_bytes(stderr: str) -> int | None:
    """Bytes dd says it copied ("123 bytes (123 B) copied, ..."), or None."""
    m = DD_BYTES_RX.findall(stderr)
    return int(m[-1]) if m else None


def percentile(xs: Sequence[float], q: int) -> float | None:
    """The q-th percentile (inclusive method); the value itself for one sample."""
    if not xs:
        return None
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]


RoomSample = tuple[float, int, int, int]  # (t, pool data bytes, used bytes, room taken bytes)

ROOM_KEYS = (
    "used_rest_bytes",
    "room_rest_bytes",
    "used_at_peak_bytes",
    "room_peak_bytes",
    "used_end_bytes",
    "room_end_bytes",
)


def room(rest: RoomSample, series: Sequence[RoomSample], end: RoomSample) -> dict[str, int]:
    """The room the pool's files take on the host's filesystem, and the pool's data in use, at
    rest (set up, before the writer), at the peak (the most any sample from the writer's start
    to the end took: the series, then the end) and at the end."""
    peak = max([*series, end], key=lambda s: s[3])
    return {
        "used_rest_bytes": rest[2],
        "room_rest_bytes": rest[3],
        "used_at_peak_bytes": peak[2],
        "room_peak_bytes": peak[3],
        "used_end_bytes": end[2],
        "room_end_bytes": end[3],
    }


# -- rounds into one cell ----------------------------------------------------------------------


def median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


def aggregate(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One (workload, system)'s rounds as one cell: writer time, growths, CPU and sizes their
    median; episodes and event-to-grown times pooled; the longest stall the longest; a failure
    as the first round that failed says it; the plot's series from the first round."""
    ok = [r for r in rounds if "error" not in r]
    failed = [r for r in ok if r.get("writer_exit") != 0 or r.get("timed_out")]
    times = [r["writer_s"] for r in ok if r not in failed] or [r["writer_s"] for r in ok]
    cell: dict[str, Any] = {
        "rounds": len(rounds),
        "writer_s": median(times),
        "writer_range_s": (min(times), max(times)) if times else None,
        "writer_exit": failed[0]["writer_exit"] if failed else (0 if ok else None),
        "out_of_space": [e for r in ok for e in r.get("out_of_space", [])],
        "event_to_grown_s": [x for r in ok for x in r.get("event_to_grown_s", [])],
        "longest_stall_s": max((r["longest_stall_s"] for r in ok), default=None),
    }
    keys = ("growths", "grower_cpu_s", "pool_data_bytes", "backing_size", "backing_allocated")
    for key in (*keys, *ROOM_KEYS):
        cell[key] = median([r[key] for r in ok if r.get(key) is not None])
    if failed:
        cell.update({k: failed[0].get(k) for k in ("written_bytes", "writer_says", "timed_out")})
        cell["writer_s"] = failed[0]["writer_s"]
    errors = [r["error"] for r in rounds if "error" in r]
    if errors and not ok:
        cell["error"] = errors[0]
    cell["errors"] = errors
    cell["series"] = next((r["series"] for r in ok if r.get("series")), None)
    return cell


# -- the table ---------------------------------------------------------------------------------


def fmt(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def mib(cell: dict[str, Any], key: str) -> float | None:
    """The cell's figure in MiB, or None if it has none (a run from before it was measured)."""
    value = cell.get(key)
    return None if value is None else value / MiB


def over(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def room_cell(cell: dict[str, Any]) -> str:
    """Room taken in MiB: at rest / at the peak / at the end."""
    return " / ".join(fmt(mib(cell, f"room_{when}_bytes")) for when in ("rest", "peak", "end"))


def outcome(cell: dict[str, Any]) -> str:
    """ok, or how the writer failed: what it saw, when, and how much it had written."""
    if cell.get("error"):
        return f"error: {cell['error'][:60]}"
    if cell.get("writer_exit", 0) == 0 and not cell.get("timed_out"):
        return "ok"
    what = "killed at timeout" if cell.get("timed_out") else cell.get("writer_says") or "failed"
    return (
        f"**{what}** after {fmt(cell.get('writer_s'), 1)} s, "
        f"{fmt(cell.get('written_bytes', 0) / MiB)} MiB written"
    )


def episodes_cell(cell: dict[str, Any]) -> str:
    episodes = cell.get("out_of_space", [])
    if not episodes:
        return "0"
    if any(s is None for _, s in episodes):
        return f"**{len(episodes)}** (never left)"
    return f"**{len(episodes)}** ({fmt(sum(s for _, s in episodes), 1)} s)"


def writer_cell(cell: dict[str, Any]) -> str:
    span = cell.get("writer_range_s")
    if cell.get("rounds", 1) < 2 or not span or cell.get("writer_exit") != 0:
        return fmt(cell.get("writer_s"), 1)
    return f"{fmt(cell['writer_s'], 1)} ({fmt(span[0], 1)}-{fmt(span[1], 1)})"


def table(result: dict[str, Any]) -> str:
    """The markdown table: one row per (workload, system), in the run's order (cells as
    aggregate() makes them; a single round is its own aggregate)."""
    lines = [
        "| workload | system | out-of-space episodes (time in it) | writer s | x pre-sized "
        "| growths | event→grown p50 / p90 ms | longest stall s | grower CPU s "
        "| pool data MiB at end | in use MiB at end | room taken MiB: rest / peak / end "
        "| room ÷ in use at end | outcome |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for workload, cells in result["cells"].items():
        base = cells.get("presized", {}).get("writer_s")
        for system, cell in cells.items():
            writer = cell.get("writer_s")
            ratio = writer / base if writer and base and cell.get("writer_exit") == 0 else None
            lat = [x * 1000 for x in cell.get("event_to_grown_s", [])]
            lines.append(
                f"| {workload} | {system} | {episodes_cell(cell)} | {writer_cell(cell)} "
                f"| {fmt(ratio, 2)} | {fmt(cell.get('growths'))} "
                f"| {fmt(percentile(lat, 50))} / {fmt(percentile(lat, 90))} "
                f"| {fmt(cell.get('longest_stall_s'), 2)} | {fmt(cell.get('grower_cpu_s'), 2)} "
                f"| {fmt(mib(cell, 'pool_data_bytes'))} | {fmt(mib(cell, 'used_end_bytes'))} "
                f"| {room_cell(cell)} "
                f"| {fmt(over(cell.get('room_end_bytes'), cell.get('used_end_bytes')), 2)} "
                f"| {outcome(cell)} |"
            )
    return "\n".join(lines)


def room_table(result: dict[str, Any], against: str = "lvm2") -> str:
    """Room taken beside lvm2's, per workload: how much more (MiB) at rest, at the peak and at
    the end, and how many times lvm2's at the peak and at the end. Empty without lvm2 cells."""
    lines = [
        f"| workload | system | room taken MiB: rest / peak / end "
        f"| more than {against}, MiB: rest / peak / end | x {against}: peak / end |",
        "| --- | --- | --- | --- | --- |",
    ]
    for workload, cells in result["cells"].items():
        base = cells.get(against)
        if base is None or base.get("room_end_bytes") is None:
            continue
        for system, cell in cells.items():
            if cell.get("room_end_bytes") is None:
                continue
            more = []
            for when in ("rest", "peak", "end"):
                key = f"room_{when}_bytes"
                more.append(fmt((cell[key] - base[key]) / MiB, 0))
            times = [
                fmt(over(cell[f"room_{when}_bytes"], base[f"room_{when}_bytes"]), 2)
                for when in ("peak", "end")
            ]
            lines.append(
                f"| {workload} | {system} | {room_cell(cell)} | {' / '.join(more)} "
                f"| {' / '.join(times)} |"
            )
    return "\n".join(lines) if len(lines) > 2 else ""


def report(result: dict[str, Any]) -> str:
    """The table, then room taken beside lvm2's (when lvm2 ran)."""
    beside = room_table(result)
    return table(result) + (f"\n\n{beside}" if beside else "")


def regroup(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The runs aggregated per (workload, system), in the order they first ran."""
    grouped: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for run in runs:
        grouped.setdefault(run["workload"], {}).setdefault(run["system"], []).append(run)
    return {w: {s: aggregate(rs) for s, rs in by.items()} for w, by in grouped.items()}


def main() -> None:
    """python -m bench.peers_report peers.json: the table again, from the runs (on the host)."""
    result = json.loads(Path(sys.argv[1]).read_text())
    print(report({"cells": regroup(result["runs"])}))


if __name__ == "__main__":
    main()
