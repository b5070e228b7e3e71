import pytest
import torch

from baq.run import report


def test_reset_peak_memory_forgets_an_earlier_peak():
    """A 512 MiB tensor raises the peak; after a reset the peak is the (smaller) current size."""
    big = torch.ones(2**27)  # 512 MiB of float32, written so the pages are resident
    high = report.peak_rss_gib()
    del big
    if not report.reset_peak_memory():
        pytest.skip("this system cannot reset the resident-memory peak (not Linux 4.0+)")
    low = report.peak_rss_gib()
    assert low < high - 0.4
    again = torch.ones(2**26)  # 256 MiB: the new peak counts it
    assert report.peak_rss_gib() > low + 0.2
    del again
    assert report.peak_memory()["peak_rss_gib"] == pytest.approx(report.peak_rss_gib(), abs=0.01)
