"""Phase measurement sees a real allocation, also after an earlier phase freed a larger one."""

import torch

from bench.core.measure import measure


def test_peak_memory_sees_heap_reuse_after_an_earlier_phase():
    """Small tensors live on the malloc heap; freed heap is reused without raising RSS unless released.

    This is what happens to the later cells of a sweep (they read ~0 bytes without the release).
    """
    cpu = torch.device("cpu")
    keep = []
    with measure(cpu) as first:
        xs = [torch.ones(1000) for _ in range(20000)]  # ~80 MB in small heap blocks
        keep.append(torch.ones(1000))  # pins the heap top so glibc cannot trim it on its own
        del xs
    with measure(cpu) as second:
        ys = [torch.ones(1000) for _ in range(10000)]  # ~40 MB, fits in what the first phase freed
        del ys
    assert first.peak_bytes >= 60 * 2**20
    assert second.peak_bytes >= 25 * 2**20
    assert second.seconds > 0 and second.mem_kind == "cpu_rss_sampled"
