"""Test and lab PKI: a CA, an etcd server certificate and a client certificate, via openssl."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

from flannel_bpf.lab.etcd import EtcdTls

# A fresh P-256 key, unencrypted: throwaway test material.
NEW_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_pki(
    directory: Path, server_ips: Sequence[str], server_names: Sequence[str] = ()
) -> EtcdTls:
    """ca.pem, server.pem/server-key.pem and client.pem/client-key.pem in directory."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca = directory / "ca-key.pem", directory / "ca.pem"
    _openssl(
        "req",
        "-x509",
        *NEW_EC_KEY,
        "-keyout",
        str(ca_key),
        "-out",
        str(ca),
        "-days",
        "2",
        "-subj",
        "/CN=flannel-bpf test CA",
    )
    sans = ",".join([*(f"IP:{ip}" for ip in server_ips), *(f"DNS:{n}" for n in server_names)])
    for name, ext in (
        ("server", f"subjectAltName={sans}\nextendedKeyUsage=serverAuth,clientAuth"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        key, csr, cert = (
            directory / f"{name}-key.pem",
            directory / f"{name}.csr",
            directory / f"{name}.pem",
        )
        ext_file = directory / f"{name}.ext"
        ext_file.write_text(ext + "\n")
        _openssl(
            "req",
            *NEW_EC_KEY,
            "-keyout",
            str(key),
            "-out",
            str(csr),
            "-subj",
            f"/CN=flannel-bpf {name}",
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(ca),
            "-CAkey",
            str(ca_key),
            "-CAcreateserial",
            "-out",
            str(cert),
            "-days",
            "2",
            "-extfile",
            str(ext_file),
        )
    return EtcdTls(ca=ca, cert=directory / "server.pem", key=directory / "server-key.pem")
