"""Turn bench/results/*.json into docs/benchmarks.md and its chart, docs/benchmarks.png.

Every section's results are written as they were measured; each target is reported as met or
missed with its number. ``python -m bench.report`` after the benchmark scripts (``flannel-bpf
bench`` runs them all, then this).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
# Hand-written: what the numbers mean, and why a missed target is missed (kept with the code).
ANALYSIS = Path(__file__).resolve().parent / "analysis.md"
DOCS = Path(__file__).resolve().parent.parent / "docs"
SECTIONS = ("datapath", "datapath_v6only", "profile", "prog_cost", "control_plane")


def load(results: Path = RESULTS) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for name in SECTIONS:
        path = results / f"{name}.json"
        if path.is_file():
            found[name] = json.loads(path.read_text())
    return found


def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def targets_table(sections: dict[str, dict[str, Any]]) -> list[str]:
    rows = []
    for name in SECTIONS:
        for t in sections.get(name, {}).get("targets", []):
            verdict = "**met**" if t["met"] else "**missed**"
            value = f"{_num(t['value'])} {t['unit']}"
            rows.append([t["name"], value, t["limit"], verdict, t.get("note", "")])
    return _table(["target", "measured", "target", "verdict", "note"], rows)


def datapath_section(
    data: dict[str, Any], title: str = "Data path: pod to pod across two nodes"
) -> list[str]:
    """A data-path run's table; the note on XDP rows only when the run has one."""
    out = [
        f"## {title}",
        "",
        f"Medians of {data['rounds']} interleaved rounds of {data['seconds']} s runs, all "
        "configurations of one MTU built at once (one namespace lab each) and measured in shuffled "
        "order in the same run. Throughput: iperf3 TCP, one and four streams. 64 B rates, packets "
        "the receiving pod got per second: *socket*, iperf3 UDP with 64-byte payloads at full "
        "speed (the sending socket is the limit); *trafgen*, the same packets from trafgen's "
        "packet ring in the sending pod, one CPU, no socket or qdisc (the data path is the "
        "limit, so per-packet cost shows; the target uses this one). Latency: "
        "qperf tcp_lat / udp_lat (one way, half the round trip). CPU: busy CPU seconds of the "
        "whole machine per Gbit moved in the one-stream run. Frames per GiB: frames on the "
        "receiving node's uplink per GiB delivered (big GSO frames mean few). *x flanneld*: "
        "against the real flanneld (v0.28.9, built from its Go module) of the same backend, "
        "measured in the same rounds; for latency and CPU the gain is flanneld's figure over "
        "ours (above 1: ours is better).",
        "",
    ]
    header = [
        "configuration", "MTU", "decap", "1 stream Gbit/s", "4 streams Gbit/s",
        "x flanneld", "x kernel vxlan", "x host-gw", "64 B socket kpps", "64 B trafgen kpps",
        "trafgen x flanneld", "tcp_lat us", "tcp_lat gain x flanneld",
        "udp_lat us", "CPU s/Gbit", "CPU gain x flanneld", "frames/GiB", "note",
    ]  # fmt: skip
    rows = []
    for r in data["rows"]:
        if r["error"] and not r["samples"]:
            rows.append([r["label"], str(r["mtu"]), "", "error: " + r["error"]] + [""] * 14)
            continue
        rows.append([
            r["label"], str(r["mtu"]), r["decap"] or "-", _num(r["tcp1_gbps"]),
            _num(r["tcp4_gbps"]), _num(r.get("tcp1_gbps_vs_flanneld", 0.0)),
            _num(r["tcp1_gbps_vs_vxlan-kernel"]),
            _num(r["tcp1_gbps_vs_host-gw"]), _num(r["udp64_pps"] / 1e3, 0),
            _num(r.get("gen64_pps", 0.0) / 1e3, 0), _num(r.get("gen64_pps_vs_flanneld", 0.0)),
            _num(r["tcp_lat_us"], 1), _num(r.get("tcp_lat_us_gain_vs_flanneld", 0.0)),
            _num(r["udp_lat_us"], 1), _num(r["cpu_s_per_gbit"], 3),
            _num(r.get("cpu_s_per_gbit_gain_vs_flanneld", 0.0)),
            f"{r['frames_per_gib'] / 1e3:.0f}k", r["note"],
        ])  # fmt: skip
    out += _table(header, rows)
    if not any(r.get("decap") == "xdp" for r in data["rows"]):
        return [*out, ""]
    out += [
        "",
        "Native XDP on a veth forces TSO off on its peer (the sender's side of the underlay), so "
        "every sender segments in software and the XDP row moves ~35x more frames per GiB: that "
        "is the testbed, not the program. The row *kernel vxlan, peer TSO off* applies the same "
        "handicap to a path without XDP, for a like-for-like comparison. On veths `--bpf-decap "
        "auto` therefore picks tc ingress (the *decap auto* row); on NICs it picks native XDP.",
        "",
    ]
    return out


