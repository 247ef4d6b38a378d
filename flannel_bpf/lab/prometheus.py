"""A real Prometheus (Debian's package) in its own namespace on the lab underlay.

It scrapes every agent's /metrics over the underlay and loads dashboards/alerts.yml, so the
dashboard's queries and the alert rules can be run against what the agents really export. It is
reached only from inside its namespace (``query`` runs there), like everything else in the lab.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flannel_bpf.lab.netns import http_get, in_netns
from flannel_bpf.lab.proc import stop_process

PROMETHEUS_BINARY = "/usr/bin/prometheus"
PROMETHEUS_PORT = 9090
SCRAPE_INTERVAL = "1s"
ALERT_RULES = Path(__file__).resolve().parents[2] / "dashboards" / "alerts.yml"


class PrometheusError(RuntimeError):
    pass


@dataclass
class Prometheus:
    netns: str
    listen_ip: str
    targets: Sequence[str]  # host:port of each agent's metrics endpoint
    directory: Path
    rules: Path | None = ALERT_RULES
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.listen_ip}:{PROMETHEUS_PORT}"

    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": "flannel-bpf", "static_configs": [{"targets": list(self.targets)}]}
            ],
        }
        if self.rules is not None:
            config["rule_files"] = [str(self.directory / self.rules.name)]
        return config

    def start(self) -> None:
        if not Path(PROMETHEUS_BINARY).is_file():
            raise PrometheusError(f"{PROMETHEUS_BINARY} is missing: run make setup")
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.rules is not None:
            shutil.copy(self.rules, self.directory / self.rules.name)
        # JSON is YAML: no YAML writer needed.
        (self.directory / "prometheus.yml").write_text(json.dumps(self.config(), indent=2))
        cmd = [
            PROMETHEUS_BINARY,
            f"--config.file={self.directory / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.directory / 'data'}",
            f"--web.listen-address={self.listen_ip}:{PROMETHEUS_PORT}",
            "--storage.tsdb.retention.time=1d",
            "--log.level=warn",
        ]
        with open(self.directory / "prometheus.log", "ab") as log:
            self.process = subprocess.Popen(
                in_netns(self.netns, cmd),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise PrometheusError(f"prometheus exited:\n{self.log()[-2000:]}")
            try:
                if self.query(["vector(1)"])[0].get("status") == "success":
                    return
            except PrometheusError:
                pass
            time.sleep(0.3)
        raise PrometheusError(f"prometheus not ready after {timeout:.0f}s:\n{self.log()[-2000:]}")

    def query(self, exprs: Sequence[str]) -> list[dict[str, Any]]:
        """Instant queries through the HTTP API, one response document per expression."""
        results = []
        for expr in exprs:
            body = urllib.parse.urlencode({"query": expr}).encode()
            try:
                _, raw = http_get(self.netns, f"{self.url}/api/v1/query", data=body)
            except OSError as exc:
                raise PrometheusError(f"query {expr!r}: {exc}") from None
            results.append(json.loads(raw))
        return results

    def log(self) -> str:
        path = self.directory / "prometheus.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        stop_process(self.process)
