"""A Vagrant user's first commands in vagrant/, with nothing made beforehand (no .vagrant/): the
Vagrantfile makes the source tarball its file provisioner uploads, or says what is wrong."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from flannel_bpf.lab.vagrant import CACHE, VAGRANT_DIR

from ..conftest import requires_root

pytestmark = requires_root


def vagrant(cwd: Path, dotfile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "VAGRANT_DOTFILE_PATH": str(dotfile),
        "VAGRANT_HOME": str(CACHE / "home"),
        "VAGRANT_CHECKPOINT_DISABLE": "1",
        "VAGRANT_NO_COLOR": "1",
        "VAGRANT_DEFAULT_PROVIDER": "libvirt",
    }
    return subprocess.run(
        ["vagrant", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_validate_and_status_work_before_anything_was_made(tmp_path: Path) -> None:
    dotfile = tmp_path / "dotfile"
    for command in (["validate"], ["status"]):
        proc = vagrant(VAGRANT_DIR, dotfile, *command)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "must exist" not in proc.stdout + proc.stderr
    tarball = dotfile / "flannel-bpf-src.tar.gz"
    listing = subprocess.run(["tar", "-tzf", str(tarball)], capture_output=True, text=True)
    assert "vagrant/provision.sh" in listing.stdout.split()


def test_outside_a_git_checkout_it_says_what_to_do(tmp_path: Path) -> None:
    copy = tmp_path / "notgit" / "vagrant"
    copy.mkdir(parents=True)
    shutil.copy(VAGRANT_DIR / "Vagrantfile", copy / "Vagrantfile")
    proc = vagrant(copy, tmp_path / "dotfile", "validate")
    assert proc.returncode != 0
    assert "is not a git checkout" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
