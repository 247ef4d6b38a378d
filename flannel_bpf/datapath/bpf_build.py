"""Compiling bpf/ with bcc, in a child process, once per source and kernel.

bcc's compiler (LLVM and clang, ~85 MB resident, plus what a compile leaves on the heap) must not
live in the long-running agent: measured at 194 MB RSS with it, against 63 MB without. So the
agent runs ``python -m flannel_bpf.datapath.bpf_build OUT`` once, which compiles every entry
program and writes their bytecode with the map each map reference points at; the result is cached
under /run/flannel-bpf/cache, keyed by the program source and the kernel release, so a restart
loads without compiling at all. The agent then creates or opens its own pinned maps and patches
their fds into the bytecode before loading it through bpf(2) (flannel_bpf/datapath/loader.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from flannel_bpf.datapath.bpf_maps import ALL_MAPS

CACHE_DIR: Final = Path(os.environ.get("FLANNEL_BPF_CACHE_DIR", "/run/flannel-bpf/cache"))
FORMAT: Final = 1
# ld_imm64 (BPF_LD | BPF_IMM | BPF_DW) with src_reg BPF_PSEUDO_MAP_FD: imm holds a map fd.
LD_IMM64: Final = 0x18
PSEUDO_MAP_FD: Final = 1


class BuildError(Exception):
    """The programs could not be compiled; the message says why."""


@dataclass(frozen=True)
class Objects:
    """Compiled programs: bytecode by function name, map fds in it by the map they stand for."""

    programs: dict[str, bytes]
    map_refs: dict[int, str]

    def bytecode(self, name: str, map_fds: dict[str, int]) -> bytes:
        """The program with every map reference pointing at the caller's fd for that map."""
        code = bytearray(self.programs[name])
        for offset in range(0, len(code) - 15, 8):
            if code[offset] != LD_IMM64 or code[offset + 1] >> 4 != PSEUDO_MAP_FD:
                continue
            ref = int.from_bytes(code[offset + 4 : offset + 8], "little")
            if ref not in self.map_refs:
                raise BuildError(f"{name}: instruction {offset // 8} uses an unknown map ({ref})")
            code[offset + 4 : offset + 8] = map_fds[self.map_refs[ref]].to_bytes(4, "little")
        return bytes(code)

    def dump(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "programs": {k: v.hex() for k, v in self.programs.items()},
                "map_refs": {str(k): v for k, v in self.map_refs.items()},
            }
        )

    @classmethod
    def parse(cls, text: str) -> Objects:
        raw = json.loads(text)
        if raw.get("format") != FORMAT:
            raise ValueError("another cache format")
        return cls(
            {k: bytes.fromhex(v) for k, v in raw["programs"].items()},
            {int(k): str(v) for k, v in raw["map_refs"].items()},
        )


def cache_key(source: str) -> str:
    digest = hashlib.sha256(source.encode())
    digest.update(os.uname().release.encode())
    digest.update(str(FORMAT).encode())
    return digest.hexdigest()[:24]


def objects(source: str, program_names: tuple[str, ...], cache_dir: Path = CACHE_DIR) -> Objects:
    """The compiled programs for this source: from the cache, else compiled in a child."""
    path = cache_dir / f"objects-{cache_key(source)}.json"
    try:
        cached = Objects.parse(path.read_text())
        if set(program_names) <= cached.programs.keys():
            return cached
    except (OSError, ValueError, KeyError):
        pass
    built = _compile_in_child(program_names)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(built.dump())
        tmp.replace(path)  # atomic: agents starting together never read half a file
    except OSError:
        pass  # no cache: the next start compiles again
    return built


def _compile_in_child(program_names: tuple[str, ...]) -> Objects:
    with tempfile.TemporaryDirectory(prefix="flannel-bpf-build-") as tmp:
        out = Path(tmp) / "objects.json"
        proc = subprocess.run(
            [sys.executable, "-m", "flannel_bpf.datapath.bpf_build", str(out), *program_names],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if proc.returncode != 0:
            raise BuildError(proc.stderr.strip() or f"compiler exited with {proc.returncode}")
        return Objects.parse(out.read_text())


def compile_here(program_names: tuple[str, ...]) -> Objects:
    """Compile with bcc in this process (the child). bcc creates the maps the source pins; they
    go to a scratch directory on bpffs and are dropped again: only the bytecode is kept."""
    from flannel_bpf.datapath import loader

    problem = loader.kernel_headers_problem()
    if problem:
        raise BuildError(problem)
    try:
        from bcc import BPF  # the system's python3-bpfcc
    except ImportError as exc:
        raise BuildError(
            f"bcc is not importable ({exc}); install python3-bpfcc and use a venv "
            f"with --system-site-packages"
        ) from None
    loader.ensure_bpffs()
    scratch = loader.DEFAULT_BPFFS / f"build-{uuid.uuid4().hex[:12]}"
    scratch.mkdir(parents=True)
    module: Any = None
    try:
        cflags = [f'-DFB_PIN_DIR="{scratch}"', "-Wno-unused-function"]
        try:
            module = BPF(text=loader.program_source().encode(), cflags=cflags)
        except Exception as exc:  # bcc raises bare Exception for compile errors
            raise BuildError(f"compiling bpf/ failed: {exc}") from None
        programs = {name: bytes(module.dump_func(name.encode())) for name in program_names}
        map_refs = {int(module.get_table(spec.name).map_fd): spec.name for spec in ALL_MAPS}
        return Objects(programs, map_refs)
    finally:
        if module is not None:
            module.cleanup()
        for pin in scratch.iterdir():
            pin.unlink()
        scratch.rmdir()


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m flannel_bpf.datapath.bpf_build OUT PROGRAM...", file=sys.stderr)
        return 2
    try:
        built = compile_here(tuple(argv[1:]))
    except (BuildError, OSError) as exc:
        print(str(exc), file=sys.stderr)
        return 1
    Path(argv[0]).write_text(built.dump())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
