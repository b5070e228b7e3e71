import gc

import numpy as np
import pytest
import torch

from baq.run.activations import DTYPES, ActivationStore, format_size, parse_size

SHAPE = (7, 5, 6)


@pytest.mark.parametrize(
    "text, want",
    [
        ("0", 0),
        ("123", 123),
        ("500MB", 500 * 10**6),
        ("500 mb", 500 * 10**6),
        ("2GiB", 2 * 2**30),
        ("2gib", 2 * 2**30),
        ("1.5G", int(1.5 * 2**30)),
        ("64k", 64 * 1024),
        ("10KB", 10_000),
        ("3MiB", 3 * 2**20),
        ("1TB", 10**12),
        ("7B", 7),
        (".5KiB", 512),
        ("none", None),
        ("Unlimited", None),
        (None, None),
        (42, 42),
    ],
)
def test_parse_size(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("text", ["", "GiB", "-1GB", "2 parsecs", "1e9", "1,5GB", "2GiBs"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_format_size():
    assert format_size(100) == "100 B"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(3 * 2**30) == "3.0 GiB"


def _pair(dtype, tmp_path):
    ram = ActivationStore(SHAPE, dtype, max_bytes=None)
    disk = ActivationStore(SHAPE, dtype, max_bytes=0, dir=tmp_path)
    assert not ram.spilled and disk.spilled
    return ram, disk


@pytest.mark.parametrize("dtype", DTYPES)
def test_ram_and_disk_agree(dtype, tmp_path):
    ram, disk = _pair(dtype, tmp_path)
    data = torch.randn(SHAPE, dtype=torch.float64)  # writes cast, as tensor assignment does
    for store in (ram, disk):
        assert len(store) == SHAPE[0] and store.shape == SHAPE and store.dtype == dtype
        assert store.nbytes == np.prod(SHAPE) * torch.empty((), dtype=dtype).element_size()
        for s in range(0, SHAPE[0], 3):  # uneven batches
            store[s : s + 3] = data[s : s + 3]
    want = data.to(dtype)
    for store in (ram, disk):
        assert torch.equal(store[:], want)
        assert torch.equal(store[2:5], want[2:5])
        assert torch.equal(store[-2:], want[-2:])
        assert torch.equal(store[3], want[3]) and torch.equal(store[-1], want[-1])
        assert store[5:2].shape == (0, *SHAPE[1:])
        got = store[1:3]
        got.zero_()  # reads are copies
        assert torch.equal(store[1:3], want[1:3])
    # overwrite a row, an int row, and broadcast a scalar, the same way in both
    new = torch.randn(2, *SHAPE[1:])
    for store in (ram, disk):
        store[4:6] = new
        store[0] = new[0]
        store[6:7] = 1.25
    for store in (ram, disk):
        assert torch.equal(store[4:6], new.to(dtype))
        assert torch.equal(store[0], new[0].to(dtype))
        assert torch.equal(store[6], torch.full(SHAPE[1:], 1.25, dtype=dtype))
    assert torch.equal(ram.to_tensor(), disk.to_tensor())
    ram.close()
    disk.close()


@pytest.mark.parametrize("dtype", DTYPES)
def test_spill_file_is_raw_array(dtype, tmp_path):
    data = torch.randn(SHAPE).to(dtype)
    with ActivationStore.from_tensors([data], max_bytes=0, dir=tmp_path) as store:
        raw = np.fromfile(store.path, dtype={2: np.int16, 4: np.float32}[data.element_size()])
        bits = data.view(torch.int16) if data.element_size() == 2 else data
        assert np.array_equal(raw.reshape(SHAPE), bits.numpy())


def test_budget_boundary(tmp_path):
    nbytes = int(np.prod(SHAPE)) * 4
    assert not ActivationStore(SHAPE, torch.float32, max_bytes=nbytes).spilled
    assert ActivationStore(SHAPE, torch.float32, max_bytes=nbytes - 1, dir=tmp_path).spilled
    assert not ActivationStore(SHAPE, torch.bfloat16, max_bytes=nbytes // 2).spilled
    assert not ActivationStore((0, 5, 6), torch.float32, max_bytes=0).spilled


def test_spill_file_removed_on_close(tmp_path):
    store = ActivationStore(SHAPE, torch.bfloat16, max_bytes=10, dir=tmp_path)
    folder = store.path.parent
    assert store.path.is_file() and folder.parent == tmp_path
    assert store.path.stat().st_size == store.nbytes
    store[:] = torch.ones(SHAPE)
    store.close()
    assert not folder.exists() and store.closed
    store.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        store[0]
    with ActivationStore(SHAPE, max_bytes=0, dir=tmp_path) as store:
        folder = store.path.parent
        assert folder.exists()
    assert not folder.exists()
    # garbage collection removes it too
    store = ActivationStore(SHAPE, max_bytes=0, dir=tmp_path)
    folder = store.path.parent
    del store
    gc.collect()
    assert not folder.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("max_bytes", [None, 0])
def test_from_tensors_append_and_empty_like(max_bytes, tmp_path):
    samples = [torch.randn(1, 5, 6) for _ in range(4)] + [torch.randn(3, 5, 6)]
    with ActivationStore.from_tensors(samples, max_bytes=max_bytes, dir=tmp_path) as store:
        assert store.shape == (7, 5, 6) and store.dtype == torch.float32
        assert store.spilled == (max_bytes == 0) and store.filled == 7
        assert torch.equal(store[:], torch.cat(samples))
        with pytest.raises(ValueError, match="append"):
            store.append(torch.randn(1, 5, 6))  # full
        with store.empty_like() as out:
            assert out.shape == store.shape and out.dtype == store.dtype
            assert out.spilled == store.spilled and out.filled == 0
            assert out.path != store.path or out.path is None
            for s in range(0, len(store), 2):  # the pipeline's forward_all pattern
                out[s : s + 2] = store[s : s + 2] * 2
            assert torch.equal(out[:], torch.cat(samples) * 2)
    with ActivationStore.from_tensors(torch.cat(samples), max_bytes=max_bytes) as whole:
        assert whole.shape == (7, 5, 6) and torch.equal(whole[:], torch.cat(samples))
    half = ActivationStore.from_tensors(iter(samples), dtype=torch.bfloat16, max_bytes=max_bytes)
    assert half.dtype == torch.bfloat16
    assert torch.equal(half[:], torch.cat(samples).to(torch.bfloat16))
    half.close()


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        ActivationStore(SHAPE, torch.int64)
    with pytest.raises(ValueError):
        ActivationStore.from_tensors([])
    with pytest.raises(ValueError, match="rows"):
        ActivationStore.from_tensors([torch.zeros(1, 5, 6), torch.zeros(1, 5, 7)])
    for max_bytes in (None, 0):
        with ActivationStore(SHAPE, max_bytes=max_bytes, dir=tmp_path) as store:
            with pytest.raises(IndexError):
                store[7]
            with pytest.raises(IndexError, match="step"):
                store[::2]
            with pytest.raises(IndexError):
                store["a"]
            with pytest.raises(RuntimeError):
                store[0:2] = torch.zeros(3, 5, 6)
            with pytest.raises(ValueError, match="append"):
                store.append(torch.zeros(5, 6))


def test_large_spilled_roundtrip(tmp_path, monkeypatch):
    """Reads and writes larger than one I/O chunk are split and reassembled."""
    import baq.run.activations as act

    monkeypatch.setattr(act, "_CHUNK", 1000)
    data = torch.randn(9, 33, 17)
    with ActivationStore.from_tensors([data], max_bytes=0, dir=tmp_path) as store:
        assert torch.equal(store[:], data)
        assert torch.equal(store[3:8], data[3:8])
