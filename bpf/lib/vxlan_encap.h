/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Wrapping an Ethernet frame carrying IPv4 or IPv6 in flannel's VXLAN over the IPv4 underlay and
 * sending it on the uplink: what vxlan.ko does after its FDB lookup. Shared by the encapsulation
 * at flannel.<VNI> and flannel-v6.<VNI> (tc_encap.c) and host routing's at a pod's veth
 * (tc_pod.c).
 */
#ifndef FB_VXLAN_ENCAP_H
#define FB_VXLAN_ENCAP_H

#include "common.h"
#include "maps.h"
#include "underlay.h"

/*
 * The IPv4 header of an Ethernet frame about to be routed into the overlay (at the vtep or at a
 * pod's veth): IPv4 by skb->protocol and by EtherType, a plain 20-byte header in the linear
 * part. Returns 0 with *ipp set, or the pass reason the caller counts.
 */
static __always_inline __u32 fb_frame_ipv4(const struct __sk_buff *skb, void *data, void *data_end,
					   struct iphdr **ipp)
{
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return FB_PASS_NOT_IPV4;
	if ((void *)(ip + 1) > data_end)
		return FB_PASS_SHORT;
	if (fb_eth_proto(eth) != bpf_htons(ETH_P_IP))
		return FB_PASS_NOT_IPV4;
	if (ip->version != 4 || ip->ihl != 5)
		return FB_PASS_IP_OPTIONS;
	*ipp = ip;
	return 0;
}

/*
 * The IPv6 header of an Ethernet frame about to be routed into the overlay (at flannel-v6.<VNI>):
 * IPv6 by skb->protocol and by EtherType, its fixed header in the linear part. Returns 0 with
 * *ipp set, or the pass reason.
 */
static __always_inline __u32 fb_frame_ipv6(const struct __sk_buff *skb, void *data, void *data_end,
					   struct ipv6hdr **ipp)
{
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6 = (void *)(eth + 1);

	if (skb->protocol != bpf_htons(ETH_P_IPV6))
		return FB_PASS_NOT_IPV4;
	if ((void *)(ip6 + 1) > data_end)
		return FB_PASS_SHORT;
	if (fb_eth_proto(eth) != bpf_htons(ETH_P_IPV6) || ip6->version != 6)
		return FB_PASS_NOT_IPV4;
	*ipp = ip6;
	return 0;
}

/* What encapsulation needs to know of the inner packet, whichever its family. */
struct fb_inner {
	__u32 hash;        /* the flow hash the outer source port comes from */
	__u32 seg_hdr_len; /* headers each GSO segment repeats (fb_segment_headers), or 0 */
	__be16 proto;      /* inner EtherType */
	__u8 tos;          /* TOS or traffic class: its ECN bits go outside */
};

static __always_inline void fb_inner_ipv4(struct __sk_buff *skb, const struct fb_config *cfg,
					  const struct iphdr *ip, void *data_end,
					  struct fb_inner *inner)
{
	inner->hash = fb_flow_hash(skb, ip, data_end, cfg->local_ip);
	inner->seg_hdr_len = fb_segment_headers(ip, data_end);
	inner->proto = bpf_htons(ETH_P_IP);
	inner->tos = ip->tos;
}

static __always_inline void fb_inner_ipv6(struct __sk_buff *skb, const struct fb_config *cfg,
					  const struct ipv6hdr *ip6, void *data_end,
					  struct fb_inner *inner)
{
	inner->hash = fb_flow_hash6(skb, ip6, data_end, cfg->local_ip);
	inner->seg_hdr_len = fb_segment_headers6(ip6, data_end);
	inner->proto = bpf_htons(ETH_P_IPV6);
	inner->tos = fb_ipv6_tclass(ip6);
}

/* ENCAP_L2(14), not 14 + 8: with the VXLAN header counted, every GSO packet is dropped. The
 * outer header is IPv4 for either inner family (the kernel sets skb->protocol to match). */
#define FB_ENCAP_FLAGS                                                                          \
	(BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP |  \
	 BPF_F_ADJ_ROOM_ENCAP_L2_ETH | BPF_F_ADJ_ROOM_ENCAP_L2(ETH_HLEN))

