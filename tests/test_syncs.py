"""vllm_hass.bench.syncs: deterministic would-be-sync and op counting on a CPU."""

import gc
import threading

import pytest
import torch

from vllm_hass.bench.syncs import HostMemory, SyncCounter, cuda_sync_count, on_cuda

DEV = torch.device("cpu")  # the emulated device, as plugin code names it


@pytest.fixture
def mem():
    return HostMemory()


@pytest.fixture
def bufs(mem):
    """(pinned host, pageable host, device) buffers of 8 floats."""
    pinned = mem.add(torch.arange(8.0))
    pageable = mem.add(torch.arange(8.0), pinned=False)
    dev = torch.arange(8.0)
    return pinned, pageable, dev


def count(mem, fn):
    with SyncCounter(mem) as c:
        fn()
    return c


# -- registry -----------------------------------------------------------------


def test_registry_views_ranges_and_expiry(mem):
    host = mem.add(torch.zeros(16), pinned=False)
    dev = torch.zeros(16)
    assert mem.is_host(host) and mem.is_host(host[3:7]) and mem.is_host(host.view(4, 4))
    assert not mem.is_pinned(host)
    assert not mem.is_host(dev)
    # another storage over registered memory is inside the range
    alias = torch.from_numpy(host.numpy()[4:])
    assert mem.is_host(alias)
    mem.add(host, pinned=True)
    assert mem.is_pinned(host[2:])
    # freed buffers drop out, so reused memory is not mistaken for host
    tmp = mem.add(torch.zeros(4))
    assert len(mem) == 2
    del tmp
    gc.collect()
    assert len(mem) == 1
    mem.remove(host)
    assert not mem.is_host(host)


def test_freed_host_memory_reused_by_device_is_device(mem):
    for _ in range(50):
        host = mem.add(torch.empty(1024))
        ptr = host.data_ptr()
        del host
        gc.collect()
        dev = torch.empty(1024)  # the allocator usually hands the block back
        if dev.data_ptr() == ptr:
            break
    else:
        pytest.skip("allocator never reused the freed block")
    assert not mem.is_host(dev) and not mem.is_pinned(dev)


# -- scalars ------------------------------------------------------------------


@pytest.mark.parametrize("read,label", [
    (lambda t: t.item(), "item"),
    (lambda t: bool(t), "bool"),
    (lambda t: int(t), "int"),
    (lambda t: float(t), "float"),
    (lambda t: 1 if t else 0, "bool"),
])
def test_scalar_read_device_syncs_host_does_not(mem, bufs, read, label):
    pinned, pageable, dev = bufs
    c = count(mem, lambda: read(dev[1]))
    assert (c.syncs, c.events) == (1, [label])
    assert c.op_counts["aten::_local_scalar_dense"] == 1
    for host in (pinned, pageable):
        c = count(mem, lambda: read(host[1]))
        assert (c.syncs, c.events) == (0, [])


def test_item_counted_once(mem, bufs):
    _, _, dev = bufs
    c = count(mem, lambda: [dev[i].item() for i in range(3)])
    assert c.syncs == 3 and c.events == ["item"] * 3


# -- readbacks ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["tolist", "cpu", "numpy"])
def test_readback_device_vs_host(mem, bufs, name):
    pinned, pageable, dev = bufs
    c = count(mem, lambda: getattr(dev, name)())
    assert (c.syncs, c.events) == (1, [name])
    for host in (pinned, pageable):
        c = count(mem, lambda: getattr(host, name)())
        assert c.syncs == 0


def test_cpu_result_is_host_copy(mem, bufs):
    _, _, dev = bufs
    with SyncCounter(mem) as c:
        h = dev.cpu()
        assert h.data_ptr() != dev.data_ptr()
        h.tolist()
        h[0].item()
        h.sum().item()  # ops on host tensors stay on the host
    assert (c.syncs, c.events) == (1, ["cpu"])
    assert c.copies["D2H"] == 1


def test_to_cpu_string_and_non_blocking(mem, bufs):
    _, _, dev = bufs
    c = count(mem, lambda: dev.to("cpu"))
    assert (c.syncs, c.events) == (1, ["cpu"])
    c = count(mem, lambda: dev.to("cpu", non_blocking=True))  # pinned output on CUDA
    assert (c.syncs, c.copies["D2H"]) == (0, 1)
    c = count(mem, lambda: dev.to(DEV))  # same device: no transfer
    assert (c.syncs, c.copies["D2H"], c.ops) == (0, 0, 0)


