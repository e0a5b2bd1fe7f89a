"""A bounded, thread-safe LRU of registration results, so that one registration of an uploaded pair serves
every result type (warped, warped label, DDF).

An entry is keyed by what was asked (model, fixed, moving, options) and stamped with the state of every
file it was computed from (size, modification time in ns, inode of the fixed and moving images, the moving
label and the weights): a stamp that no longer matches (an image re-uploaded, new weights) is a miss and the
entry is replaced. Memory is bounded by bytes (tensors and SimpleITK images of the entries) and by count;
concurrent requests for the same key wait for one computation instead of repeating it.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch

__all__ = ["ResultCache", "file_stamp", "result_nbytes"]


def file_stamp(path: str | os.PathLike | None) -> tuple | None:
    """(size, mtime in ns, inode) of a file; changes whenever the file is rewritten or replaced."""
    if not path:
        return None
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def result_nbytes(value: Any) -> int:
    """Bytes held by the tensors and SimpleITK images among ``value``'s attributes (or of ``value``)."""
    plain = isinstance(value, torch.Tensor) or not hasattr(value, "__dict__")
    items = [value] if plain else vars(value).values()
    total = 0
    for item in items:
        if isinstance(item, torch.Tensor):
            total += item.element_size() * item.numel()
        elif hasattr(item, "GetNumberOfPixels") and hasattr(item, "GetSizeOfLastDimension"):
            total += item.GetNumberOfPixels() * item.GetNumberOfComponentsPerPixel() * 8
    return total


class ResultCache:
    """LRU of ``key -> (stamp, value)`` bounded by ``max_bytes`` (``sizeof(value)``) and ``max_entries``."""

    def __init__(
        self, max_bytes: int, max_entries: int = 64, sizeof: Callable[[Any], int] = result_nbytes
    ) -> None:
        self.max_bytes, self.max_entries, self.sizeof = int(max_bytes), int(max_entries), sizeof
        self._entries: OrderedDict[Hashable, tuple[Hashable, Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[Hashable, threading.Lock] = {}
        self.hits = self.misses = 0

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(size for _, _, size in self._entries.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _lookup(self, key: Hashable, stamp: Hashable) -> tuple[bool, Any]:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] != stamp:
                return False, None
            self._entries.move_to_end(key)
            return True, entry[1]

    def get_or_compute(self, key: Hashable, stamp: Hashable, compute: Callable[[], Any]) -> Any:
        """The cached value of ``key`` if its stamp is ``stamp``, else ``compute()`` (stored when it fits)."""
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # one computation per key at a time; the others then find it cached
            found, value = self._lookup(key, stamp)
            if found:
                self.hits += 1
                return value
            self.misses += 1
            value = compute()
            size = self.sizeof(value)
            with self._lock:
                self._entries.pop(key, None)  # a stale entry (an input changed) goes
                if size <= self.max_bytes and self.max_entries > 0:
                    self._entries[key] = (stamp, value, size)
                    total = sum(s for _, _, s in self._entries.values())
                    while len(self._entries) > self.max_entries or total > self.max_bytes:
                        old, (_, _, evicted) = self._entries.popitem(last=False)
                        self._key_locks.pop(old, None)
                        total -= evicted
                if key not in self._entries:
                    self._key_locks.pop(key, None)
            return value
