"""The copies a decode batch makes of its KV cache tensors when its membership changes.

A batch gathers the rows it keeps (compaction), joins two batches on the batch axis
(admission), pads an axis (a longer source, an older past) and writes new rows into free slots.
``CacheOps`` is that small interface; ``Runtime`` picks one implementation at start:

- ``HostCacheOps`` (here): numpy in host memory. On CPU, where host memory is the device.
- ``DeviceCacheOps`` (``service.devicecache``): small ONNX copy graphs run by onnxruntime on the
  model's own execution provider with IO binding, so that on CUDA the caches stay in GPU memory
  as ``OrtValue``s from the encoder to the last step (onnxruntime's Python API has no
  device-side gather or scatter of its own).

Both give bit-identical tensors (pure copies, zeros where padded); the tests hold them to it.
Shapes: caches are (B, H, T, Dh) with the positions T on axis 2; the host one also serves the
batch's small (B, T) masks, positions on axis 1.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

import numpy as np
import onnxruntime as ort

# A cache tensor: a numpy array in host memory, or an OrtValue where IO binding keeps it on the
# execution provider's device.
Cache: TypeAlias = "np.ndarray | ort.OrtValue"
Ints: TypeAlias = Sequence[int]  # host indices: rows, slots, lengths


def host_array(v: ort.OrtValue) -> np.ndarray:
    """A numpy copy of an OrtValue. The copy matters on CPU too: OrtValue.numpy() there is a
    view of memory that onnxruntime may free or reuse (measured: wrong tokens without it)."""
    return np.array(v.numpy(), copy=True)


def to_host(values: Sequence[Cache]) -> list[np.ndarray]:
    """Cache tensors as numpy arrays (copied from the device where they live there)."""
    return [host_array(v) if isinstance(v, ort.OrtValue) else v for v in values]


def on_device(v: Cache, device: str) -> ort.OrtValue:
    """v as an OrtValue in `device` memory (copied there from a numpy array)."""
    if isinstance(v, ort.OrtValue):
        return v
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v), device, 0)


def shape_of(v: Cache) -> tuple[int, ...]:
    return tuple(v.shape()) if isinstance(v, ort.OrtValue) else v.shape


class CacheOps(ABC):
    """Copies of cache tensors. Row indices, widths and lengths are host values (numpy int64
    or ints); a result may be the input changed in place (host) or a new tensor (device):
    always use the returned one."""

    where: str  # "host" or "device", for the start-up log line

    @abstractmethod
    def run(
        self, session: ort.InferenceSession, names: Sequence[str], feeds: Mapping[str, np.ndarray]
    ) -> list[Cache]:
        """The outputs `names` of a graph (the encoder's cross keys/values), kept where this
        implementation keeps caches."""

    @abstractmethod
    def take(self, x: Cache, rows: np.ndarray, axis: int, start: int, stop: int) -> Cache:
        """x[rows] (batch axis 0) with `axis` cut to start:stop."""

    @abstractmethod
    def stack(self, x: Cache, y: Cache, axis: int, width: int, at_end: bool) -> Cache:
        """x's rows then y's, each padded with zeros on `axis` to `width` (≥ both): on the left
        where at_end (the data sits at the end, as in left-padded caches), else on the right."""

    @abstractmethod
    def pad(self, x: Cache, axis: int, width: int) -> Cache:
        """x right-padded with zeros on `axis` to `width` (≥ its own)."""

    @abstractmethod
    def place(self, x: Cache, slots: Ints, y: Cache, rows: Ints, lengths: Ints, axis: int) -> Cache:
        """x with row slots[k] replaced by y's row rows[k] up to lengths[k] on `axis` (≤ both
        widths) and zeros after it; the slots are distinct."""

    @abstractmethod
    def unpack(self, kv: Cache, rows: np.ndarray, cols: np.ndarray, n: int, width: int) -> Cache:
        """A packed encoder output kv (1, H, T, Dh), token t of row rows[t] at position
        cols[t], scattered into the padded layout (n, H, width, Dh), zeros elsewhere."""


def _at(ndim: int, axis: int, span: slice, row: Any = slice(None)) -> tuple[Any, ...]:
    """The index of `row` (all rows: a slice) with `axis` limited to span."""
    index: list[Any] = [row] + [slice(None)] * (ndim - 1)
    index[axis] = span
    return tuple(index)


class HostCacheOps(CacheOps):
    """numpy in host memory; OrtValues given to it are copied to the host first."""

    where = "host"

    def run(
        self, session: ort.InferenceSession, names: Sequence[str], feeds: Mapping[str, np.ndarray]
    ) -> list[Cache]:
        return list(session.run(list(names), dict(feeds)))

    def take(self, x: Cache, rows: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
        (h,) = to_host([x])
        return np.ascontiguousarray(h[rows][_at(h.ndim, axis, slice(start, stop))])

    def stack(self, x: Cache, y: Cache, axis: int, width: int, at_end: bool) -> np.ndarray:
        a, b = to_host([x, y])
        shape = list(a.shape)
        shape[0] = a.shape[0] + b.shape[0]
        shape[axis] = width
        out = np.zeros(shape, a.dtype)
        for part, rows in ((a, slice(0, a.shape[0])), (b, slice(a.shape[0], None))):
            n = part.shape[axis]
            out[_at(a.ndim, axis, slice(width - n, width) if at_end else slice(0, n), rows)] = part
        return out

    def pad(self, x: Cache, axis: int, width: int) -> np.ndarray:
        (h,) = to_host([x])
        widths = [(0, 0)] * h.ndim
        widths[axis] = (0, width - h.shape[axis])
        return np.pad(h, widths)

    def place(
        self, x: Cache, slots: Ints, y: Cache, rows: Ints, lengths: Ints, axis: int
    ) -> np.ndarray:
        a, b = to_host([x, y])
        for slot, j, n in zip(slots, rows, lengths, strict=True):
            a[_at(a.ndim, axis, slice(0, n), slot)] = b[_at(b.ndim, axis, slice(0, n), j)]
            a[_at(a.ndim, axis, slice(n, None), slot)] = 0
        return a

    def unpack(
        self, kv: Cache, rows: np.ndarray, cols: np.ndarray, n: int, width: int
    ) -> np.ndarray:
        (k,) = to_host([kv])  # (1, H, T, Dh)
        out = np.zeros((n, k.shape[1], width, k.shape[3]), k.dtype)
        out[rows, :, cols] = k[0].transpose(1, 0, 2)  # token t → row rows[t], cols[t]
        return out


HOST = HostCacheOps()
