"""The session-wide leftover check (conftest.py) sees what a leaking test would leave."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flannel_bpf.lab.netns import add_netns, delete_netns

from . import leftovers
from .conftest import requires_root, unique
from .leftovers import snapshot

pytestmark = [pytest.mark.root, requires_root]


def test_the_leftover_check_sees_a_namespace_and_a_process() -> None:
    before = snapshot()
    name = unique("leak")
    add_netns(name)
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time, flannel_bpf; time.sleep(60)"],
        start_new_session=True,
    )
    try:
        found = snapshot().minus(before)
        assert found["namespaces"] == [name]
        assert any(line.startswith(f"{proc.pid} ") for line in found["processes"])
    finally:
        proc.kill()
        proc.wait()
        delete_netns(name)
    assert snapshot().minus(before) == {}


def test_the_leftover_check_sees_an_agent_file_at_its_default_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stand-in for /run/flannel-bpf/status.json, so the machine's own file is never touched.
    status = tmp_path / "status.json"
    monkeypatch.setattr(leftovers, "AGENT_DEFAULT_FILES", (status,))
    before = leftovers.snapshot()
    status.write_text("{}")
    assert (
        leftovers.snapshot()
        .minus(before)["agent files at default paths"][0]
        .startswith(str(status))
    )