# -- data-dependent shapes ----------------------------------------------------


def test_bool_mask_index_syncs_integer_index_does_not(mem, bufs):
    _, _, dev = bufs
    mask = dev > 3
    idx = torch.arange(3) * 2  # made before the counter: device
    c = count(mem, lambda: dev[mask])
    assert (c.syncs, c.events) == (1, ["bool-mask index"])
    assert c.op_counts["aten::index"] == 1
    c = count(mem, lambda: dev[idx])
    assert (c.syncs, c.op_counts["aten::index"]) == (0, 1)
    vals = torch.ones(4)
    c = count(mem, lambda: dev.index_put_((mask,), vals))
    assert (c.syncs, c.events) == (1, ["bool-mask index"])
    c = count(mem, lambda: dev.__setitem__(mask, vals))
    assert (c.syncs, c.events) == (1, ["bool-mask index"])
    c = count(mem, lambda: dev.index_put_((idx,), vals[:3]))
    assert c.syncs == 0


def test_mask_fill_scalar_and_host_index(mem, bufs):
    pinned, _, dev = bufs
    mask = dev > 3
    c = count(mem, lambda: dev.__setitem__(mask, 0.0))  # ATen -> masked_fill_
    assert c.syncs == 0
    host_idx = mem.add(torch.tensor([0, 1]), pinned=False)
    c = count(mem, lambda: dev[host_idx])
    assert (c.syncs, c.events) == (1, ["H2D implicit index"])


def test_nonzero_and_friends(mem, bufs):
    pinned, _, dev = bufs
    mask = dev > 3
    c = count(mem, lambda: torch.nonzero(mask))
    assert (c.syncs, c.events) == (1, ["nonzero"])
    c = count(mem, lambda: torch.where(mask))
    assert c.events == ["nonzero"]
    c = count(mem, lambda: pinned.nonzero())
    assert c.syncs == 0
    c = count(mem, lambda: dev.masked_select(mask))
    assert c.events == ["masked_select"]
    c = count(mem, lambda: torch.unique(dev))
    assert c.events == ["unique"]
    c = count(mem, lambda: dev.long().bincount())
    assert c.events == ["bincount"]


def test_repeat_interleave_output_size(mem, bufs):
    _, _, dev = bufs
    reps = torch.full((8,), 2)
    c = count(mem, lambda: torch.repeat_interleave(dev, reps))
    assert (c.syncs, c.events) == (1, ["repeat_interleave without output_size"])
    c = count(mem, lambda: torch.repeat_interleave(dev, reps, output_size=16))
    assert c.syncs == 0
    assert c.op_counts["aten::repeat_interleave"] == 1
    c = count(mem, lambda: torch.repeat_interleave(dev, 2))  # int repeats
    assert c.syncs == 0


# -- host -> device -----------------------------------------------------------


def test_h2d_copy_rules(mem, bufs):
    pinned, pageable, dev = bufs
    c = count(mem, lambda: dev.copy_(pinned, non_blocking=True))
    assert (c.syncs, c.copies["H2D"], c.op_counts["aten::copy_"]) == (0, 1, 1)
    c = count(mem, lambda: dev.copy_(pinned, non_blocking=False))
    assert (c.syncs, c.events) == (1, ["H2D blocking"])
    c = count(mem, lambda: dev.copy_(pageable, non_blocking=True))
    assert (c.syncs, c.events) == (1, ["H2D pageable"])
    c = count(mem, lambda: dev[:4].copy_(pinned[:4], non_blocking=True))
    assert (c.syncs, c.copies["H2D"]) == (0, 1)
    # unregistered sources are device memory: a D2D copy
    c = count(mem, lambda: dev.copy_(torch.zeros(8), non_blocking=False))
    assert (c.syncs, c.copies["H2D"]) == (0, 0)


def test_h2d_via_to_and_tensor(mem, bufs):
    pinned, pageable, _ = bufs
    with SyncCounter(mem) as c:
        d = pinned.to(DEV, non_blocking=True)
        assert d.data_ptr() != pinned.data_ptr() and not mem.is_host(d)
    assert (c.syncs, c.copies["H2D"]) == (0, 1)
    c = count(mem, lambda: pinned.to(DEV))
    assert c.events == ["H2D blocking"]
    c = count(mem, lambda: pageable.to(DEV, non_blocking=True))
    assert c.events == ["H2D pageable"]
    c = count(mem, lambda: torch.tensor([1, 2], device=DEV))
    assert c.events == ["H2D blocking"]
    c = count(mem, lambda: torch.tensor([1, 2])[0].item())  # a host tensor
    assert c.syncs == 0


