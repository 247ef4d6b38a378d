"""The Kubernetes subnet manager (--kube-subnet-mgr): leases from Node podCIDRs, attributes in
flannel's Node annotations, peers from a Node list and watch (flanneld's pkg/subnet/kube)."""
