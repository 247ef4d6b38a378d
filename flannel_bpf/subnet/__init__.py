"""Subnets and leases: the network config, lease keys and JSON, the subnet manager interface and
its stores (etcd; Kubernetes to come), the watcher that turns lease events into peer changes for a
backend, and subnet.env. flanneld's pkg/subnet and pkg/lease."""
