"""The benchmarks' one way to time GPU work: the calls captured back to back in a CUDA graph,
so that launch overhead counts as in the graphed frame, and the graph replayed."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def graph_time_us(calls: list[Callable[[], None]], replays: int = 15, untimed_replays: int = 1) -> float:
    """Median microseconds of one call when `calls` run back to back in a CUDA graph. Each
    call runs once first, on a side stream (compilation, the allocator, cuBLAS's choices stay
    out of the capture); the graph is then replayed `untimed_replays` times, then `replays`
    times timed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    for _ in range(untimed_replays):
        graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / len(calls))
    return statistics.median(times)
