"""flannel-bpf: a flannel-compatible overlay network agent with an eBPF data path."""

__version__ = "0.1.0"
