"""Fixtures shared by every test module."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_cpu_thread():
    # These runs are tiny. With two intra-op threads on a 2-core machine that is also busy with
    # other work, OpenMP's spin-waiting turns 0.05 s epochs into seconds; one thread is steady.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
