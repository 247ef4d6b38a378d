/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Wrapping an Ethernet frame carrying IPv4 or IPv6 in flannel's VXLAN over the IPv4 underlay and
 * sending it on the uplink: what vxlan.ko does after its FDB lookup. Shared by the encapsulation
 * at flannel.<VNI> and flannel-v6.<VNI> (tc_encap.c) and host routing's at a pod's veth
 * (tc_pod.c). fb_vxlan6_encap does the same over the IPv6 underlay, flannel-v6's own frame, for
 * peers without an IPv4 VTEP.
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
#define FB_ENCAP6_FLAGS                                                                         \
	(BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP |  \
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

/* Ones' complement sums, RFC 1071, kept in 64 bits until folded. bpf_csum_diff() sums memory as
 * the kernel's csum_partial() does, so every term is in the same (memory) byte order. */
static __always_inline __u16 fb_csum_fold(__u64 sum)
{
	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)((sum & 0xffff) + (sum >> 16));
}

static __always_inline __u64 fb_csum_mem(void *mem, __u32 size)
{
	__s64 sum = bpf_csum_diff(NULL, 0, mem, size, 0);

	return sum < 0 ? 0 : (__u64)sum;
}

/*
 * Whether an outer UDP checksum can be derived from the inner packet (local checksum offload, as
 * the kernel's lco_csum): an inner TCP, UDP or ICMPv6 segment right after the IPv6 header carries
 * a checksum that is (or, offloaded, will be) right, and then the segment sums to the complement
 * of its pseudo-header. IPv6 forbids UDP's "no checksum" 0, but it is checked anyway. The segment
 * must end the frame: the receiver sums every byte of the outer UDP payload, and bytes past the
 * payload length (a packet socket's padding; a jumbogram's 0) are in no inner checksum.
 */
static __always_inline int fb_inner_l4_checksummed(const struct __sk_buff *skb,
						   const struct ipv6hdr *ip6, void *data_end)
{
	if (skb->len != ETH_HLEN + sizeof(*ip6) + bpf_ntohs(ip6->payload_len))
		return 0;
	if (ip6->nexthdr == IPPROTO_TCP || ip6->nexthdr == IPPROTO_ICMPV6)
		return 1;
	if (ip6->nexthdr != IPPROTO_UDP)
		return 0;

	const struct udphdr *udp = (const void *)(ip6 + 1);

	return (void *)(udp + 1) <= data_end && udp->check != 0;
}

/*
 * Encapsulate an Ethernet + IPv6 frame (checked by the caller) towards remote over the IPv6
 * underlay, as flannel-v6.<VNI> would: outer IPv6 from our PublicIPv6 to the peer's, flow label
 * 0, traffic class the inner ECN, hop limit the uplink's, UDP with a checksum (flanneld's
 * flannel-v6 drops frames without one). The checksum is derived, not summed over the payload:
 * outer pseudo-header + the 70 bytes from UDP to the inner IPv6 header's end + the complement of
 * the inner pseudo-header (what the inner segment sums to). Only single packets: a GSO
 * aggregate's segments would all leave with one checksum (bpf_skb_adjust_room() cannot ask for
 * SKB_GSO_UDP_TUNNEL_CSUM), so they stay vxlan.ko's. Returns the tc verdict, counted.
 */
