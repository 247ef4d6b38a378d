"""bpf/include/flannel_bpf.h and flannel_bpf/datapath/bpf_maps.py describe one contract: keep
them equal."""

from __future__ import annotations

import re
from pathlib import Path

from flannel_bpf.datapath import bpf_maps, loader
from flannel_bpf.datapath.bpf_maps import Hook, Reason

HEADER = (Path(loader.BPF_SOURCE_DIR) / "include" / "flannel_bpf.h").read_text()


def _enum(name: str) -> dict[str, int]:
    body = re.search(rf"enum {name} \{{(.*?)\}};", HEADER, re.S)
    assert body is not None, name
    return {m[1]: int(m[2]) for m in re.finditer(r"^\s*(FB_\w+)\s*=\s*(\d+),", body[1], re.M)}


def _define(name: str) -> int:
    match = re.search(rf"#define {name} (\w+)", HEADER)
    assert match is not None, name
    return int(match[1].rstrip("ULul"), 0)  # 1000000000ULL


def test_reasons_match_the_header() -> None:
    values = _enum("fb_reason")
    assert values.pop("FB_REASON_MAX") == bpf_maps.REASON_MAX
    assert {f"FB_{r.name}": r.value for r in Reason} == values


def test_hooks_match_the_header() -> None:
    values = _enum("fb_hook")
    assert values.pop("FB_HOOK_MAX") == bpf_maps.HOOK_MAX
    assert {f"FB_HOOK_{h.name}": h.value for h in Hook} == values


def test_constants_match_the_header() -> None:
    assert _define("FB_LAYOUT_VERSION") == bpf_maps.LAYOUT_VERSION
    assert _define("FB_VXLAN_OVERHEAD") == bpf_maps.VXLAN_OVERHEAD
    assert _define("FB_VXLAN6_OVERHEAD") == bpf_maps.VXLAN6_OVERHEAD
    assert _define("FB_UDP_OVERHEAD") == bpf_maps.UDP_OVERHEAD
    assert _define("FB_MAX_REMOTES") == bpf_maps.MAX_REMOTES
    assert _define("FB_REMOTE_SKIP") == bpf_maps.FB_REMOTE_SKIP
    assert _define("FB_REMOTE_IPV6_UNDERLAY") == bpf_maps.FB_REMOTE_IPV6_UNDERLAY
    assert _define("FB_NEXTHOP_SLOT_BITS") == bpf_maps.NEXTHOP_SLOT_BITS
    assert _define("FB_NEXTHOP_TTL_JIFFIES") == bpf_maps.NEXTHOP_TTL_JIFFIES
    assert _define("FB_CFG_CHECK_SOURCES") == bpf_maps.FB_CFG_CHECK_SOURCES
    assert _define("FB_CFG_HOST_ROUTING") == bpf_maps.FB_CFG_HOST_ROUTING
    assert _define("FB_MARK_VALIDATED") == bpf_maps.FB_MARK_VALIDATED
    assert _define("FB_FLOW_TTL_NS") == bpf_maps.FLOW_TTL_NS
    assert _define("FB_MAX_FLOWS") == bpf_maps.MAX_FLOWS
    assert _define("FB_MAX_ENDPOINTS") == bpf_maps.MAX_ENDPOINTS


def test_reason_ranges_say_what_happened() -> None:
    assert {r.outcome for r in Reason if r < 8} == {"handled"}
    assert Reason.PASS_SKIP.outcome == "passed"
    assert Reason.DROP_INNER_MALFORMED.outcome == "dropped"
    assert max(Reason) < bpf_maps.REASON_MAX


def test_struct_sizes() -> None:
    # Natural C alignment of the header's structs (checked against the kernel's maps in
    # test_bpf_programs.py::test_struct_sizes_match_the_kernel_maps).
    assert bpf_maps.REMOTE_KEY.size == 8
    assert bpf_maps.REMOTE6_KEY.size == 20
    assert bpf_maps.REMOTE_VALUE.size == 12
    assert bpf_maps.REMOTE6_VALUE.size == 28
    assert bpf_maps.CONFIG.size == 64
    assert bpf_maps.COUNTER.size == 16
    assert bpf_maps.NEXTHOP.size == 32
    assert bpf_maps.NEXTHOP6.size == 48
    assert bpf_maps.FLOW_KEY.size == 16
    assert bpf_maps.FLOW_VALUE.size == 8
    assert bpf_maps.ENDPOINT_VALUE.size == 20


def test_config_round_trip() -> None:
    from ipaddress import IPv4Address, IPv6Address

    cfg = bpf_maps.DatapathConfig(
        IPv4Address("198.18.0.1"), 7, 4789, 3, "02:00:00:00:00:01", 5, "0e:00:00:00:00:02",
        vtep6_ifindex=9, local_ip6=IPv6Address("fd00::1"), vtep6_mac="0e:00:00:00:00:06",
        hop_limit=63,
    )  # fmt: skip
    raw = cfg.pack()
    assert raw[8:10] == (4789).to_bytes(2, "big")  # network order, as the programs compare it
    assert bpf_maps.DatapathConfig.unpack(raw) == cfg


def test_program_source_inlines_headers_once_with_line_markers() -> None:
    text = loader.program_source()
    assert text.count("#define FLANNEL_BPF_H") == 1
    assert '#line 1 "include/flannel_bpf.h"' in text
    for entry in loader.ENTRY_FILES:
        assert f'#line 1 "{entry}"' in text
    assert '#include "' not in text