def _profile_rows(
    paths: list[dict[str, Any]], head: tuple[str, str, int], field: str, total: str, digits: int
) -> list[list[str]]:
    """One row per part of the path, largest first, under a head row (label, field, digits)."""
    names: list[str] = []
    for p in paths:
        names += [n for n in p[field] if n != "idle" and n not in names]
    ordered = sorted(names, key=lambda n: -max(p[field].get(n, 0.0) for p in paths))
    rows = [[head[0], *(_num(p[head[1]], head[2]) for p in paths)]]
    rows += [[n, *(_num(p[field].get(n, 0.0), digits) for p in paths)] for n in ordered]
    rows.append(["**busy CPU in all**", *(f"**{_num(p[total], digits)}**" for p in paths)])
    return rows


def profile_section(data: dict[str, Any]) -> list[str]:
    """Where the cycles go per data path (bench/profile.py): one TCP stream per GiB, 64-byte
    packets per packet."""
    out: list[str] = []
    paths = data.get("paths", [])
    if paths:
        rows = _profile_rows(paths, ("one stream, Gbit/s", "gbps", 2), "cpu_ms_per_gib",
                             "busy_cpu_ms_per_gib", 1)  # fmt: skip
        out += [
            "## Where the cycles go: one TCP stream, MTU 1500",
            "",
            f"`python -m bench.profile`: perf samples of the whole machine "
            f"({data['frequency_hz']} Hz per CPU, {data['seconds']} s) while one iperf3 stream "
            "runs pod to pod, each kernel function put in one part of the path, in CPU "
            "milliseconds per GiB carried (both nodes share the kernel, so sender and receiver "
            f"are added up). Run on {data['when']}, kernel {data['kernel']}.",
            "",
            *_table(["part of the path", *(p["key"] for p in paths)], rows),
            "",
        ]
    small = data.get("udp64_paths", [])
    if small:
        rows = _profile_rows(small, ("64 B packets, kpps", "kpps", 0), "cpu_ns_per_packet",
                             "busy_cpu_ns_per_packet", 0)  # fmt: skip
        out += [
            "## Where the cycles go: 64-byte packets, MTU 1500",
            "",
            "The same perf sampling in the same run while trafgen, in the sending pod, sends "
            "64-byte UDP payloads on one CPU (bench.datapath's packet rate), in CPU nanoseconds "
            "per packet the receiving pod got. trafgen itself is the userspace row; the "
            "receiving pod's own stack (UDP, no socket on the port) is in every column.",
            "",
            *_table(["part of the path", *(p["key"] for p in small)], rows),
            "",
        ]
    return out


def prog_cost_section(data: dict[str, Any]) -> list[str]:
    out = [
        "## Per-packet program cost (BPF_PROG_TEST_RUN)",
        "",
        f"Median, p10 and p90 of {data['runs']} runs with repeat=1 each (a repeat reruns an "
        "already rewritten packet). The kernel's duration includes the test-run harness itself: "
        "the do-nothing baseline rows show that floor.",
        "",
    ]
    rows = [
        [r["program"], r["case"], _num(r["median_ns"], 0), _num(r["p10_ns"], 0),
         _num(r["p90_ns"], 0), str(r["verdict"])]
        for r in data["rows"]
    ]  # fmt: skip
    out += _table(["program", "case", "median ns", "p10 ns", "p90 ns", "verdict"], rows)
    out.append("")
    return out


