"""The etcd subnet manager: flanneld's keys under <prefix>/ in an etcd v3 store
(pkg/subnet/etcd)."""
