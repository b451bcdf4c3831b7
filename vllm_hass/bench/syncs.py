"""Count what would be a device->host synchronisation, and torch ops, on a CPU.

A host-overhead harness runs the plugin's per-step GPU code on a CPU-only
machine.  There every tensor lives on ``cpu``, so "device" and "host" tensors
are told apart by memory: :class:`HostMemory` is a registry of host memory
ranges (pinned staging buffers, numpy-backed CPU buffers).  While a
:class:`SyncCounter` is active, every tensor whose storage is not inside a
registered range is treated as a *device* tensor, and the counter records,
deterministically, each operation that on CUDA would block the host until the
GPU catches up.

This module imports only torch and the standard library, so the harness can
load it without vLLM.

Rules (emulated mode, the default)
----------------------------------
One sync each, on a *device* tensor:

* ``aten::_local_scalar_dense``: ``item()``, ``int(t)``, ``float(t)``,
  ``bool(t)``, ``if t:``, ``range(t)``, ``f"{t}"``.  Events ``"item"``,
  ``"int"``, ``"float"``, ``"bool"``, ``"index"``.
* ``Tensor.tolist()`` / ``Tensor.numpy()`` (also ``np.asarray(t)``):
  ``"tolist"`` / ``"numpy"``.  These never reach the dispatcher, so the
  Tensor methods are wrapped while a counter is active.
* ``Tensor.cpu()``, ``.to("cpu")``, ``.to(host_tensor)``: ``"cpu"`` (none with
  ``non_blocking=True`` via ``.to``, whose CUDA output is pinned).  On the CPU
  these would be no-ops returning the same tensor; the counter returns a fresh
  copy registered as (pageable) host memory, as CUDA would.
* data-dependent output shapes: ``aten::nonzero`` (``torch.where(m)``,
  ``argwhere``) ``"nonzero"``; ``aten::masked_select`` ``"masked_select"``;
  ``aten::_unique``/``_unique2``/``unique_dim``/``unique_consecutive``
  ``"unique"``; ``aten::repeat_interleave`` with a tensor of repeats and no
  ``output_size`` ``"repeat_interleave without output_size"``;
  ``aten::bincount`` ``"bincount"``; ``aten::equal`` (returns a Python bool)
  ``"equal"``.
* indexing (``aten::index``, ``index_put(_)``, ``_index_put_impl_``) of a
  device tensor with a device bool/uint8 mask: ``"bool-mask index"`` -- except
  ``x[mask] = scalar`` (``index_put_`` with one mask and a one-element host
  value), which ATen turns into ``masked_fill_`` (no sync).  Indexing a device
  tensor with a *host* index tensor: ``"H2D implicit index"`` (ATen copies the
  index over from pageable memory).  Integer device indices: no sync.
* host->device copies (``aten::copy_`` with a host source and a device
  destination, e.g. ``dev_buf.copy_(pinned_buf, non_blocking=True)``, and
  ``host_tensor.to(torch.device(...))``): ``"H2D pageable"`` if the source was
  registered ``pinned=False``, else ``"H2D blocking"`` if ``non_blocking`` is
  false, else no sync.
* device->host ``copy_`` into a host buffer: ``"D2H blocking"`` if not
  ``non_blocking``, ``"D2H pageable"`` if the host buffer is not pinned, else
  no sync.
* ``torch.tensor(data, device=dev)`` / ``torch.as_tensor(data, device=dev)``
  of non-tensor data onto the device: ``"H2D blocking"``.

``copies`` counts every H2D/D2H transfer, syncing or not.  ``ops`` and
``op_counts`` count every aten op dispatched while active (``a + b`` is one
``aten::add``).  ``events`` holds one label per sync, so
``len(events) == syncs``.

What counts as host memory (emulated mode)
------------------------------------------
* storages registered with :meth:`HostMemory.add` (views of them included);
* outputs of ops whose tensor inputs are all host (CPU ops stay on the CPU);
* ``aten::lift_fresh`` outputs: ``torch.tensor(data)``, ``torch.from_numpy``,
  ``torch.as_tensor(ndarray)``, the scalar of ``x[m] = 0.``;
* the results of the emulated ``.cpu()`` / ``.to("cpu")``.

Everything else is device memory.  In particular a buffer the plugin made
before the counter started with ``torch.zeros(..., device="cpu")`` or
``torch.from_numpy(arr)`` cannot be recognised as host: **plugin code must
stage host data through buffers the harness registers**; an unregistered
source counts as device (so ``dev.copy_(unregistered)`` counts nothing).

Device naming convention (emulated mode): a destination given as the *string*
``"cpu"`` means host; a ``torch.device`` object (``self.device``), an int or
any other string means the emulated device.  This matches vLLM's style
(``device="cpu"`` for host buffers, ``self.device`` for the GPU).

Not covered: explicit ``torch.cuda.synchronize()``/event/stream waits (use
:func:`cuda_sync_count` on a GPU), syncs inside custom kernels, factory
calls with ``device="cpu"`` (their device argument reaches the dispatcher as
a ``torch.device`` and is treated as the device), and ``torch.tensor(t)`` /
``torch.as_tensor(t, device=...)`` where ``t`` is already a tensor.

Real mode (``device_is_cpu_emulated=False``) treats tensors on ``cpu`` as host
and everything else as device, counts ``aten::_to_copy`` transfers from the
real devices, and does not emulate copies.

Nesting: counters may nest (each counts everything inside it); nested
counters should share one :class:`HostMemory`.  The Tensor-method patches are
installed while any counter is active and restored when the last one exits;
they count only in the thread that entered the counter.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections import Counter
from typing import Any, Iterator

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = [
    "HostMemory",
    "SyncCounter",
    "CudaSyncs",
    "on_cuda",
    "cuda_sync_count",
]


# --------------------------------------------------------------------------
# host memory registry
# --------------------------------------------------------------------------


class _Entry:
    __slots__ = ("start", "end", "pinned", "ref")

    def __init__(self, start: int, end: int, pinned: bool, ref: StorageWeakRef):
        self.start, self.end, self.pinned, self.ref = start, end, pinned, ref


def _storage(t: Any):
    if not isinstance(t, torch.Tensor):
        return None
    try:
        return t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse, nested, ...
        return None


class HostMemory:
    """Registry of tensors whose storage is host memory.

    Entries hold only weak references to the storages: a freed buffer drops
    out of the registry, so its memory, once reused by a device tensor, is not
    mistaken for host memory.
    """

    _PRUNE_EVERY = 256

    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}  # StorageImpl address -> entry
        self._adds = 0

    def add(self, t: torch.Tensor, pinned: bool = True) -> torch.Tensor:
        """Register ``t``'s whole storage as host memory; return ``t``."""
        st = _storage(t)
        if st is None:
            raise TypeError(f"cannot register {type(t).__name__} as host memory")
        key = st._cdata
        entry = self._entries.get(key)
        if entry is not None and not entry.ref.expired():
            entry.pinned = bool(pinned)
            return t
        start = st.data_ptr()
        self._entries[key] = _Entry(start, start + st.nbytes(), bool(pinned),
                                    StorageWeakRef(st))
        self._adds += 1
        if self._adds % self._PRUNE_EVERY == 0:
            self.prune()
        return t

    def remove(self, t: torch.Tensor) -> None:
        """Forget ``t``'s storage (no error if it was not registered)."""
        st = _storage(t)
        if st is not None:
            self._entries.pop(st._cdata, None)

    def prune(self) -> None:
        """Drop entries whose storage has been freed."""
        for key in [k for k, e in self._entries.items() if e.ref.expired()]:
            del self._entries[key]

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        self.prune()
        return len(self._entries)

    def _find(self, t: Any) -> _Entry | None:
        st = _storage(t)
        if st is None:
            return None
        key = st._cdata
        entry = self._entries.get(key)
        if entry is not None:
            if not entry.ref.expired():
                return entry
            del self._entries[key]
        # Another storage over registered memory (e.g. torch.from_numpy of a
        # registered buffer's .numpy()).  Only live entries count: a freed
        # range may since hold device data.
        start = st.data_ptr()
        nbytes = st.nbytes()
        if start == 0 or nbytes == 0:
            return None
        end = start + nbytes
        for e in self._entries.values():
            if e.start <= start and end <= e.end and e.end > e.start and not e.ref.expired():
                return e
        return None

    def is_host(self, t: Any) -> bool:
        """True if ``t``'s data lies inside a registered range."""
        return self._find(t) is not None

    def is_pinned(self, t: Any) -> bool:
        """True if ``t`` is registered host memory registered ``pinned=True``."""
        entry = self._find(t)
        return entry is not None and entry.pinned


