"""Memory snapshots of a step in the format PyTorch's memory_viz reads (https://pytorch.org/memory_viz).

- CUDA: the caching allocator's own history, ``torch.cuda.memory._record_memory_history`` around the step and
  ``torch.cuda.memory._snapshot()`` after it: every block allocated and freed, with its Python stack.
- CPU and ``--simulate``: the storage tracker's timeline written in the same shape (``segments`` and
  ``device_traces``; each event an ``alloc`` or ``free_completed`` of one storage, its frame naming the ATen op that
  made or last touched it), so either file drops into memory_viz's Active Memory Timeline.

Both carry a ``torchledger`` entry: the bytes allocated when the recording began, the baseline and the caller's input
bytes the measured peak leaves out, so that :func:`snapshot_peak` gives back the measured peak from the file alone.
The file is written whole or not at all (a temporary file beside it, then renamed).
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

from torchledger.measuring.memory import StorageTracker


def check_snapshot_path(path: str | Path) -> Path:
    """``path`` as a Path, or ValueError naming it when it cannot be written (before any work is done)."""
    p = Path(path)
    if p.exists() and not p.is_file():
        raise ValueError(f"--snapshot {str(path)!r}: exists and is not a regular file")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"--snapshot {str(path)!r}: the folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"--snapshot {str(path)!r}: the folder {str(parent)!r} is not writable")
    return p


def tracker_snapshot(tracker: StorageTracker, *, device: str = "cpu") -> dict[str, Any]:
    """The tracker's event history (``StorageTracker(record_history=True)``) as a memory_viz snapshot."""
    events = []
    for i, e in enumerate(tracker.history):
        events.append({"action": "alloc" if e.action == "alloc" else "free_completed", "addr": e.key,
                       "size": e.size, "stream": 0, "time_us": i,
                       "frames": [{"filename": f"aten::{e.op}", "line": 0, "name": e.op}]})
    return {"segments": [], "device_traces": [events],
            "torchledger": {"source": "storage tracker", "device": device, "allocated_at_start": 0, "base": 0,
                            "inputs": 0}}


def snapshot_peak(data: dict[str, Any]) -> int:
    """The peak a snapshot implies, measured as the suite measures it: the largest total of live blocks over its
    trace, plus what was allocated when the recording began, less the baseline and the caller's inputs."""
    meta = data.get("torchledger") or {}
    current = peak = 0
    traces = data.get("device_traces") or [[]]
    index = int(meta.get("device_index", 0))
    for event in traces[index] if index < len(traces) else []:
        if event["action"] == "alloc":
            current += event["size"]
        elif event["action"] == "free_completed":
            current -= event["size"]
        peak = max(peak, current)
    return int(meta.get("allocated_at_start", 0)) + peak - int(meta.get("base", 0)) - int(meta.get("inputs", 0))


def write_snapshot(data: dict[str, Any], path: str | Path) -> Path:
    """Pickle ``data`` to ``path`` atomically: a temporary file in the same folder, renamed over ``path``."""
    p = check_snapshot_path(path)
    fd, tmp = tempfile.mkstemp(dir=p.parent if str(p.parent) else ".", prefix=f".{p.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(data, f)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p
