"""The command line: `flannel-bpf run` and its flanneld-compatible flags, and the commands that
inspect and manage an agent."""

from flannel_bpf.cli.main import main

__all__ = ["main"]
