"""The namespace lab: etcd, hosts and pods as network namespaces on one machine."""