def test_d2h_copy_rules(mem, bufs):
    pinned, pageable, dev = bufs
    c = count(mem, lambda: pinned.copy_(dev, non_blocking=True))
    assert (c.syncs, c.copies["D2H"]) == (0, 1)
    c = count(mem, lambda: pinned.copy_(dev))
    assert c.events == ["D2H blocking"]
    c = count(mem, lambda: pageable.copy_(dev, non_blocking=True))
    assert c.events == ["D2H pageable"]


# -- ops, patches, nesting ----------------------------------------------------


def test_op_counting(mem, bufs):
    _, _, dev = bufs
    a, b = torch.ones(3), torch.ones(3)
    c = count(mem, lambda: a + b)
    assert (c.ops, dict(c.op_counts)) == (1, {"aten::add": 1})
    c = count(mem, lambda: (a * b).sum())
    assert (c.ops, dict(c.op_counts)) == (2, {"aten::mul": 1, "aten::sum": 1})
    assert c.syncs == 0


_PATCHED = ["item", "tolist", "numpy", "cpu", "to", "__bool__", "__int__", "__float__", "__index__"]


def test_methods_restored_after_exit(mem):
    before = {n: getattr(torch.Tensor, n) for n in _PATCHED}
    own = {n for n in _PATCHED if n in vars(torch.Tensor)}
    tensor_fn, as_tensor_fn = torch.tensor, torch.as_tensor
    with pytest.raises(ValueError):
        with SyncCounter(mem):
            assert torch.Tensor.tolist is not before["tolist"]
            assert torch.tensor is not tensor_fn
            raise ValueError
    for n in _PATCHED:
        assert getattr(torch.Tensor, n) is before[n], n
    assert {n for n in _PATCHED if n in vars(torch.Tensor)} == own
    assert torch.tensor is tensor_fn and torch.as_tensor is as_tensor_fn
    # and nothing is counted afterwards
    c = SyncCounter(mem)
    with c:
        pass
    torch.ones(2).tolist()
    int(torch.ones(()))
    assert (c.syncs, c.ops) == (0, 0)


def test_nesting_and_reset(mem, bufs):
    _, _, dev = bufs
    outer, inner = SyncCounter(mem), SyncCounter(mem)
    with outer:
        dev[0].item()
        with inner:
            dev.tolist()
            dev + dev
        assert torch.Tensor.tolist is not torch._C.TensorBase.tolist  # outer still patched
        dev.numpy()
    assert inner.events == ["tolist"] and inner.ops == 1
    assert outer.events == ["item", "tolist", "numpy"]
    assert outer.op_counts["aten::add"] == 1
    assert torch.Tensor.tolist is torch._C.TensorBase.tolist
    outer.reset()
    assert (outer.syncs, outer.ops, outer.events, dict(outer.op_counts), dict(outer.copies)) == \
        (0, 0, [], {}, {})
    with outer:  # reusable after reset
        dev[0].item()
    assert outer.syncs == 1


def test_other_threads_not_counted(mem, bufs):
    _, _, dev = bufs
    done = threading.Event()
    with SyncCounter(mem) as c:
        t = threading.Thread(target=lambda: (dev.tolist(), dev[0].item(), done.set()))
        t.start()
        t.join()
    assert done.is_set() and c.syncs == 0


def test_real_mode_treats_cpu_as_host(mem, bufs):
    _, _, dev = bufs
    with SyncCounter(mem, device_is_cpu_emulated=False) as c:
        dev[0].item()
        dev.tolist()
        dev.nonzero()
    assert c.syncs == 0 and c.op_counts["aten::nonzero"] == 1


@pytest.mark.skipif(not on_cuda(), reason="needs CUDA")
def test_cuda_sync_count():
    x = torch.ones(4, device="cuda")
    with cuda_sync_count() as r:
        x.sum().item()
    assert r.count >= 1
    with cuda_sync_count() as r:
        x + x
    assert r.count == 0


def test_cuda_sync_count_refuses_without_cuda():
    if on_cuda():
        pytest.skip("CUDA present")
    with pytest.raises(RuntimeError):
        with cuda_sync_count():
            pass