# --------------------------------------------------------------------------
# per-thread state and the Tensor-method patches
# --------------------------------------------------------------------------


class _State(threading.local):
    def __init__(self) -> None:
        self.active: list[SyncCounter] = []
        self.labels: list[str] = []  # label for the next _local_scalar_dense
        self.suppress = 0  # >0: count ops, not syncs (a wrapper counted it)
        self.quiet = 0  # >0: the counter's own calls; count nothing


_STATE = _State()
_PATCH_LOCK = threading.Lock()
_PATCH_DEPTH = 0
_SAVED: list[tuple[Any, str, bool, Any]] = []  # (owner, name, was_own, value)


@contextlib.contextmanager
def _flag(name: str) -> Iterator[None]:
    setattr(_STATE, name, getattr(_STATE, name) + 1)
    try:
        yield
    finally:
        setattr(_STATE, name, getattr(_STATE, name) - 1)


@contextlib.contextmanager
def _label(name: str) -> Iterator[None]:
    _STATE.labels.append(name)
    try:
        yield
    finally:
        _STATE.labels.pop()


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    sa, sb = _storage(a), _storage(b)
    return sa is not None and sb is not None and sa._cdata == sb._cdata


def _fresh(out: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``out`` as a new tensor: the copy that CUDA would have made."""
    if _same_storage(out, src):
        out = torch.ops.aten._to_copy.default(out)
    return out


def _move_target(args: tuple, kwargs: dict) -> tuple[str, Any] | None:
    """The raw destination of ``Tensor.to(*args, **kwargs)``."""
    if args and isinstance(args[0], torch.Tensor):
        return ("tensor", args[0])
    if "other" in kwargs and isinstance(kwargs["other"], torch.Tensor):
        return ("tensor", kwargs["other"])
    if args and isinstance(args[0], (str, torch.device, int)) and not isinstance(args[0], bool):
        return ("device", args[0])
    if kwargs.get("device") is not None:
        return ("device", kwargs["device"])
    return None


def _orig(name: str):
    return _ORIGINALS[name]


def _w_item(self, *a, **k):
    with _label("item"):
        return _orig("item")(self, *a, **k)


def _scalar_wrapper(name: str, label: str):
    def wrapper(self, *a, **k):
        with _label(label):
            return _orig(name)(self, *a, **k)

    wrapper.__name__ = name
    return wrapper


def _readback_wrapper(name: str):
    """tolist / numpy: never dispatched on the CPU; count here, once."""

    def wrapper(self, *a, **k):
        for c in _STATE.active:
            if not _STATE.quiet and c._is_device(self):
                c._sync(name)
        with _flag("suppress"):
            return _orig(name)(self, *a, **k)

    wrapper.__name__ = name
    return wrapper


def _w_cpu(self, *a, **k):
    active = _STATE.active
    if not active or _STATE.quiet or not active[-1].emulated:
        return _orig("cpu")(self, *a, **k)
    if not active[-1]._is_device(self):
        return _orig("cpu")(self, *a, **k)
    for c in active:
        if c._is_device(self):
            c._d2h(dst_pinned=False, non_blocking=False, label="cpu")
    with _flag("suppress"):
        out = _fresh(_orig("cpu")(self, *a, **k), self)
    _mark_host(out, pinned=False)
    return out


def _w_to(self, *args, **kwargs):
    active = _STATE.active
    to = _orig("to")
    if not active or _STATE.quiet or not active[-1].emulated:
        return to(self, *args, **kwargs)
    target = _move_target(args, kwargs)
    if target is None:
        return to(self, *args, **kwargs)
    top = active[-1]
    if target[0] == "tensor":
        dst_host = top._is_host(target[1])
    else:
        dst_host = top._device_arg_is_host(target[1])
    src_host = top._is_host(self)
    if dst_host == src_host:
        return to(self, *args, **kwargs)
    non_blocking = bool(torch._C._nn._parse_to(*args, **kwargs)[2])
    for c in active:
        if dst_host and c._is_device(self):
            c._d2h(dst_pinned=non_blocking, non_blocking=non_blocking, label="cpu")
        elif not dst_host and c._is_host(self):
            c._h2d(src_pinned=c._is_pinned(self), non_blocking=non_blocking)
    with _flag("suppress"):
        out = _fresh(to(self, *args, **kwargs), self)
    if dst_host:
        _mark_host(out, pinned=non_blocking)
    else:
        _unmark_host(out)
    return out


def _factory_wrapper(name: str, device_pos: int | None):
    """torch.tensor / torch.as_tensor of Python or numpy data onto the device."""

    def wrapper(data, *args, **kwargs):
        fn = _ORIGINALS[name]
        active = _STATE.active
        if not active or _STATE.quiet or isinstance(data, torch.Tensor):
            return fn(data, *args, **kwargs)
        dev = kwargs.get("device")
        if dev is None and device_pos is not None and len(args) > device_pos:
            dev = args[device_pos]
        if dev is None or active[-1]._device_arg_is_host(dev):
            return fn(data, *args, **kwargs)
        for c in active:
            c._h2d(src_pinned=False, non_blocking=False, label="H2D blocking")
        with _flag("suppress"):
            out = fn(data, *args, **kwargs)
        _unmark_host(out)
        return out

    wrapper.__name__ = name
    return wrapper


def _mark_host(t: torch.Tensor, pinned: bool) -> None:
    seen = set()
    for c in _STATE.active:
        if c.emulated and id(c.host) not in seen:
            seen.add(id(c.host))
            if not c.host.is_host(t):
                c.host.add(t, pinned=pinned)


def _unmark_host(t: torch.Tensor) -> None:
    for c in _STATE.active:
        if c.emulated:
            c.host.remove(t)


_TENSOR_PATCHES = {
    "item": _w_item,
    "tolist": _readback_wrapper("tolist"),
    "numpy": _readback_wrapper("numpy"),
    "cpu": _w_cpu,
    "to": _w_to,
    "__bool__": _scalar_wrapper("__bool__", "bool"),
    "__int__": _scalar_wrapper("__int__", "int"),
    "__float__": _scalar_wrapper("__float__", "float"),
    "__index__": _scalar_wrapper("__index__", "index"),
}
_TORCH_PATCHES = {
    "tensor": _factory_wrapper("tensor", None),
    "as_tensor": _factory_wrapper("as_tensor", 1),
}
_ORIGINALS: dict[str, Any] = {}


def _install() -> None:
    global _PATCH_DEPTH
    with _PATCH_LOCK:
        _PATCH_DEPTH += 1
        if _PATCH_DEPTH > 1:
            return
        for owner, patches in ((torch.Tensor, _TENSOR_PATCHES), (torch, _TORCH_PATCHES)):
            for name, wrapper in patches.items():
                was_own = name in vars(owner)
                value = vars(owner)[name] if was_own else None
                _SAVED.append((owner, name, was_own, value))
                _ORIGINALS[name] = getattr(owner, name)
                setattr(owner, name, wrapper)


def _uninstall() -> None:
    global _PATCH_DEPTH
    with _PATCH_LOCK:
        _PATCH_DEPTH -= 1
        if _PATCH_DEPTH > 0:
            return
        while _SAVED:
            owner, name, was_own, value = _SAVED.pop()
            if was_own:
                setattr(owner, name, value)
            else:
                delattr(owner, name)
        _ORIGINALS.clear()


# --------------------------------------------------------------------------
# the counter
# --------------------------------------------------------------------------

_UNIQUE = {"aten::_unique", "aten::_unique2", "aten::unique_dim",
           "aten::unique_consecutive", "aten::unique_dim_consecutive"}
_INDEX = {"aten::index", "aten::index_put_", "aten::index_put", "aten::_index_put_impl_"}
_LIFT = {"aten::lift_fresh", "aten::lift_fresh_copy", "aten::lift"}
_PIN = {"aten::_pin_memory", "aten::pin_memory"}
_MASK_DTYPES = (torch.bool, torch.uint8)


def _bind(func, args: tuple, kwargs: dict) -> dict:
    """Schema argument name -> value."""
    out = dict(kwargs)
    for arg, value in zip(func._schema.arguments, args):
        out[arg.name] = value
    return out


class SyncCounter(TorchDispatchMode):
    """Count would-be device->host syncs and aten ops while active.

    ``syncs`` (int), ``events`` (one label per sync), ``ops`` (int),
    ``op_counts`` (Counter by ``"aten::name"``), ``copies`` (Counter of
    ``"H2D"``/``"D2H"`` transfers, syncing or not).  See the module docstring
    for the rules.
    """

    def __init__(self, host: HostMemory, device_is_cpu_emulated: bool = True):
        super().__init__()
        self.host = host
        self.emulated = bool(device_is_cpu_emulated)
        self.syncs = 0
        self.ops = 0
        self.events: list[str] = []
        self.op_counts: Counter = Counter()
        self.copies: Counter = Counter()

    def reset(self) -> None:
        self.syncs = 0
        self.ops = 0
        self.events.clear()
        self.op_counts.clear()
        self.copies.clear()

    def snapshot(self) -> dict:
        return {"syncs": self.syncs, "ops": self.ops, "events": list(self.events),
                "op_counts": dict(self.op_counts), "copies": dict(self.copies)}

    # -- context manager ---------------------------------------------------

    def __enter__(self):
        _install()
        try:
            _STATE.active.append(self)
            try:
                return super().__enter__()
            except BaseException:
                _STATE.active.remove(self)
                raise
        except BaseException:
            _uninstall()
            raise

    def __exit__(self, exc_type, exc, tb):
        try:
            return super().__exit__(exc_type, exc, tb)
        finally:
            try:
                _STATE.active.remove(self)
            finally:
                _uninstall()

    # -- classification ----------------------------------------------------

    def _is_host(self, t: Any) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        if self.emulated:
            return self.host.is_host(t)
        return t.device.type == "cpu"

    def _is_device(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and not self._is_host(t)

    def _is_pinned(self, t: Any) -> bool:
        if self.host.is_pinned(t):
            return True
        if self.emulated or not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            return False
        with _flag("quiet"):
            return bool(t.is_pinned())

    def _device_arg_is_host(self, dev: Any) -> bool:
        if isinstance(dev, str):
            return torch.device(dev).type == "cpu"
        if isinstance(dev, torch.device):
            return dev.type == "cpu" and not self.emulated
        return False  # an int is a CUDA ordinal

    # -- counting ----------------------------------------------------------

    def _sync(self, label: str) -> None:
        self.syncs += 1
        self.events.append(label)

    def _h2d(self, src_pinned: bool, non_blocking: bool, label: str | None = None) -> None:
        self.copies["H2D"] += 1
        if label is not None:
            self._sync(label)
        elif not src_pinned:
            self._sync("H2D pageable")
        elif not non_blocking:
            self._sync("H2D blocking")

    def _d2h(self, dst_pinned: bool, non_blocking: bool, label: str = "D2H blocking") -> None:
        self.copies["D2H"] += 1
        if not non_blocking:
            self._sync(label)
        elif not dst_pinned:
            self._sync("D2H pageable")

    def _classify(self, name: str, func, args: tuple, kwargs: dict) -> None:
        dev = self._is_device
        if name == "aten::_local_scalar_dense":
            if dev(args[0]):
                self._sync(_STATE.labels[-1] if _STATE.labels else "item")
        elif name == "aten::nonzero":
            if dev(args[0]):
                self._sync("nonzero")
        elif name == "aten::masked_select":
            if any(dev(a) for a in args[:2]):
                self._sync("masked_select")
        elif name in _UNIQUE:
            if dev(args[0]):
                self._sync("unique")
        elif name == "aten::bincount":
            if dev(args[0]):
                self._sync("bincount")
        elif name == "aten::equal":
            if any(dev(a) for a in args[:2]):
                self._sync("equal")
        elif name == "aten::repeat_interleave":
            b = _bind(func, args, kwargs)
            repeats = b.get("repeats")
            if isinstance(repeats, torch.Tensor) and b.get("output_size") is None and dev(repeats):
                self._sync("repeat_interleave without output_size")
        elif name in _INDEX:
            self._classify_index(name, _bind(func, args, kwargs))
        elif name == "aten::copy_":
            b = _bind(func, args, kwargs)
            self._classify_copy(b["src"], b["self"], bool(b.get("non_blocking", False)))
        elif name == "aten::_to_copy" and not self.emulated:
            b = _bind(func, args, kwargs)
            src, target = b["self"], b.get("device")
            if target is not None and torch.device(target).type != src.device.type:
                dst_host = torch.device(target).type == "cpu"
                nb = bool(b.get("non_blocking", False))
                if dst_host and not self._is_host(src):
                    self._d2h(dst_pinned=nb, non_blocking=nb, label="cpu")
                elif not dst_host and self._is_host(src):
                    self._h2d(src_pinned=self._is_pinned(src), non_blocking=nb)

    def _classify_index(self, name: str, b: dict) -> None:
        base = b.get("self")
        if not self._is_device(base):
            return
        indices = [i for i in (b.get("indices") or ()) if isinstance(i, torch.Tensor)]
        masks = [i for i in indices if i.dtype in _MASK_DTYPES]
        if name != "aten::index" and not b.get("accumulate", False):
            value = b.get("values")
            if (len(indices) == 1 and len(masks) == 1 and self._is_device(masks[0])
                    and isinstance(value, torch.Tensor) and value.numel() == 1
                    and self._is_host(value)):
                return  # ATen dispatches this to masked_fill_: no sync
        if any(self._is_host(i) for i in indices):
            self._sync("H2D implicit index")
        if any(self._is_device(m) for m in masks):
            self._sync("bool-mask index")

    def _classify_copy(self, src: Any, dst: Any, non_blocking: bool) -> None:
        src_host, dst_host = self._is_host(src), self._is_host(dst)
        if src_host and not dst_host:
            self._h2d(src_pinned=self._is_pinned(src), non_blocking=non_blocking)
        elif dst_host and not src_host:
            self._d2h(dst_pinned=self._is_pinned(dst), non_blocking=non_blocking)

    def _propagate(self, name: str, args: tuple, kwargs: dict, out: Any) -> None:
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not outs:
            return
        if name in _LIFT:
            pinned = False
        elif name in _PIN or kwargs.get("pin_memory") is True:
            pinned = True
        else:
            ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            if not ins or not all(self.host.is_host(t) for t in ins):
                return
            pinned = False
        for t in outs:
            if not self.host.is_host(t):
                self.host.add(t, pinned=pinned)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _STATE.quiet:
            return func(*args, **kwargs)
        name = func._schema.name
        self.ops += 1
        self.op_counts[name] += 1
        if not _STATE.suppress:
            self._classify(name, func, args, kwargs)
        out = func(*args, **kwargs)
        if self.emulated:
            self._propagate(name, args, kwargs, out)
        return out


# --------------------------------------------------------------------------
# real CUDA
# --------------------------------------------------------------------------


def on_cuda() -> bool:
    """True when real syncs can be counted with :func:`cuda_sync_count`."""
    return torch.cuda.is_available()


class CudaSyncs:
    """Result of :func:`cuda_sync_count`, filled in when the block exits."""

    def __init__(self) -> None:
        self.count = 0
        self.messages: list[str] = []


@contextlib.contextmanager
def cuda_sync_count() -> Iterator[CudaSyncs]:
    """Count real CUDA syncs with ``torch.cuda.set_sync_debug_mode("warn")``.

    Counts what PyTorch itself flags (stream/device synchronisations, blocking
    copies, ``item()``); not syncs inside third-party kernels.
    """
    if not on_cuda():
        raise RuntimeError("cuda_sync_count() needs CUDA; use SyncCounter on a CPU")
    result = CudaSyncs()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield result
        finally:
            torch.cuda.set_sync_debug_mode(previous)
            result.messages = [str(w.message) for w in caught
                               if "synchroniz" in str(w.message).lower()]
            result.count = len(result.messages)
