"""The bpf(2) system call, for what bcc 0.26 cannot do: load with program flags (XDP frags), run
BPF_PROG_TEST_RUN, and read or change pinned maps without compiling anything (status, cleanup).

Only the commands and struct fields flannel-bpf uses are here; layouts follow
include/uapi/linux/bpf.h (union bpf_attr), which is stable ABI.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Final

SYS_BPF: Final = 321  # x86_64

# enum bpf_cmd
BPF_MAP_CREATE: Final = 0
BPF_MAP_LOOKUP_ELEM: Final = 1
BPF_MAP_UPDATE_ELEM: Final = 2
BPF_MAP_DELETE_ELEM: Final = 3
BPF_MAP_GET_NEXT_KEY: Final = 4
BPF_PROG_LOAD: Final = 5
BPF_OBJ_PIN: Final = 6
BPF_OBJ_GET: Final = 7
BPF_PROG_TEST_RUN: Final = 10
BPF_PROG_GET_FD_BY_ID: Final = 13
BPF_OBJ_GET_INFO_BY_FD: Final = 15

# enum bpf_prog_type
BPF_PROG_TYPE_SCHED_CLS: Final = 3
BPF_PROG_TYPE_XDP: Final = 6

# enum bpf_map_type
BPF_MAP_TYPE_HASH: Final = 1
BPF_MAP_TYPE_ARRAY: Final = 2
BPF_MAP_TYPE_PERCPU_ARRAY: Final = 6
BPF_MAP_TYPE_LRU_HASH: Final = 9
BPF_MAP_TYPE_LPM_TRIE: Final = 11

BPF_ANY: Final = 0
BPF_F_NO_PREALLOC: Final = 1
BPF_F_XDP_HAS_FRAGS: Final = 1 << 5
BPF_OBJ_NAME_LEN: Final = 16
BPF_FS_MAGIC: Final = 0xCAFE4A11

ATTR_SIZE: Final = 128  # larger than any field we set; the kernel wants the rest zero
LOG_SIZE: Final = 1 << 20


class BPFError(OSError):
    """A bpf(2) command failed; errno is kept, the message names the command."""


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    ret = int(_libc.syscall(SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr)))
    if ret < 0:
        err = ctypes.get_errno()
        raise BPFError(err, f"{what}: {os.strerror(err)}")
    return ret


def _attr() -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(ATTR_SIZE)


def _put(attr: ctypes.Array[ctypes.c_char], offset: int, fmt_size: int, value: int) -> None:
    ctypes.memmove(
        ctypes.addressof(attr) + offset,
        value.to_bytes(fmt_size, "little"),
        fmt_size,
    )


def _get(attr: ctypes.Array[ctypes.c_char], offset: int, size: int) -> int:
    return int.from_bytes(attr.raw[offset : offset + size], "little")


def _addr(buf: ctypes.Array[ctypes.c_char] | None) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


# --------------------------------------------------------------------------------------------
# Programs


def prog_load(
    prog_type: int,
    insns: bytes,
    name: str,
    *,
    prog_flags: int = 0,
    license: str = "GPL",
) -> int:
    """BPF_PROG_LOAD; returns the program fd. The verifier log is in the error on failure."""
    attr = _attr()
    code = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license.encode())
    log = ctypes.create_string_buffer(LOG_SIZE)
    _put(attr, 0, 4, prog_type)
    _put(attr, 4, 4, len(insns) // 8)
    _put(attr, 8, 8, _addr(code))
    _put(attr, 16, 8, _addr(lic))
    _put(attr, 24, 4, 1)  # log_level: only filled on failure in practice
    _put(attr, 28, 4, LOG_SIZE)
    _put(attr, 32, 8, _addr(log))
    _put(attr, 44, 4, prog_flags)
    raw = name.encode()[: BPF_OBJ_NAME_LEN - 1]
    ctypes.memmove(ctypes.addressof(attr) + 48, raw, len(raw))
    try:
        return _bpf(BPF_PROG_LOAD, attr, f"loading program {name}")
    except BPFError as exc:
        text = log.value.decode(errors="replace").strip()
        tail = "\n".join(text.splitlines()[-20:])
        raise BPFError(exc.errno, f"{exc.strerror}\n{tail}" if tail else exc.strerror) from None


def prog_get_fd_by_id(prog_id: int) -> int:
    attr = _attr()
    _put(attr, 0, 4, prog_id)
    return _bpf(BPF_PROG_GET_FD_BY_ID, attr, f"opening program id {prog_id}")


@dataclass(frozen=True)
class ProgInfo:
    type: int
    id: int
    name: str
    tag: str


def _obj_info(fd: int, size: int, what: str) -> bytes:
    """BPF_OBJ_GET_INFO_BY_FD into a zeroed buffer of size bytes."""
    info = ctypes.create_string_buffer(size)
    attr = _attr()
    _put(attr, 0, 4, fd)
    _put(attr, 4, 4, size)
    _put(attr, 8, 8, _addr(info))
    _bpf(BPF_OBJ_GET_INFO_BY_FD, attr, f"reading {what} info")
    return info.raw


def prog_info(fd: int) -> ProgInfo:
    raw = _obj_info(fd, 256, "program")
    return ProgInfo(
        type=int.from_bytes(raw[0:4], "little"),
        id=int.from_bytes(raw[4:8], "little"),
        tag=raw[8:16].hex(),
        name=raw[64:80].split(b"\0", 1)[0].decode(errors="replace"),
    )


def prog_info_by_id(prog_id: int) -> ProgInfo | None:
    try:
        fd = prog_get_fd_by_id(prog_id)
    except BPFError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    try:
        return prog_info(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class TestRun:
    retval: int
    data: bytes
    duration_ns: int


def prog_test_run(
    prog_fd: int, data: bytes, *, repeat: int = 1, ctx: bytes | None = None
) -> TestRun:
    """BPF_PROG_TEST_RUN. Mutating programs must use repeat=1: repeats rerun the same buffer."""
    size_out = len(data) + 256 + 4096  # room for encapsulation and XDP headroom
    data_in = ctypes.create_string_buffer(data, len(data))
    data_out = ctypes.create_string_buffer(size_out)
    ctx_in = ctypes.create_string_buffer(ctx, len(ctx)) if ctx is not None else None
    attr = _attr()
    _put(attr, 0, 4, prog_fd)
    _put(attr, 8, 4, len(data))
    _put(attr, 12, 4, size_out)
    _put(attr, 16, 8, _addr(data_in))
    _put(attr, 24, 8, _addr(data_out))
    _put(attr, 32, 4, repeat)
    if ctx_in is not None and ctx is not None:
        _put(attr, 40, 4, len(ctx))
        _put(attr, 48, 8, _addr(ctx_in))
    while True:
        try:
            _bpf(BPF_PROG_TEST_RUN, attr, "running program test")
            break
        except BPFError as exc:
            if exc.errno != errno.EINTR:
                raise
    out_len = _get(attr, 12, 4)
    return TestRun(
        retval=_get(attr, 4, 4),
        data=data_out.raw[:out_len],
        duration_ns=_get(attr, 36, 4),
    )


# --------------------------------------------------------------------------------------------
# Pinned objects and maps


def map_create(
    map_type: int, key_size: int, value_size: int, max_entries: int, flags: int, name: str
) -> int:
    """BPF_MAP_CREATE; returns the map fd."""
    attr = _attr()
    _put(attr, 0, 4, map_type)
    _put(attr, 4, 4, key_size)
    _put(attr, 8, 4, value_size)
    _put(attr, 12, 4, max_entries)
    _put(attr, 16, 4, flags)
    raw = name.encode()[: BPF_OBJ_NAME_LEN - 1]
    ctypes.memmove(ctypes.addressof(attr) + 28, raw, len(raw))
    return _bpf(BPF_MAP_CREATE, attr, f"creating map {name}")


def obj_pin(fd: int, path: Path | str) -> None:
    name = ctypes.create_string_buffer(os.fsencode(str(path)))
    attr = _attr()
    _put(attr, 0, 8, _addr(name))
    _put(attr, 8, 4, fd)
    _bpf(BPF_OBJ_PIN, attr, f"pinning {path}")


def obj_get(path: Path | str) -> int:
    """Open a pinned map or program; FileNotFoundError when there is no pin."""
    name = ctypes.create_string_buffer(os.fsencode(str(path)))
    attr = _attr()
    _put(attr, 0, 8, _addr(name))
    try:
        return _bpf(BPF_OBJ_GET, attr, f"opening pin {path}")
    except BPFError as exc:
        if exc.errno == errno.ENOENT:
            raise FileNotFoundError(errno.ENOENT, "no such pin", str(path)) from None
        raise


@dataclass(frozen=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    name: str


def map_info(fd: int) -> MapInfo:
    raw = _obj_info(fd, 128, "map")

    def u32(offset: int) -> int:
        return int.from_bytes(raw[offset : offset + 4], "little")

    return MapInfo(
        type=u32(0),
        id=u32(4),
        key_size=u32(8),
        value_size=u32(12),
        max_entries=u32(16),
        flags=u32(20),
        name=raw[24:40].split(b"\0", 1)[0].decode(errors="replace"),
    )


def _elem_attr(
    fd: int, key: bytes | None, value: ctypes.Array[ctypes.c_char] | None, flags: int = 0
) -> tuple[ctypes.Array[ctypes.c_char], ctypes.Array[ctypes.c_char] | None]:
    attr = _attr()
    key_buf = ctypes.create_string_buffer(key, len(key)) if key is not None else None
    _put(attr, 0, 4, fd)
    _put(attr, 8, 8, _addr(key_buf))
    _put(attr, 16, 8, _addr(value))
    _put(attr, 24, 8, flags)
    return attr, key_buf


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    value = ctypes.create_string_buffer(value_size)
    attr, _keep = _elem_attr(fd, key, value)
    try:
        _bpf(BPF_MAP_LOOKUP_ELEM, attr, "map lookup")
    except BPFError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise
    return value.raw


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    buf = ctypes.create_string_buffer(value, len(value))
    attr, _keep = _elem_attr(fd, key, buf, flags)
    _bpf(BPF_MAP_UPDATE_ELEM, attr, "map update")


def map_delete(fd: int, key: bytes) -> bool:
    """False when the key was not there."""
    attr, _keep = _elem_attr(fd, key, None)
    try:
        _bpf(BPF_MAP_DELETE_ELEM, attr, "map delete")
    except BPFError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def map_keys(fd: int, key_size: int) -> Iterator[bytes]:
    """Every key, via GET_NEXT_KEY from no key (so an LPM trie starts at its first node)."""
    key: bytes | None = None
    while True:
        nxt = ctypes.create_string_buffer(key_size)
        attr, _keep = _elem_attr(fd, key, nxt)
        try:
            _bpf(BPF_MAP_GET_NEXT_KEY, attr, "map iteration")
        except BPFError as exc:
            if exc.errno == errno.ENOENT:
                return
            raise
        key = nxt.raw
        yield key


@cache
def possible_cpus() -> int:
    """Per-CPU maps hold one value per possible CPU: 0-N ranges from sysfs (fixed at boot)."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += (int(hi) if hi else int(lo)) - int(lo) + 1
    return count


def map_lookup_percpu(fd: int, key: bytes, value_size: int) -> list[bytes] | None:
    stride = (value_size + 7) & ~7
    cpus = possible_cpus()
    raw = map_lookup(fd, key, stride * cpus)
    if raw is None:
        return None
    return [raw[i * stride : i * stride + value_size] for i in range(cpus)]


def map_count(fd: int, key_size: int) -> int:
    return sum(1 for _ in map_keys(fd, key_size))


def is_bpffs(path: Path) -> bool:
    """Whether path is the root of a mounted bpf filesystem (statfs magic)."""

    class _Statfs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 112)]

    buf = _Statfs()
    if _libc.statfs(os.fsencode(str(path)), ctypes.byref(buf)) != 0:
        return False
    return bool((buf.f_type & 0xFFFFFFFF) == BPF_FS_MAGIC)
