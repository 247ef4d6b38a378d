/* SPDX-License-Identifier: GPL-2.0 */
/* The underlay hop of an encapsulated packet; shared by both wire formats' encapsulation. */
#ifndef FB_UNDERLAY_H
#define FB_UNDERLAY_H

#include "common.h"
#include "flannel_bpf.h"
#include "maps.h"

static __always_inline __u32 fb_nexthop_slot(__be32 peer)
{
	return ((__u32)peer * 0x9e3779b1u) >> (32 - FB_NEXTHOP_SLOT_BITS);
}

/*
 * Whether the packet still fits the route once wrapped in overhead bytes. A GSO packet fits when
 * each of its segments will: gso_size plus the headers every segment repeats (seg_hdr_len, from
 * the frame's start through its TCP or UDP header) plus the overhead. bpf_check_mtu() cannot say
 * that: for GSO it either passes everything or checks segments without the overhead. Without
 * seg_hdr_len (headers not parsed) a GSO packet is taken to fit, as bpf_check_mtu() would.
 */
static __always_inline int fb_fits(struct __sk_buff *skb, const struct fb_nexthop *hop,
				   __s32 overhead, __u32 seg_hdr_len)
{
	if (skb->gso_size)
		return !seg_hdr_len ||
		       skb->gso_size + seg_hdr_len + overhead <= (__u32)hop->mtu + ETH_HLEN;
	return skb->len + overhead <= (__u32)hop->mtu + ETH_HLEN;
}

/* The headers each segment of a GSO frame repeats: Ethernet, IPv6 (no extension headers) and
 * TCP (its data offset) or UDP; 0 when they cannot be read here. */
static __always_inline __u32 fb_segment_headers6(const struct ipv6hdr *ip6, void *data_end)
{
	if (ip6->nexthdr == IPPROTO_UDP)
		return ETH_HLEN + sizeof(struct ipv6hdr) + sizeof(struct udphdr);
	if (ip6->nexthdr != IPPROTO_TCP)
		return 0;

	const __u8 *doff = (const __u8 *)(ip6 + 1) + 12;

	if ((void *)(doff + 1) > data_end)
		return 0;
	return ETH_HLEN + sizeof(struct ipv6hdr) + (*doff >> 4) * 4;
}

/* The same for IPv4 (no options). */
static __always_inline __u32 fb_segment_headers(const struct iphdr *ip, void *data_end)
{
	if (ip->protocol == IPPROTO_UDP)
		return ETH_HLEN + sizeof(struct iphdr) + sizeof(struct udphdr);
	if (ip->protocol != IPPROTO_TCP)
		return 0;

	const __u8 *doff = (const __u8 *)(ip + 1) + 12;

	if ((void *)(doff + 1) > data_end)
		return 0;
	return ETH_HLEN + sizeof(struct iphdr) + (*doff >> 4) * 4;
}

/* Why a FIB lookup gave no next hop, as the pass reason the caller counts. */
static __always_inline __u32 fb_fib_pass_reason(int rc)
{
	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return FB_PASS_NO_NEIGH;
	if (rc == BPF_FIB_LKUP_RET_FWD_DISABLED)
		return FB_PASS_NOT_FORWARDING;
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED)
		return FB_PASS_TOO_BIG; /* the packet as it is: larger than the route */
	return FB_PASS_NO_ROUTE;
}

/*
 * The underlay next hop to the peer, for a packet about to grow by overhead bytes. Returns this
 * CPU's fb_nexthops entry (which the caller may take an IP ID from), or NULL with *reason set.
 *
 * The FIB is asked as the kernel's tunnels ask it (bound to the uplink), at most once per TTL per
 * peer and CPU: a lookup costs about as much as the rest of encapsulation, and its answer changes
 * only with the underlay's routes and neighbours. An unresolved neighbour goes to the kernel path,
 * which resolves it (bpf_redirect_neigh would queue the packet with its inner route attached, and
 * the queue flush would then write the inner next hop's MACs as the outer ones).
 */
