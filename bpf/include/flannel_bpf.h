/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The contract between the BPF programs and the agent: map layouts, hooks and reasons.
 *
 * flannel_bpf/datapath/bpf_maps.py mirrors every struct and enum here, and tests/test_bpf_layout.py
 * compares the two. Reason and hook numbers are stable: they index pinned counters that survive
 * agent upgrades and show up in dashboards. Append, never renumber. Any change to a map layout
 * bumps FB_LAYOUT_VERSION, which moves the pins to a new directory (v<N>).
 */
#ifndef FLANNEL_BPF_H
#define FLANNEL_BPF_H

#define FB_LAYOUT_VERSION 4

/* Outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14): flanneld's MTU overhead. */
#define FB_VXLAN_OVERHEAD 50
/* The same over the IPv6 underlay (outer IPv6, 40): flannel-v6.<VNI>'s frames. */
#define FB_VXLAN6_OVERHEAD 70
#define FB_VXLAN_FLAGS_VNI 0x08000000 /* the I flag, alone: what vxlan.ko accepts without GBP */

/* Outer IPv4 (20) + UDP (8): flannel's udp backend, raw inner IPv4 as the UDP payload. */
#define FB_UDP_OVERHEAD 28

#define FB_MAX_REMOTES 65536

/* fb_remotes: one entry per remote lease, longest-prefix matched on the inner destination. */
struct fb_remote_key {
	__u32 prefixlen;
	__be32 subnet;
};

#define FB_REMOTE_SKIP 0x0001 /* let the kernel handle this subnet (e.g. direct routing) */
/* fb_remotes6 only: the peer has no IPv4 VTEP (an IPv6-only network); send flannel-v6's own
 * frame over the IPv6 underlay to vtep_ip6, inner destination vtep_mac (its flannel-v6 MAC). */
#define FB_REMOTE_IPV6_UNDERLAY 0x0002

/*
 * fb_remotes6 (EnableIPv6): one entry per remote lease's IPv6 subnet, longest-prefix matched on
 * the inner IPv6 destination (value: struct fb_remote6 below). To a peer with an IPv4 VTEP the
 * programs send IPv6 pod packets over the IPv4 underlay to its flannel.<VNI>, which
 * decapsulates any inner EtherType (vxlan.ko and our decap alike): 50 bytes of overhead instead
 * of 70, the outer UDP checksum zero as IPv4 allows, so GSO aggregates are carried whole. To a
 * peer without one (FB_REMOTE_IPV6_UNDERLAY) they send flannel-v6's frame over the IPv6
 * underlay, which needs an outer UDP checksum: single packets only, the checksum derived from
 * the inner one (GSO aggregates stay vxlan.ko's). What the programs leave to the kernel takes
 * flanneld's way, flannel-v6.<VNI> over the IPv6 underlay.
 */
struct fb_remote6_key {
	__u32 prefixlen;
	__u8 subnet[16];
};

/*
 * fb_senders: the underlay addresses holding at least one lease, and how many. Read only with
 * anti-spoofing on, and only for a frame already failing the check: it tells a stranger on the
 * underlay (no lease) from a peer sending sources outside its own subnet.
 */
#define FB_MAX_SENDERS FB_MAX_REMOTES

struct fb_remote {
	__be32 vtep_ip;   /* the peer's PublicIP: outer destination */
	__u8 vtep_mac[6]; /* the peer's VtepMAC: inner destination MAC */
	__u16 flags;      /* FB_REMOTE_* */
};

/*
 * fb_remotes6's value: the IPv4 VTEP the programs send to, or with FB_REMOTE_IPV6_UNDERLAY no
 * IPv4 address and the peer's flannel-v6 MAC; then the peer's PublicIPv6, the outer source of
 * its flannel-v6 frames (anti-spoofing) and the outer destination of ours over the IPv6
 * underlay. fb_senders6 holds those addresses as fb_senders holds the IPv4 ones.
 */
struct fb_remote6 {
	struct fb_remote v4;
	__u8 vtep_ip6[16];
};

/*
 * fb_nexthops: per CPU, a direct-mapped cache of the underlay next hop to a peer's PublicIP, as
 * bpf_fib_lookup() last answered (slot: a multiplicative hash of the address; the entry names its
 * peer, so a slot shared by two peers just costs lookups). An answer is reused for at most
 * FB_NEXTHOP_TTL_JIFFIES, 100 ms at the lowest HZ (100), so a changed route, neighbour, MTU or
 * forwarding setting takes effect within that time; the kernel's own neighbour entries go stale
 * over seconds. Only complete answers are kept. The agent empties it with each fb_config.
 */
#define FB_NEXTHOP_SLOT_BITS 12
#define FB_NEXTHOP_SLOTS (1 << FB_NEXTHOP_SLOT_BITS)
#define FB_NEXTHOP_TTL_JIFFIES 10