static __always_inline int fb_vxlan6_encap(struct __sk_buff *skb, const struct fb_config *cfg,
					   const struct fb_remote6 *remote,
					   const struct fb_inner *inner, const struct ipv6hdr *ip6,
					   void *data_end, __u32 hook, __u64 bytes)
{
	if (skb->gso_size) {
		fb_count(hook, FB_PASS_GSO, bytes);
		return TC_ACT_UNSPEC;
	}
	if (!fb_inner_l4_checksummed(skb, ip6, data_end)) {
		fb_count(hook, FB_PASS_NO_L4_CSUM, bytes);
		return TC_ACT_UNSPEC;
	}

	__u32 reason = FB_ENCAP_REDIRECT;
	struct fb_nexthop6 *hop = fb_underlay_hop6(skb, cfg, remote->vtep_ip6, &reason);

	if (!hop) {
		fb_count(hook, reason, bytes);
		return TC_ACT_UNSPEC;
	}

	__u32 inner_len = skb->len;
	__u16 udp_len = inner_len + sizeof(struct udphdr) + sizeof(struct fb_vxlanhdr);
	__u8 tclass = fb_outer_tos(inner->tos);
	__u8 hop_limit = cfg->hop_limit;

	if (bpf_skb_adjust_room(skb, FB_VXLAN6_OVERHEAD, BPF_ADJ_ROOM_MAC, FB_ENCAP6_FLAGS)) {
		fb_count(hook, FB_PASS_ADJUST_FAILED, bytes);
		return TC_ACT_UNSPEC;
	}

	void *data = (void *)(long)skb->data;

	data_end = (void *)(long)skb->data_end;
	struct fb_encap6_headers *h = data;
	struct ipv6hdr *inner_ip6 = (void *)(h + 1);

	if ((void *)(inner_ip6 + 1) > data_end) {
		fb_count(hook, FB_DROP_WRITE_FAILED, bytes);
		return TC_ACT_SHOT;
	}
	struct ethhdr *outer_eth = data;
	struct ipv6hdr *outer = (void *)(outer_eth + 1);
	struct udphdr *udp = (void *)(outer + 1);
	struct fb_vxlanhdr *vxlan = (void *)(udp + 1);
	struct ethhdr *inner_eth = (void *)(vxlan + 1);

	__builtin_memcpy(outer_eth->h_dest, hop->dmac, ETH_ALEN);
	__builtin_memcpy(outer_eth->h_source, hop->smac, ETH_ALEN);
	fb_set_eth_proto(outer_eth, bpf_htons(ETH_P_IPV6));
	*(__be32 *)outer = bpf_htonl(0x60000000 | ((__u32)tclass << 20));
	outer->payload_len = bpf_htons(udp_len);
	outer->nexthdr = IPPROTO_UDP;
	outer->hop_limit = hop_limit;
	__builtin_memcpy(&outer->saddr, cfg->local_ip6, 16);
	__builtin_memcpy(&outer->daddr, remote->vtep_ip6, 16);
	udp->source = fb_flow_sport(inner->hash, cfg->sport_min, cfg->sport_max);
	udp->dest = cfg->port;
	udp->len = bpf_htons(udp_len);
	udp->check = 0;
	vxlan->flags = bpf_htonl(FB_VXLAN_FLAGS_VNI);
	vxlan->vni = bpf_htonl(cfg->vni << 8);
	__builtin_memcpy(inner_eth->h_dest, remote->v4.vtep_mac, ETH_ALEN);
	__builtin_memcpy(inner_eth->h_source, cfg->vtep6_mac, ETH_ALEN);
	fb_set_eth_proto(inner_eth, bpf_htons(ETH_P_IPV6));

	/* The 70 bytes from the UDP header to the inner IPv6 header's end: 68 + a last word. */
	__u8 *from_udp = (__u8 *)udp;
	__u64 sum = fb_csum_mem(&outer->saddr, 32) + bpf_htonl(udp_len) + bpf_htonl(IPPROTO_UDP);

	sum += fb_csum_mem(from_udp, 68) + *(__u16 *)(from_udp + 68);
	/* The inner segment: the complement of its pseudo-header (addresses, length, next header). */
	__u64 pseudo = fb_csum_mem(&inner_ip6->saddr, 32) +
		       bpf_htonl((__u32)bpf_ntohs(inner_ip6->payload_len)) +
		       bpf_htonl(inner_ip6->nexthdr);

	sum += (__u16)~fb_csum_fold(pseudo);
	__u16 check = ~fb_csum_fold(sum);

	udp->check = check ? check : 0xffff;
	fb_count(hook, FB_ENCAP_REDIRECT, bytes);
	return bpf_redirect(hop->ifindex, 0);
}

#endif /* FB_VXLAN_ENCAP_H */
