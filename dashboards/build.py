"""Writes dashboards/flannel-bpf.json, the Grafana dashboard (python dashboards/build.py).

The dashboard is generated so that every panel follows one layout and one query style; the test
suite checks the committed JSON matches this file and runs every query against a real
Prometheus scraping a lab (tests/test_observability.py). Metric names: docs/metrics.md.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUTPUT = Path(__file__).with_name("flannel-bpf.json")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
N = 'instance=~"$node"'  # every query is scoped to the chosen nodes
RATE = "$__rate_interval"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""
    instant: bool = False


@dataclass(frozen=True)
class Panel:
    title: str
    kind: str  # timeseries, stat, table
    queries: tuple[Query, ...]
    unit: str = "short"
    description: str = ""
    width: int = 8
    thresholds: tuple[tuple[float | None, str], ...] = ((None, "green"),)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


def q(expr: str, legend: str = "", instant: bool = False) -> Query:
    return Query(expr, legend, instant)


ROWS = (
    Row(
        "Health",
        (
            Panel(
                "Ready agents",
                "stat",
                (
                    q(f"sum(flannel_ready{{{N}}})", "ready"),
                    q(f"count(flannel_ready{{{N}}})", "all"),
                ),
                description="Agents whose subnet.env is written (what /readyz answers), of all.",
                width=4,
            ),
            Panel(
                "Agents down",
                "stat",
                (q(f'count(up{{job="flannel-bpf",{N}}} == 0) or vector(0)'),),
                description="Agents Prometheus cannot scrape.",
                width=4,
                thresholds=((None, "green"), (1, "red")),
            ),
            Panel(
                "etcd reachable",
                "stat",
                (q(f"min(flannel_etcd_up{{{N}}})"),),
                description="0 when any agent's last etcd request failed.",
                width=4,
                thresholds=((None, "red"), (1, "green")),
            ),
            Panel(
                "Data path fallbacks",
                "stat",
                (q(f"sum(flannel_datapath_fallback{{{N}}})"),),
                description="Agents not on their backend's first data path (BPF).",
                width=4,
                thresholds=((None, "green"), (1, "orange")),
            ),
            Panel(
                "Soonest lease expiry",
                "stat",
                (q(f"min(flannel_lease_expiry_timestamp_seconds{{{N}}}) - time()"),),
                unit="s",
                description="Leases are renewed an hour before expiry; less means renewals fail.",
                width=4,
                thresholds=((None, "red"), (3000, "orange"), (3600, "green")),
            ),
            Panel(
                "BPF programs detached",
                "stat",
                (q(f"count(flannel_bpf_program_attached{{{N}}} == 0) or vector(0)"),),
                width=4,
                thresholds=((None, "green"), (1, "red")),
            ),
            Panel(
                "Agents",
                "table",
                (
                    q(f"flannel_datapath_info{{{N}}}", instant=True),
                    q(f"flannel_build_info{{{N}}}", instant=True),
                ),
                description="Backend, data path, decapsulation hook and why a fallback happened; "
                "versions.",
                width=24,
                options={"transformations": [{"id": "merge", "options": {}}]},
            ),
        ),
    ),
    Row(
        "Leases and peers",
        (
            Panel(
                "Peers known and programmed",
                "timeseries",
                (
                    q(f"flannel_peers{{{N}}}", "{{instance}} known"),
                    q(f"flannel_peers_programmed{{{N}}}", "{{instance}} programmed"),
                ),
                description="Programmed below known means traffic to some subnets has no path.",
            ),
            Panel(
                "Lease events",
                "timeseries",
                (
                    q(
                        f"sum by (type) (rate(flannel_lease_events_total{{{N}}}[{RATE}])) * 60",
                        "{{type}}",
                    ),
                ),
                unit="short",
                description="Peer leases added and removed per minute, all selected agents.",
            ),
            Panel(
                "Lease event to data path programmed (p50, p99)",
                "timeseries",
                (
                    q(
                        "histogram_quantile(0.99, sum by (le) (rate("
                        f"flannel_peer_programming_duration_seconds_bucket{{{N}}}[5m])))",
                        "p99",
                    ),
                    q(
                        "histogram_quantile(0.5, sum by (le) (rate("
                        f"flannel_peer_programming_duration_seconds_bucket{{{N}}}[5m])))",
                        "p50",
                    ),
                ),
                unit="s",
            ),
            Panel(
                "Lease time left",
                "timeseries",
                (q(f"flannel_lease_expiry_timestamp_seconds{{{N}}} - time()", "{{instance}}"),),
                unit="s",
            ),
            Panel(
                "Renewals (1h)",
                "timeseries",
                (
                    q(
                        f"sum by (outcome) (increase(flannel_lease_renewals_total{{{N}}}[1h]))",
                        "{{outcome}}",
                    ),
                ),
            ),
            Panel(
                "Invalid lease entries seen (1h)",
                "timeseries",
                (
                    q(
                        f"sum by (instance) (increase(flannel_lease_invalid_entries_total{{{N}}}"
                        "[1h]))",
                        "{{instance}}",
                    ),
                ),
                description="Keys or values under the subnets prefix no agent can use.",
            ),
        ),
    ),
    Row(
        "Data path traffic",
        (
            Panel(
                "BPF encapsulated and decapsulated",
                "timeseries",
                (
                    q(
                        "sum by (instance, hook) (rate(flannel_datapath_bytes_total{"
                        f'outcome="handled",{N}}}[{RATE}])) * 8',
                        "{{instance}} {{hook}}",
                    ),
                ),
                unit="bps",
                width=12,
            ),
            Panel(
                "BPF packets",
                "timeseries",
                (
                    q(
                        "sum by (instance, hook) (rate(flannel_datapath_packets_total{"
                        f'outcome="handled",{N}}}[{RATE}]))',
                        "{{instance}} {{hook}}",
                    ),
                ),
                unit="pps",
                width=12,
            ),
            Panel(
                "Left to the kernel, by reason",
                "timeseries",
                (
                    q(
                        "sum by (hook, reason) (rate(flannel_datapath_packets_total{"
                        f'outcome="passed",{N}}}[{RATE}]))',
                        "{{hook}} {{reason}}",
                    ),
                ),
                unit="pps",
                description="Packets the programs leave alone (not overlay traffic, or the "
                "kernel's job: no neighbour yet, fragments, GSO the program cannot split).",
                width=12,
            ),
            Panel(
                "Userspace plane",
                "timeseries",
                (
                    q(
                        "sum by (instance, direction) (rate(flannel_userspace_bytes_total"
                        f"{{{N}}}[{RATE}])) * 8",
                        "{{instance}} {{direction}}",
                    ),
                ),
                unit="bps",
                description="udp backend, or the userspace VXLAN fallback.",
                width=12,
            ),
        ),
    ),
    Row(
        "Host routing (--host-routing=bpf)",
        (
            Panel(
                "Pod traffic by way",
                "timeseries",
                (
                    q(
                        "sum by (hook, reason) (rate(flannel_datapath_bytes_total{"
                        'reason=~"encap_from_pod|decap_to_pod|encap_redirect|decap_redirect'
                        f'|decap_pass",{N}}}[{RATE}])) * 8',
                        "{{hook}} {{reason}}",
                    ),
                ),
                unit="bps",
                description="encap_from_pod and decap_to_pod: the short way (pod veth <-> "
                "uplink in BPF); the rest went through the host stack (routing, netfilter, the "
                "bridge).",
            ),
            Panel(
                "Why the long way",
                "timeseries",
                (
                    q(
                        "sum by (hook, reason) (rate(flannel_datapath_packets_total{"
                        'hook=~"pod_egress|tc_decap",reason=~"pass_not_validated|'
                        "pass_revalidate|pass_tcp_control|pass_no_endpoint|pass_no_ports|"
                        f'pass_no_remote|pass_too_big|pass_short",{N}}}[{RATE}]))',
                        "{{hook}} {{reason}}",
                    ),
                ),
                unit="pps",
                description="Packets host routing left to the host stack, by reason: flows "
                "not validated (NAT, new), lapsed validations (one packet per flow a second), "
                "SYN/FIN/RST, destinations outside the overlay.",
            ),
            Panel(
                "Flows and pods known",
                "timeseries",
                (
                    q(
                        f'flannel_bpf_map_entries{{map=~"fb_flows|fb_endpoints",{N}}}',
                        "{{instance}} {{map}}",
                    ),
                ),
                description="Validated flows (both directions) and local pods in the maps.",
            ),
        ),
    ),
    Row(
        "Drops",
        (
            Panel(
                "BPF drops by reason",
                "timeseries",
                (
                    q(
                        "sum by (hook, reason) (rate(flannel_datapath_packets_total{"
                        f'outcome="dropped",{N}}}[{RATE}]))',
                        "{{hook}} {{reason}}",
                    ),
                ),
                unit="pps",
            ),
            Panel(
                "BPF drop ratio",
                "timeseries",
                (
                    q(
                        "sum by (instance) (rate(flannel_datapath_packets_total{"
                        f'outcome="dropped",{N}}}[5m])) / clamp_min(sum by (instance) ('
                        f"rate(flannel_datapath_packets_total{{{N}}}[5m])), 1)",
                        "{{instance}}",
                    ),
                ),
                unit="percentunit",
            ),
            Panel(
                "Userspace drops and errors",
                "timeseries",
                (
                    q(
                        "sum by (reason) (rate(flannel_userspace_dropped_packets_total"
                        f"{{{N}}}[{RATE}]))",
                        "{{reason}}",
                    ),
                    q(
                        f"sum by (direction) (rate(flannel_userspace_errors_total{{{N}}}[{RATE}]))",
                        "errors {{direction}}",
                    ),
                ),
                unit="pps",
            ),
        ),
    ),
    Row(
        "etcd",
        (
            Panel(
                "Requests",
                "timeseries",
                (
                    q(
                        f"sum by (operation) (rate(flannel_etcd_requests_total{{{N}}}[5m]))",
                        "{{operation}}",
                    ),
                ),
                unit="reqps",
            ),
            Panel(
                "Failed requests",
                "timeseries",
                (
                    q(
                        "sum by (operation, outcome) (rate(flannel_etcd_requests_total{"
                        f'outcome!="success",{N}}}[5m]))',
                        "{{operation}} {{outcome}}",
                    ),
                ),
                unit="reqps",
            ),
            Panel(
                "Request latency p99",
                "timeseries",
                (
                    q(
                        "histogram_quantile(0.99, sum by (le, operation) (rate("
                        f"flannel_etcd_request_duration_seconds_bucket{{{N}}}[5m])))",
                        "{{operation}}",
                    ),
                ),
                unit="s",
            ),
            Panel(
                "Watch restarts (1h)",
                "timeseries",
                (
                    q(
                        f"sum by (reason) (increase(flannel_etcd_watch_restarts_total{{{N}}}[1h]))",
                        "{{reason}}",
                    ),
                ),
            ),
            Panel(
                "Watch revision spread",
                "timeseries",
                (
                    q(
                        f"max(flannel_etcd_watch_revision{{{N}}}) - "
                        f"min(flannel_etcd_watch_revision{{{N}}})",
                        "newest - oldest",
                    ),
                ),
                description="A node whose revision stops moving while others advance is stuck.",
            ),
            Panel(
                "etcd reachable per agent",
                "timeseries",
                (q(f"flannel_etcd_up{{{N}}}", "{{instance}}"),),
            ),
        ),
    ),
    Row(
        "BPF maps and programs",
        (
            Panel(
                "Map pressure",
                "timeseries",
                (
                    q(
                        f"flannel_bpf_map_entries{{{N}}} / flannel_bpf_map_max_entries{{{N}}}",
                        "{{instance}} {{map}}",
                    ),
                ),
                unit="percentunit",
                thresholds=((None, "green"), (0.8, "orange"), (1.0, "red")),
            ),
            Panel(
                "Programs attached",
                "table",
                (q(f"flannel_bpf_program_attached{{{N}}}", instant=True),),
            ),
            Panel(
                "Map read time and failures",
                "timeseries",
                (
                    q(f"flannel_collector_duration_seconds{{{N}}}", "{{instance}} read"),
                    q(
                        f"increase(flannel_collector_errors_total{{{N}}}[1h])",
                        "{{instance}} failures (1h)",
                    ),
                ),
                unit="s",
            ),
        ),
    ),
    Row(
        "Agent resources",
        (
            Panel(
                "CPU",
                "timeseries",
                (
                    q(
                        f'rate(process_cpu_seconds_total{{job="flannel-bpf",{N}}}[{RATE}])',
                        "{{instance}}",
                    ),
                ),
                unit="percentunit",
                width=6,
            ),
            Panel(
                "Resident memory",
                "timeseries",
                (
                    q(
                        f'process_resident_memory_bytes{{job="flannel-bpf",{N}}}',
                        "{{instance}}",
                    ),
                ),
                unit="bytes",
                width=6,
            ),
            Panel(
                "Open file descriptors",
                "timeseries",
                (q(f'process_open_fds{{job="flannel-bpf",{N}}}', "{{instance}}"),),
                width=6,
            ),
            Panel(
                "Restarts (1h)",
                "timeseries",
                (
                    q(
                        f'changes(process_start_time_seconds{{job="flannel-bpf",{N}}}[1h])',
                        "{{instance}}",
                    ),
                    q(
                        f"sum by (outcome) (increase(flannel_subnet_file_writes_total{{{N}}}[1h]))",
                        "subnet.env writes {{outcome}}",
                    ),
                ),
                width=6,
            ),
        ),
    ),
)


def panel_json(panel: Panel, panel_id: int, x: int, y: int, height: int) -> dict[str, Any]:
    steps = [{"color": color, "value": value} for value, color in panel.thresholds]
    out: dict[str, Any] = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {
            "defaults": {
                "unit": panel.unit,
                "thresholds": {"mode": "absolute", "steps": steps},
            },
            "overrides": [],
        },
        "targets": [
            {
                "datasource": DATASOURCE,
                "refId": chr(ord("A") + i),
                "expr": query.expr,
                "legendFormat": query.legend or "__auto",
                "instant": query.instant or panel.kind == "stat",
                "range": not (query.instant or panel.kind == "stat"),
                **({"format": "table"} if panel.kind == "table" else {}),
            }
            for i, query in enumerate(panel.queries)
        ],
    }
    if panel.kind == "stat":
        out["options"] = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background",
            "graphMode": "none",
            "textMode": "value_and_name" if len(panel.queries) > 1 else "value",
        }
    elif panel.kind == "timeseries":
        out["options"] = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    if "transformations" in panel.options:
        out["transformations"] = panel.options["transformations"]
    return out


def dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    next_id, y = 1, 0
    for row in ROWS:
        panels.append(
            {
                "id": next_id,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        next_id += 1
        y += 1
        x = 0
        for panel in row.panels:
            height = 4 if panel.kind == "stat" else 8
            if x + panel.width > 24:
                x, y = 0, y + height
            panels.append(panel_json(panel, next_id, x, y, height))
            next_id += 1
            x += panel.width
        y += 8
    return {
        "title": "flannel-bpf",
        "uid": "flannel-bpf",
        "description": "flannel-bpf agents: health, leases and peers, BPF data path traffic and "
        "drops, etcd, BPF maps, agent resources. Metrics: docs/metrics.md.",
        "tags": ["flannel", "bpf", "network"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                    "regex": "",
                },
                {
                    "name": "node",
                    "label": "Node",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "definition": "label_values(flannel_build_info, instance)",
                    "query": {
                        "query": "label_values(flannel_build_info, instance)",
                        "refId": "PrometheusVariableQueryEditor-VariableQuery",
                    },
                    "current": {},
                    "includeAll": True,
                    "allValue": ".*",
                    "multi": True,
                    "refresh": 2,
                    "sort": 1,
                    "hide": 0,
                },
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        if OUTPUT.read_text() != render():
            sys.exit(f"{OUTPUT} is stale: run python dashboards/build.py")
    else:
        OUTPUT.write_text(render())
        print(f"wrote {OUTPUT}")