struct fb_nexthop {
	__u64 expires; /* bpf_jiffies64() from which the FIB is asked again; 0 = empty */
	__be32 peer;   /* the PublicIP this answer is for */
	__u32 ifindex; /* the underlay device the route leaves by */
	__u16 mtu;     /* the route's MTU */
	__u16 ip_id;   /* the next outer IPv4 ID to this peer from this CPU */
	__u8 smac[6];  /* the device's MAC */
	__u8 dmac[6];  /* the next hop's MAC */
};

/* fb_nexthops6: the same cache for PublicIPv6 peers (the IPv6 underlay; no IP ID there). */
struct fb_nexthop6 {
	__u64 expires;
	__u8 peer[16];
	__u32 ifindex;
	__u16 mtu;
	__u8 smac[6];
	__u8 dmac[6];
	__u8 pad[6];
};

/*
 * fb_config: a single entry, written by the agent before the programs are attached. Both wire
 * formats share it; the udp programs ignore vni, vtep_mac and the source port range.
 */
struct fb_config {
	__be32 local_ip;    /* outer source; decapsulation only accepts this destination */
	__u32 vni;          /* host order, 24 bits */
	__be16 port;        /* VXLAN or udp-backend port, network order; 0 = not configured yet */
	__u16 sport_min;    /* outer UDP source ports: [sport_min, sport_max), the kernel's range */
	__u16 sport_max;
	__u8 ttl;           /* outer TTL: the namespace's ip_default_ttl, as vxlan.ko uses */
	__u8 flags;         /* FB_CFG_* */
	__u32 uplink_ifindex;
	__u32 vtep_ifindex; /* flannel.<VNI>, or flannel0 (TUN) for udp */
	__u8 vtep_mac[6];   /* our VtepMAC: inner source MAC, and what decapsulation accepts */
	__u8 uplink_mac[6];
	__u32 vtep6_ifindex; /* flannel-v6.<VNI> (EnableIPv6), its egress encapsulated too; or 0 */
	__u8 local_ip6[16];  /* our PublicIPv6: flannel-v6 frames decapsulated only to it */
	__u8 vtep6_mac[6];   /* flannel-v6.<VNI>'s MAC, what those frames' inner destination is */
	__u8 hop_limit;      /* outer IPv6 hop limit: the uplink's, as vxlan.ko's flannel-v6 uses */
	__u8 pad;
};

/*
 * Anti-spoofing (--anti-spoofing): decapsulate only frames whose outer source holds a lease and
 * whose inner source lies in that lease's subnet. Off by default, as in flanneld.
 */
#define FB_CFG_CHECK_SOURCES 0x01
/* Host routing (--host-routing=bpf): validated pod flows skip the host stack (tc_pod.c). */
#define FB_CFG_HOST_ROUTING 0x02

/*
 * Host routing. Nothing here is decided by the programs alone: a flow takes the short way only
 * after the host stack carried it and said it may, so routing, netfilter and NAT keep their say.
 *
 * The agent's mangle rules (POSTROUTING, out of flannel.<VNI> and out of the pods' bridge) set
 * FB_MARK_VALIDATED on packets of connections conntrack knows as ESTABLISHED and that no NAT
 * rewrites. Where such a packet leaves the host stack its flow is written to fb_flows: at tc
 * egress of flannel.<VNI> for a remote pod, at tc egress of a pod's veth for a local one if it
 * came in at flannel.<VNI> (under br_netfilter, frames bridged between local pods are marked
 * too, and were never routed). A local pod's veth and MACs go to fb_endpoints from any packet
 * routed in from the overlay to it, validated or not: who lives where is not a flow's matter.
 * A flow is trusted for FB_FLOW_TTL_NS; then one packet goes the long way again and renews it
 * (or, no longer marked, lets it lapse). TCP packets with SYN, FIN or RST always go the long
 * way, so conntrack sees every state change.
 */
#define FB_MARK_VALIDATED 0x00200000 /* clear of kube-proxy's 0x4000 and 0x8000 */
#define FB_FLOW_TTL_NS 1000000000ULL
#define FB_MAX_FLOWS 65536
#define FB_MAX_ENDPOINTS 4096

enum fb_flow_dir {
	FB_FLOW_EGRESS = 0,  /* a local pod to a remote subnet */
	FB_FLOW_INGRESS = 1, /* a remote subnet to a local pod */
};

struct fb_flow_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport; /* 0 for protocols without ports */
	__be16 dport;
	__u8 proto;
	__u8 dir; /* enum fb_flow_dir */
	__u16 pad;
};

struct fb_flow {
	__u64 expires; /* bpf_ktime_get_ns() after which the host stack is asked again */
};

/* fb_endpoints: a local pod by address, as the host stack last delivered to it. */
struct fb_endpoint {
	__u32 ifindex;   /* the pod's veth on this side (its peer is the pod's eth0) */
	__u8 mac[6];     /* the pod's eth0 */
	__u8 gw_mac[6];  /* the bridge's MAC, the source of what the host sends the pod */
	__u32 pad;
};

