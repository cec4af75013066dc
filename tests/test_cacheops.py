"""The cache copies behind ``CacheOps``: the device implementation (ONNX copy graphs, what CUDA
runs), here on onnxruntime's CPU provider, gives bit for bit what the host one (numpy) gives,
for every operation, on random tensors of the cache's shapes — NaN, -0.0 and infinities
included, so that any arithmetic instead of a copy shows — and at the edges a batch reaches
(no rows kept, no positions left, an empty past, a newcomer wider or narrower than the batch).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from service.cacheops import HOST, Cache, HostCacheOps, to_host
from service.devicecache import DeviceCacheOps
from service.runtime import CPU

DTYPES = [np.float32, np.float16]  # the caches are float32; the graphs are built per type
SHAPES = [(1, 1, 1, 1), (3, 2, 5, 4), (6, 4, 0, 8), (5, 2, 9, 16)]  # (B, H, T, Dh)


@pytest.fixture(scope="module", params=DTYPES, ids=lambda t: np.dtype(t).name)
def device(request: pytest.FixtureRequest) -> DeviceCacheOps:
    return DeviceCacheOps([CPU], "cpu", dtype=request.param)


def tensor(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Random values with a sprinkling of NaN, -0.0 and ±inf."""
    x = rng.standard_normal(shape).astype(dtype)
    flat = x.reshape(-1)
    for special in (np.nan, -0.0, np.inf, -np.inf):
        flat[rng.integers(0, max(flat.size, 1), size=min(flat.size, 2))] = special
    return x


def identical(got: Cache, want: np.ndarray) -> None:
    """got is a device tensor (an OrtValue) holding exactly want's bits."""
    assert isinstance(got, ort.OrtValue) and isinstance(want, np.ndarray)
    (g,) = to_host([got])
    assert (g.dtype, g.shape) == (want.dtype, want.shape)
    assert g.tobytes() == want.tobytes()


@pytest.mark.parametrize("shape", SHAPES)
def test_take(device: DeviceCacheOps, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(1)
    x = tensor(rng, shape, device.dtype)
    b, t = shape[0], shape[2]
    for rows in ([], [0], list(range(b))[::-1], sorted(rng.choice(b, (b + 1) // 2, False))):
        idx = np.asarray(rows, np.int64)
        for start, stop in ((0, t), (0, t // 2), (t // 2, t), (t, t)):
            want = HOST.take(x, idx, 2, start, stop)
            identical(device.take(x, idx, 2, start, stop), want)
            # a tensor already on the device, as a step hands it over
            identical(device.take(device.pad(x, 2, t), idx, 2, start, stop), want)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("at_end", [True, False])
def test_stack(device: DeviceCacheOps, shape: tuple[int, ...], at_end: bool) -> None:
    rng = np.random.default_rng(2)
    _, h, t, dh = shape
    for other_rows, other_len, extra in ((1, 0, 0), (4, t + 3, 0), (2, max(t - 1, 0), 2)):
        x = tensor(rng, shape, device.dtype)
        y = tensor(rng, (other_rows, h, other_len, dh), device.dtype)
        width = max(t, other_len) + extra
        for a, c in ((x, y), (y, x)):
            identical(device.stack(a, c, 2, width, at_end), HOST.stack(a, c, 2, width, at_end))


@pytest.mark.parametrize("shape", SHAPES)
def test_pad(device: DeviceCacheOps, shape: tuple[int, ...]) -> None:
    x = tensor(np.random.default_rng(3), shape, device.dtype)
    for width in (shape[2], shape[2] + 1, shape[2] + 7):
        identical(device.pad(x, 2, width), HOST.pad(x, 2, width))


@pytest.mark.parametrize("shape", [s for s in SHAPES if s[2] > 0])
def test_place(device: DeviceCacheOps, shape: tuple[int, ...]) -> None:
    """Newcomers' rows into free slots: the newcomers' batch narrower, as wide and wider than
    the target (its rows never longer than the target), each row's length its own."""
    rng = np.random.default_rng(4)
    b, h, w, dh = shape
    for other_width in (max(w - 2, 1), w, w + 3):
        y = tensor(rng, (4, h, other_width, dh), device.dtype)
        for k in range(min(b, 4) + 1):  # k = 0: nothing placed
            slots = [int(i) for i in rng.choice(b, k, replace=False)]
            rows = [int(j) for j in rng.choice(4, k, replace=False)]
            lengths = [int(n) for n in rng.integers(1, min(w, other_width) + 1, k)]
            x = tensor(rng, shape, device.dtype)
            want = HOST.place(x.copy(), slots, y, rows, lengths, 2)
            identical(device.place(x, slots, y, rows, lengths, 2), want)


@pytest.mark.parametrize("lengths", [[1], [3, 1, 4], [5, 5], [2, 7, 1, 1, 3]])
@pytest.mark.parametrize("extra", [0, 2])
def test_unpack(device: DeviceCacheOps, lengths: list[int], extra: int) -> None:
    """A packed encoder output (1, H, T, Dh) laid out as a padded batch: each row's tokens at
    its first positions, zeros after them."""
    rng = np.random.default_rng(5)
    n, width = len(lengths), max(lengths) + extra
    mask = np.arange(width)[None, :] < np.asarray(lengths)[:, None]
    rows, cols = np.nonzero(mask)
    kv = tensor(rng, (1, 3, len(rows), 4), device.dtype)
    want = HOST.unpack(kv, rows, cols, n, width)
    assert want.shape == (n, 3, width, 4) and not want.transpose(0, 2, 1, 3)[~mask].any()
    identical(device.unpack(kv, rows, cols, n, width), want)


def test_host_ops_keep_numpy_and_take_device_tensors() -> None:
    """The host implementation answers numpy, also for OrtValues given to it (copied first)."""
    x = tensor(np.random.default_rng(6), (3, 2, 4, 5), np.dtype(np.float32))
    on_device = ort.OrtValue.ortvalue_from_numpy(x.copy(), "cpu", 0)
    got = HostCacheOps().take(on_device, np.array([2, 0]), 2, 1, 3)
    assert isinstance(got, np.ndarray) and got.tobytes() == x[[2, 0]][:, :, 1:3].tobytes()
