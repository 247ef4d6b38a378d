"""The benchmark report: every target shown as met or missed with its number, and a chart."""

from __future__ import annotations

import json
from pathlib import Path

from bench import report
from bench.datapath import CONFIGS, IPV6_ONLY_CONFIGS, Result, Sample, summarize


def _datapath_results() -> dict[str, object]:
    tcp_by_key = {
        "flanneld-vxlan": 12.0, "flanneld-udp": 0.4, "flanneld-host-gw": 17.0, "host-gw": 17.0,
        "vxlan-kernel": 14.0, "bpf-auto": 15.5, "bpf-xdp": 5.0, "bpf-tc": 15.0,
        "vxlan-kernel-tso-off": 7.0, "udp-userspace": 0.6, "udp-bpf": 8.0,
        "bpf-host-routing": 18.0, "flanneld-vxlan-v6": 11.0, "flanneld-host-gw-v6": 16.0,
        "host-gw-v6": 16.0, "vxlan-kernel-v6": 12.0, "bpf-auto-v6": 13.2, "bpf-xdp-v6": 4.0,
    }  # fmt: skip
    assert set(tcp_by_key) == {c.key for c in CONFIGS}
    results = []
    for config, pps in zip(CONFIGS, range(100_000, 1_900_000, 100_000), strict=True):
        tcp = tcp_by_key[config.key]
        r = Result(config, 1500, decap="tc" if config.datapath == "bpf" else "")
        r.samples = [
            Sample(
                tcp1_gbps=tcp,
                tcp4_gbps=tcp,
                udp64_pps=float(pps),
                gen64_pps=2.0 * pps,
                tcp_lat_us=30.0,
                udp_lat_us=30.0,
                cpu_s_per_gbit=0.1,
                frames_per_gib=20e3,
            )
        ]
        results.append(r)
    results.append(Result(CONFIGS[0], 9000, error="lab failed: boom"))
    return summarize(results, rounds=1, seconds=1)


def test_report_lists_every_target_with_its_verdict(tmp_path: Path) -> None:
    results, docs = tmp_path / "results", tmp_path / "docs"
    results.mkdir()
    docs.mkdir()
    data = _datapath_results()
    (results / "datapath.json").write_text(json.dumps(data))
    cost = {"section": "program_cost", "unit": "ns", "runs": 10, "rows": [
        {"program": "fb_tc_encap", "case": "encap", "median_ns": 250.0, "p10_ns": 240.0,
         "p90_ns": 260.0, "verdict": "encap_redirect"},
        {"program": "fb_tc_udp_encap", "case": "L3 TUN", "median_ns": None, "p10_ns": None,
         "p90_ns": None, "verdict": "not_measurable"},
    ], "targets": [{"name": "encapsulation", "value": 250.0, "unit": "ns", "limit": "<= 300",
                    "met": True, "note": ""}]}  # fmt: skip
    (results / "prog_cost.json").write_text(json.dumps(cost))

    written = report.write(results, docs)

    text = written.read_text()
    assert (docs / "benchmarks.png").stat().st_size > 10_000
    assert "![data path throughput and packet rate](benchmarks.png)" in text
    # 15.5 / 14.0 = 1.107 >= 1.10: met; 15.5 / 17.0 = 0.91 < 0.95: missed.
    assert "| BPF TCP throughput vs kernel vxlan (MTU 1500) | 1.11 x | >= 1.1 | **met** |" in text
    assert "| BPF TCP throughput vs host-gw (MTU 1500) | 0.91 x | >= 0.95 | **missed** |" in text
    assert "| encapsulation | 250.00 ns | <= 300 | **met** |" in text
    assert "error: lab failed: boom" in text
    assert "| fb_tc_udp_encap | L3 TUN | n/a | n/a | n/a | not_measurable |" in text
    targets = [t["name"] for t in data["targets"]]  # type: ignore[index]
    # IPv6 rows are compared with the IPv6 rows of the same backends: 13.2 / 11.0, 13.2 / 16.0
    rows = {r["config"]: r for r in data["rows"] if r["mtu"] == 1500}  # type: ignore[attr-defined]
    assert round(rows["bpf-auto-v6"]["tcp1_gbps_vs_flanneld"], 3) == 1.2
    assert round(rows["bpf-auto-v6"]["tcp1_gbps_vs_host-gw"], 3) == 0.825
    # against the real flanneld of the same backend: 15.5 / 12.0 = 1.29; udp 0.6 / 0.4 = 1.5
    assert "| BPF TCP throughput vs flanneld vxlan (MTU 1500) | 1.29 x | >= 1.1 | **met** |" in text
    # host routing: 18.0 / 12.0 = 1.5 >= 1.15; 18.0 / 17.0 = 1.06 >= 0.95
    assert "| host routing TCP throughput vs flanneld vxlan (MTU 1500) | 1.50 x | >= 1.15 |" in text
    assert "| host routing TCP throughput vs host-gw (MTU 1500) | 1.06 x | >= 0.95 |" in text
    assert (
        "| userspace udp TCP throughput vs flanneld udp (MTU 1500) | 1.50 x | >= 1, aim 2 |" in text
    )
    assert (
        len(targets) == 14
    )  # nine for the default path, five for host routing and all(name in text for name in targets)


