"""The host side of the data path: the BPF programs' build, load, maps and bpf(2) calls, batched
rtnetlink, the VXLAN wire facts, masquerade and forward rules, and the external interface."""
