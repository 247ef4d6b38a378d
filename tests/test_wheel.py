"""The installed package must run on a node without the source tree: the BPF C sources travel in
the wheel (the Vagrant lab's first boot found an agent falling back to kernel vxlan without them).
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_wheel(out: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(ROOT)],
        check=True, capture_output=True, cwd=out,
    )  # fmt: skip
    (wheel,) = out.glob("flannel_bpf-*.whl")
    return wheel


def test_the_wheel_carries_every_bpf_source_and_the_loader_finds_them(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    sources = {
        f"flannel_bpf/bpf/{p.relative_to(ROOT / 'bpf')}" for p in (ROOT / "bpf").rglob("*.[ch]")
    }
    names = set(zipfile.ZipFile(wheel).namelist())
    assert sources <= names, sorted(sources - names)

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = (
        "from flannel_bpf.datapath import loader; "
        "print(loader.BPF_SOURCE_DIR); print(len(loader.program_source()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, check=True, cwd=tmp_path,
    ).stdout.split()  # fmt: skip
    assert out[0] == str(site / "flannel_bpf" / "bpf")
    assert int(out[1]) > 1000