def test_no_results_is_a_clear_error(tmp_path: Path) -> None:
    import pytest

    with pytest.raises(SystemExit, match="no results"):
        report.write(tmp_path, tmp_path)


def test_the_ipv6_only_run_compares_with_its_own_rows() -> None:
    """The IPv6-only run (its own results file): ours against flanneld's IPv6-only row and
    against host-gw's IPv6 row, which that run measures beside them."""
    tcp = {"flanneld-vxlan-v6only": 10.0, "vxlan-kernel-v6only": 10.5, "bpf-auto-v6only": 11.0,
           "host-gw-v6": 16.0}  # fmt: skip
    results = []
    for config in IPV6_ONLY_CONFIGS:
        r = Result(config, 1500)
        r.samples = [Sample(tcp1_gbps=tcp[config.key], tcp_lat_us=30.0, cpu_s_per_gbit=0.1)]
        results.append(r)
    rows = {row["config"]: row for row in summarize(results, rounds=1, seconds=1)["rows"]}
    assert round(rows["bpf-auto-v6only"]["tcp1_gbps_vs_flanneld"], 3) == 1.1
    assert round(rows["bpf-auto-v6only"]["tcp1_gbps_vs_host-gw"], 4) == 0.6875
    assert round(rows["bpf-auto-v6only"]["tcp1_gbps_vs_vxlan-kernel"], 3) == 1.048
    section = report.datapath_section({**summarize(results, 1, 1), "rows": list(rows.values())},
                                      "IPv6-only")  # fmt: skip
    assert section[0] == "## IPv6-only" and any("BPF vxlan, IPv6-only" in line for line in section)


def test_the_profile_section_shows_both_loads_largest_part_first() -> None:
    def path(key: str, routing: float) -> dict[str, object]:
        return {
            "key": key, "gbps": 10.0, "busy_cpu_ms_per_gib": 100.0 + routing,
            "cpu_ms_per_gib": {"idle": 900.0, "TCP": 100.0, "routing and IPv4": routing},
            "kpps": 120.0, "busy_cpu_ns_per_packet": 5000 + routing,
            "cpu_ns_per_packet": {"idle": 9000, "bridge": 5000, "routing and IPv4": routing},
        }  # fmt: skip

    data = {"frequency_hz": 1999, "seconds": 2, "when": "now", "kernel": "6.18",
            "paths": [path("a", 150.0), path("b", 20.0)],
            "udp64_paths": [path("a", 1500.0), path("b", 20.0)]}  # fmt: skip
    text = "\n".join(report.profile_section(data))
    tcp, small = text.split("## Where the cycles go: 64-byte packets")
    assert "one TCP stream" in tcp and "idle" not in text
    assert tcp.index("routing and IPv4") < tcp.index("| TCP |")  # 150 ms/GiB before 100
    assert small.index("| bridge |") < small.index("routing and IPv4")
    assert "| 64 B packets, kpps | 120 | 120 |" in small
    assert "| **busy CPU in all** | **6500** | **5020** |" in small
    # An earlier profile.json, TCP only, still reports.
    assert "64-byte" not in "\n".join(report.profile_section({**data, "udp64_paths": []}))