def control_plane_section(data: dict[str, Any]) -> list[str]:
    out = ["## Control plane at scale", ""]
    rows = [
        [r["metric"], r["path"], _num(r["value"]), r["unit"], r.get("note", "")]
        for r in data["rows"]
    ]
    out += _table(["metric", "path", "value", "unit", "note"], rows)
    out.append("")
    return out


def chart(data: dict[str, Any], path: Path) -> None:
    """Grouped bars: one-stream TCP Gbit/s and 64 B kpps per configuration, per MTU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["rows"] if r["samples"]]
    mtus = sorted({r["mtu"] for r in rows})
    labels = list(dict.fromkeys(r["label"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(14, 6))
    width = 0.8 / max(1, len(mtus))
    for ax, metric, scale, title in (
        (axes[0], "tcp1_gbps", 1.0, "TCP, one stream (Gbit/s)"),
        (axes[1], "gen64_pps", 1e-3, "64-byte UDP from trafgen (kpps received)"),
    ):
        for i, mtu in enumerate(mtus):
            by_label = {r["label"]: r for r in rows if r["mtu"] == mtu}
            values = [by_label[lbl][metric] * scale if lbl in by_label else 0 for lbl in labels]
            positions = [x + i * width for x in range(len(labels))]
            ax.barh(positions, values, height=width, label=f"MTU {mtu}")
        ax.set_yticks([x + width * (len(mtus) - 1) / 2 for x in range(len(labels))])
        ax.set_yticklabels(labels)
        ax.invert_yaxis()
        ax.set_title(title)
        ax.grid(axis="x", alpha=0.3)
        ax.legend()
    fig.suptitle("flannel-bpf data paths, pod to pod across two namespace nodes")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render(sections: dict[str, dict[str, Any]], chart_name: str | None, analysis: str = "") -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `flannel-bpf bench` (bench/) on {when}, on this project's test machine: "
        "a VM with 2 vCPUs, Linux 6.18. Absolute numbers drift between runs and machines; "
        "compare rows of one table, which were measured side by side in one run.",
        "",
        "Every comparison with flanneld is with the real flanneld (v0.28.9, built from its Go "
        "module by scripts/build-peers.sh) measured in the same run: its vxlan, udp and host-gw "
        "are rows of the data-path rounds, its start-up with 5,000 leases and its memory rows of "
        "the control-plane run.",
        "",
        "## Targets",
        "",
        *targets_table(sections),
        "",
    ]
    if "datapath" in sections:
        if chart_name:
            lines += [f"![data path throughput and packet rate]({chart_name})", ""]
        lines += datapath_section(sections["datapath"])
    if "datapath_v6only" in sections:
        title = "Data path, IPv6-only (EnableIPv4 false, Kubernetes mode): a run of its own"
        lines += datapath_section(sections["datapath_v6only"], title)
    if "profile" in sections:
        lines += profile_section(sections["profile"])
    if "prog_cost" in sections:
        lines += prog_cost_section(sections["prog_cost"])
    if "control_plane" in sections:
        lines += control_plane_section(sections["control_plane"])
    if analysis:
        lines += [analysis.strip(), ""]
    return "\n".join(lines).rstrip() + "\n"


def write(results: Path = RESULTS, docs: Path = DOCS) -> Path:
    sections = load(results)
    if not sections:
        raise SystemExit(f"no results in {results}: run the benchmarks first")
    chart_name = None
    if "datapath" in sections:
        chart_name = "benchmarks.png"
        chart(sections["datapath"], docs / chart_name)
    target = docs / "benchmarks.md"
    analysis = ANALYSIS.read_text() if ANALYSIS.is_file() else ""
    target.write_text(render(sections, chart_name, analysis))
    return target


def main() -> int:
    print(f"wrote {write()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