/*
 * Encapsulate the frame at skb->data (Ethernet + IPv4 without options or + IPv6, checked by the
 * caller, described by inner) towards remote over the IPv4 underlay and redirect it to the
 * underlay next hop. Returns the tc verdict and counts under hook: `handled` when sent, a
 * FB_PASS_* reason (packet untouched) when the kernel is to carry it instead. forward (IPv4
 * only): the packet is forwarded here, not by the host stack, so its TTL drops by one once it is
 * sure to be sent (the caller checked ttl > 1).
 */
static __always_inline int fb_vxlan_encap(struct __sk_buff *skb, const struct fb_config *cfg,
					  const struct fb_remote *remote,
					  const struct fb_inner *inner, __u32 hook, __u32 handled,
					  __u64 bytes, int forward)
{
	__u32 reason = handled;
	struct fb_nexthop *hop = fb_underlay_hop(skb, cfg, remote->vtep_ip, FB_VXLAN_OVERHEAD,
						 inner->seg_hdr_len, &reason);

	if (!hop) {
		fb_count(hook, reason, bytes);
		return TC_ACT_UNSPEC;
	}

	/* The outer IPv4 header, built before the packet moves: it needs the inner TOS. */
	__u32 inner_len = skb->len; /* the inner frame, Ethernet header included */
	struct iphdr outer_ip = {
		.version = 4,
		.ihl = 5,
		.tos = fb_outer_tos(inner->tos),
		.tot_len = bpf_htons(inner_len + FB_VXLAN_OVERHEAD - sizeof(struct ethhdr)),
		/* DF clear as vxlan.ko sends it; the ID counts per peer and CPU from a random start. */
		.id = bpf_htons(hop->ip_id++),
		.ttl = cfg->ttl,
		.protocol = IPPROTO_UDP,
		.saddr = cfg->local_ip,
		.daddr = remote->vtep_ip,
	};

	outer_ip.check = fb_ipv4_csum(&outer_ip);
	if (bpf_skb_adjust_room(skb, FB_VXLAN_OVERHEAD, BPF_ADJ_ROOM_MAC, FB_ENCAP_FLAGS)) {
		fb_count(hook, FB_PASS_ADJUST_FAILED, bytes);
		return TC_ACT_UNSPEC;
	}

	/* Written in place: no helper call per header. */
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct fb_encap_headers *h = data;

	if ((void *)(h + 1) > data_end) {
		fb_count(hook, FB_DROP_WRITE_FAILED, bytes);
		return TC_ACT_SHOT;
	}
	if (forward) {
		struct iphdr *inner_ip = (void *)(h + 1);

		if ((void *)(inner_ip + 1) > data_end) {
			fb_count(hook, FB_DROP_WRITE_FAILED, bytes);
			return TC_ACT_SHOT;
		}
		fb_decrease_ttl(inner_ip);
	}
	struct ethhdr *outer_eth = data;
	struct iphdr *outer = (void *)(outer_eth + 1);
	struct udphdr *udp = (void *)(outer + 1);
	struct fb_vxlanhdr *vxlan = (void *)(udp + 1);
	struct ethhdr *inner_eth = (void *)(vxlan + 1);

	__builtin_memcpy(outer_eth->h_dest, hop->dmac, ETH_ALEN);
	__builtin_memcpy(outer_eth->h_source, hop->smac, ETH_ALEN);
	fb_set_eth_proto(outer_eth, bpf_htons(ETH_P_IP));
	*outer = outer_ip;
	udp->source = fb_flow_sport(inner->hash, cfg->sport_min, cfg->sport_max);
	udp->dest = cfg->port;
	udp->len = bpf_htons(inner_len + sizeof(struct udphdr) + sizeof(struct fb_vxlanhdr));
	udp->check = 0; /* legal for IPv4 (RFC 7348) and what Cilium and Calico send */
	vxlan->flags = bpf_htonl(FB_VXLAN_FLAGS_VNI);
	vxlan->vni = bpf_htonl(cfg->vni << 8);
	/* Inner MACs as the peer's vxlan.ko requires: its VtepMAC, from our VtepMAC. */
	__builtin_memcpy(inner_eth->h_dest, remote->vtep_mac, ETH_ALEN);
	__builtin_memcpy(inner_eth->h_source, cfg->vtep_mac, ETH_ALEN);
	fb_set_eth_proto(inner_eth, inner->proto);

	fb_count(hook, handled, bytes);
	return bpf_redirect(hop->ifindex, 0);
}

#endif /* FB_VXLAN_ENCAP_H */
