"""The command line: `flannel-bpf run` and its flanneld-compatible flags (flags.py), and the
commands that inspect and manage an agent (main.py)."""