/* Hooks are places, not formats: an agent runs one network, so vxlan and udp share the slots. */
enum fb_hook {
	FB_HOOK_TC_ENCAP = 0,  /* tc egress on flannel.<VNI> (vxlan) or flannel0 (udp) */
	FB_HOOK_XDP_DECAP = 1, /* XDP on the uplink */
	FB_HOOK_TC_DECAP = 2,  /* tc ingress on the uplink */
	FB_HOOK_POD_EGRESS = 3,  /* host routing: tc ingress on a pod's veth (what the pod sends) */
	FB_HOOK_POD_DELIVER = 4, /* host routing: tc egress on a pod's veth (what the host delivers) */
	FB_HOOK_MAX = 5,
};

/* What happened to a packet. 0-7: handled; 8-39: passed on to the kernel untouched; 40-63: dropped. */
#define FB_REASON_FIRST_DROP 40
enum fb_reason {
	FB_ENCAP_REDIRECT = 0,       /* encapsulated, outer MACs from the FIB, sent on the uplink */
	FB_DECAP_PASS = 1,           /* decapsulated, inner packet handed to the stack (XDP) */
	FB_DECAP_REDIRECT = 2,       /* decapsulated, redirected into the flannel device's ingress (tc) */
	FB_DECAP_TO_POD = 3,         /* host routing: decapsulated straight into the local pod */
	FB_ENCAP_FROM_POD = 4,       /* host routing: from the pod's veth encapsulated to the uplink */
	FB_FLOW_LEARNT = 5,          /* host routing: a flow validated by the host stack, recorded */
	FB_POD_LEARNT = 6,           /* host routing: a local pod's veth and MACs, new or changed */

	FB_PASS_NOT_IPV4 = 8,        /* neither IPv4 nor IPv6 (ARP, ...); name kept for the labels */
	FB_PASS_IP_OPTIONS = 9,      /* IPv4 header with options */
	FB_PASS_NO_REMOTE = 10,      /* encap: destination in no known remote subnet */
	FB_PASS_NO_CONFIG = 11,      /* the agent has not written fb_config */
	FB_PASS_NO_ROUTE = 12,       /* encap: no usable underlay route to the peer */
	FB_PASS_NO_NEIGH = 13,       /* encap: underlay neighbour unresolved; vxlan.ko resolves it */
	FB_PASS_NOT_FORWARDING = 14, /* encap: forwarding is off on the uplink (no FIB result) */
	FB_PASS_TOO_BIG = 15,        /* encap: would exceed the uplink MTU; the kernel fragments */
	FB_PASS_SHORT = 16,          /* shorter than the headers it claims, or headers not linear */
	FB_PASS_NOT_OURS = 17,       /* decap: not UDP to our address and VXLAN port */
	FB_PASS_FRAGMENT = 18,       /* decap: an IP fragment; the kernel reassembles */
	FB_PASS_BAD_FLAGS = 19,      /* decap: VXLAN flags other than I alone */
	FB_PASS_OTHER_VNI = 20,      /* decap: another VNI */
	FB_PASS_OTHER_MAC = 21,      /* decap: inner destination is not our VtepMAC */
	FB_PASS_INNER_NOT_IPV4 = 22, /* decap: inner frame is neither IPv4 nor IPv6 */
	FB_PASS_ADJUST_FAILED = 23,  /* the kernel refused to resize the packet; unchanged */
	FB_PASS_SKIP = 24,           /* encap: remote marked FB_REMOTE_SKIP */
	FB_PASS_GSO = 25,            /* a GSO packet this hook must not resize (see tc_decap.c) */
	FB_PASS_TTL_EXPIRED = 26,    /* udp: inner TTL would reach 0; the userspace plane drops it */
	FB_PASS_NOT_VALIDATED = 27,  /* host routing: flow not (yet) validated by the host stack */
	FB_PASS_REVALIDATE = 28,     /* host routing: flow's validation lapsed; asked again */
	FB_PASS_TCP_CONTROL = 29,    /* host routing: SYN, FIN or RST, for conntrack to see */
	FB_PASS_NO_ENDPOINT = 30,    /* host routing: no such pod here (decap: the destination;
	                              * a pod's veth: the source, on that veth) */
	FB_PASS_NO_PORTS = 31,       /* host routing: not TCP/UDP/ICMP, or a fragment */
	FB_PASS_NO_L4_CSUM = 32,     /* encap over the IPv6 underlay: no inner TCP, UDP or ICMPv6
	                              * checksum covering the rest of the frame to derive the
	                              * outer one from; vxlan.ko sends it */

	FB_DROP_INNER_MALFORMED = 40, /* decap: inner IPv4 or IPv6 header invalid or truncated */
	FB_DROP_WRITE_FAILED = 41,    /* header write failed after the packet was resized */
	FB_DROP_UNKNOWN_SENDER = 42,  /* decap, anti-spoofing: the outer source holds no lease */
	FB_DROP_SPOOFED_SOURCE = 43,  /* decap, anti-spoofing: inner source outside the sender's subnet */

	FB_REASON_MAX = 64,
};

/* fb_stats: per-CPU, indexed by hook * FB_REASON_MAX + reason. */
struct fb_counter {
	__u64 packets;
	__u64 bytes;
};

#define FB_STATS_ENTRIES (FB_HOOK_MAX * FB_REASON_MAX)

#endif /* FLANNEL_BPF_H */
