"""flannel's Node annotations: the prefix rule and the keys (flanneld's
pkg/subnet/kube/annotations.go).

A node publishes its lease attributes as annotations under a prefix, by default
flannel.alpha.coreos.com/, e.g. flannel.alpha.coreos.com/backend-data. Values are strings,
byte-identical to flanneld's for the same inputs (kube.py builds them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_PREFIX = "flannel.alpha.coreos.com"
# flanneld checks with Go's regexp.MatchString: a search, not anchored at the start (so junk in
# front of a valid name passes there too); Go's $ is Python's \Z.
_PREFIX_RE = re.compile(r"(?:[a-z0-9_-]+\.)+[a-z0-9_-]+/(?:[a-z0-9_-]+-)?\Z")
TOO_MANY_SLASHES = "subnet/kube: prefix can contain at most single slash"
BAD_FORMAT = "subnet/kube: prefix must be in a format: fqdn/[0-9a-z-_]*"


class AnnotationPrefixError(ValueError):
    pass


def normalize_prefix(prefix: str) -> str:
    """flanneld's rule: one slash at most (appended when missing), then '-' unless the prefix
    ends in '/' or '-': x.com -> x.com/, x.com/pfx -> x.com/pfx-."""
    slashes = prefix.count("/")
    if slashes > 1:
        raise AnnotationPrefixError(TOO_MANY_SLASHES)
    if slashes == 0:
        prefix += "/"
    if not prefix.endswith(("/", "-")):
        prefix += "-"
    if _PREFIX_RE.search(prefix) is None:
        raise AnnotationPrefixError(BAD_FORMAT)
    return prefix


@dataclass(frozen=True)
class Annotations:
    """The annotation keys under one (normalized) prefix."""

    prefix: str

    @classmethod
    def from_flag(cls, value: str) -> Annotations:
        return cls(normalize_prefix(value))

    def _key(self, name: str) -> str:
        return self.prefix + name

    @property
    def subnet_kube_managed(self) -> str:
        return self._key("kube-subnet-manager")

    @property
    def backend_data(self) -> str:
        return self._key("backend-data")

    @property
    def backend_v6_data(self) -> str:
        return self._key("backend-v6-data")

    @property
    def backend_type(self) -> str:
        return self._key("backend-type")

    @property
    def public_ip(self) -> str:
        return self._key("public-ip")

    @property
    def public_ipv6(self) -> str:
        return self._key("public-ipv6")

    @property
    def public_ip_overwrite(self) -> str:
        return self._key("public-ip-overwrite")

    @property
    def public_ipv6_overwrite(self) -> str:
        return self._key("public-ipv6-overwrite")

    @property
    def node_public_ip(self) -> str:
        return self._key("node-public-ip")

    @property
    def node_public_ipv6(self) -> str:
        return self._key("node-public-ipv6")