static __always_inline struct fb_nexthop *fb_underlay_hop(struct __sk_buff *skb,
							  const struct fb_config *cfg, __be32 peer,
							  __s32 overhead, __u32 seg_hdr_len,
							  __u32 *reason)
{
	__u32 slot = fb_nexthop_slot(peer);
	struct fb_nexthop *hop = fb_nexthops.lookup(&slot);

	if (!hop) {
		*reason = FB_PASS_NO_ROUTE; /* cannot happen: the slot is in range */
		return NULL;
	}

	__u64 now = bpf_jiffies64(); /* inlined by the verifier: no call */

	if (hop->peer != peer || now >= hop->expires) {
		struct bpf_fib_lookup fib = {};

		fib.family = AF_INET;
		fib.ipv4_src = cfg->local_ip;
		fib.ipv4_dst = peer;
		fib.ifindex = cfg->uplink_ifindex;
		int rc = bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_OUTPUT);

		if (rc != BPF_FIB_LKUP_RET_SUCCESS) {
			*reason = fb_fib_pass_reason(rc);
			return NULL;
		}
		if (hop->peer != peer)
			hop->ip_id = (__u16)bpf_get_prandom_u32();
		hop->expires = now + FB_NEXTHOP_TTL_JIFFIES;
		hop->peer = peer;
		hop->ifindex = fib.ifindex;
		hop->mtu = fib.mtu_result;
		fb_mac_copy(hop->smac, fib.smac);
		fb_mac_copy(hop->dmac, fib.dmac);
	}
	if (!fb_fits(skb, hop, overhead, seg_hdr_len)) {
		*reason = FB_PASS_TOO_BIG;
		return NULL;
	}
	return hop;
}

#ifndef AF_INET6
#define AF_INET6 10
#endif

static __always_inline __u32 fb_nexthop6_slot(const __u8 *peer)
{
	const __u32 *words = (const __u32 *)peer; /* map values: unaligned loads are fine */

	return fb_nexthop_slot(words[0] ^ words[1] ^ words[2] ^ words[3]);
}

static __always_inline int fb_ip6_equal(const __u8 *a, const __u8 *b)
{
	const __u64 *x = (const __u64 *)a, *y = (const __u64 *)b;

	return ((x[0] ^ y[0]) | (x[1] ^ y[1])) == 0;
}

/*
 * fb_underlay_hop over the IPv6 underlay: the next hop to a peer's PublicIPv6 from ours, cached
 * per CPU in fb_nexthops6 the same way. Returns the entry, or NULL with *reason set.
 */
static __always_inline struct fb_nexthop6 *fb_underlay_hop6(struct __sk_buff *skb,
							   const struct fb_config *cfg,
							   const __u8 *peer, __u32 *reason)
{
	__u32 slot = fb_nexthop6_slot(peer);
	struct fb_nexthop6 *hop = fb_nexthops6.lookup(&slot);

	if (!hop) {
		*reason = FB_PASS_NO_ROUTE;
		return NULL;
	}

	__u64 now = bpf_jiffies64();

	if (now >= hop->expires || !fb_ip6_equal(hop->peer, peer)) {
		struct bpf_fib_lookup fib = {};

		fib.family = AF_INET6;
		__builtin_memcpy(fib.ipv6_src, cfg->local_ip6, 16);
		__builtin_memcpy(fib.ipv6_dst, peer, 16);
		fib.ifindex = cfg->uplink_ifindex;
		int rc = bpf_fib_lookup(skb, &fib, sizeof(fib), BPF_FIB_LOOKUP_OUTPUT);

		if (rc != BPF_FIB_LKUP_RET_SUCCESS) {
			*reason = fb_fib_pass_reason(rc);
			return NULL;
		}
		hop->expires = now + FB_NEXTHOP_TTL_JIFFIES;
		__builtin_memcpy(hop->peer, peer, 16);
		hop->ifindex = fib.ifindex;
		hop->mtu = fib.mtu_result;
		fb_mac_copy(hop->smac, fib.smac);
		fb_mac_copy(hop->dmac, fib.dmac);
	}
	/* Single packets only come here (see fb_vxlan6_encap). */
	if (skb->len + FB_VXLAN6_OVERHEAD > (__u32)hop->mtu + ETH_HLEN) {
		*reason = FB_PASS_TOO_BIG;
		return NULL;
	}
	return hop;
}

#endif /* FB_UNDERLAY_H */
