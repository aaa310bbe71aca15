"""The dataloader group: workers, pinned memory and persistent workers over several epochs, and host-to-device copy
bandwidth of pageable against pinned memory."""

from __future__ import annotations

import time
import warnings
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader

from benchmarks.performance.conftest import Ledger
from torchledger.formulas.hardware import lookup_device
from torchledger.measuring.timing import cuda_event_times, median
from torchledger.workloads.data import SyntheticImages

EPOCHS = 3
CONFIGS = [(0, False, False), (0, True, False)] + [
    (workers, pin, persistent) for workers in (2, 4) for pin in (False, True) for persistent in (False, True)
]


def _id(config: tuple[int, bool, bool]) -> str:
    workers, pin, persistent = config
    return f"workers{workers}-pin_{'on' if pin else 'off'}-persistent_{'on' if persistent else 'off'}"


@pytest.mark.benchmark(group="dataloader")
@pytest.mark.parametrize("config", CONFIGS, ids=_id)
def test_epochs(ledger: Ledger, sizes: dict[str, Any], config: tuple[int, bool, bool]) -> None:
    workers, pin, persistent = config
    device = ledger.device
    if pin and not torch.cuda.is_available():
        warnings.filterwarnings("ignore", message=".*pin_memory.*")  # pinning needs an accelerator; PyTorch warns
    dataset = SyntheticImages(sizes["loader_items"])
    loader = DataLoader(dataset, batch_size=sizes["loader_batch"], shuffle=True, num_workers=workers,
                        pin_memory=pin, persistent_workers=persistent)
    first_batch: list[float] = []

    def run_epochs() -> int:
        first_batch.clear()
        seen = 0
        for _ in range(EPOCHS):
            start = time.perf_counter()
            for i, (images, labels) in enumerate(loader):
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                if i == 0:
                    ledger.sync()
                    first_batch.append(time.perf_counter() - start)
                seen += 1
            ledger.sync()
        return seen

    batches = EPOCHS * len(loader)
    seconds = ledger.time(run_epochs, rounds=1, warmup=0, events=False, batches=batches,
                          work={"items": sizes["loader_items"], "batch": sizes["loader_batch"], "epochs": EPOCHS},
                          num_workers=workers, pin_memory=pin, persistent_workers=persistent, epochs=EPOCHS)
    ledger.record(first_batch_latency_s=list(first_batch), batches=batches,
                  batches_per_s=batches / seconds if seconds else None)


@pytest.mark.benchmark(group="dataloader")
@pytest.mark.parametrize("memory", ["pageable", "pinned"])
def test_host_to_device_copy(ledger: Ledger, sizes: dict[str, Any], memory: str) -> None:
    if not ledger.cuda:
        pytest.skip("host-to-device copy bandwidth needs a CUDA GPU")
    n = sizes["copy_bytes"]
    host = torch.empty(n, dtype=torch.uint8, pin_memory=memory == "pinned")
    dev = torch.empty(n, dtype=torch.uint8, device=ledger.device)

    def copy() -> None:
        dev.copy_(host, non_blocking=True)

    seconds = ledger.time(copy, rounds=sizes["rounds"], warmup=2, bytes_moved=n, link="host", work={"bytes": n},
                          memory=memory, bytes=n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = lookup_device(ledger.name)
    events = median(cuda_event_times(copy, rounds=10))
    bandwidth = n / seconds if seconds else None
    link = None if spec is None or bandwidth is None else bandwidth / spec.host_link_bandwidth
    ledger.record(bandwidth_bytes_per_s=bandwidth, cuda_event_bandwidth_bytes_per_s=n / events,
                  fraction_of_host_link=link)
