/* SPDX-License-Identifier: GPL-2.0 */
/* Protocol headers and constants, including uapi values newer than the build headers. */
#ifndef FB_COMMON_H
#define FB_COMMON_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/udp.h>

/* The build may use older uapi headers than the running kernel (Debian's 6.1 for 6.18). */
#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV4
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)
#endif
#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV6
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV6 (1ULL << 8)
#endif

#define FB_IP_DF 0x4000
#define FB_IP_MF 0x2000
#define FB_IP_OFFSET 0x1fff
#define FB_ECN_MASK 0x03
#define FB_ECN_CE 0x03
#define FB_ECN_ECT_0 0x02

struct fb_vxlanhdr {
	__be32 flags;
	__be32 vni; /* VNI in the upper 24 bits, the low byte reserved */
};

/* Outer Ethernet + IPv4 + UDP + VXLAN + inner Ethernet: the 64 bytes encapsulation writes. */
struct fb_encap_headers {
	struct ethhdr outer_eth;
	struct iphdr ip;
	struct udphdr udp;
	struct fb_vxlanhdr vxlan;
	struct ethhdr inner_eth;
} __attribute__((packed));

/* The same over the IPv6 underlay (flannel-v6.<VNI>'s frame): the 84 bytes encapsulation writes. */
struct fb_encap6_headers {
	struct ethhdr outer_eth;
	struct ipv6hdr ip6;
	struct udphdr udp;
	struct fb_vxlanhdr vxlan;
	struct ethhdr inner_eth;
} __attribute__((packed));

/* Both MAC addresses of an Ethernet header, as three words: what decapsulation carries over. */
struct fb_macs {
	__u32 words[3];
};

/* The minimum a VXLAN frame for us must hold: all of the above plus an inner IPv4 header. */
#define FB_DECAP_MIN_LEN (sizeof(struct fb_encap_headers) + sizeof(struct iphdr))
#define FB_DECAP_MIN_LEN6 (sizeof(struct fb_encap_headers) + sizeof(struct ipv6hdr))

/* struct ethhdr is packed, so clang would move h_proto a byte at a time: one 16-bit access. */
static __always_inline __be16 fb_eth_proto(const struct ethhdr *eth)
{
	return *(const __be16 *)((const __u8 *)eth + 2 * ETH_ALEN);
}

static __always_inline void fb_set_eth_proto(struct ethhdr *eth, __be16 proto)
{
	*(__be16 *)((__u8 *)eth + 2 * ETH_ALEN) = proto;
}

/*
 * MACs compared as a 4- and a 2-byte word. Only for packets and map values, where unaligned loads
 * are allowed; the verifier refuses them on the stack.
 */
static __always_inline int fb_mac_equal(const __u8 *a, const __u8 *b)
{
	return (*(const __u32 *)a ^ *(const __u32 *)b) == 0 &&
	       (*(const __u16 *)(a + 4) ^ *(const __u16 *)(b + 4)) == 0;
}

/* Byte by byte: safe for any memory, the stack included. */
static __always_inline void fb_mac_copy(__u8 *dst, const __u8 *src)
{
	dst[0] = src[0];
	dst[1] = src[1];
	dst[2] = src[2];
	dst[3] = src[3];
	dst[4] = src[4];
	dst[5] = src[5];
}

/* RFC 1071 over a 20-byte IPv4 header whose check field is zero; unrolled for the verifier. */
static __always_inline __u16 fb_ipv4_csum(const struct iphdr *ip)
{
	const __u16 *words = (const __u16 *)ip;
	__u32 sum = 0;

#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += words[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* ip_decrease_ttl(): TTL minus one, checksum fixed incrementally (RFC 1624). Needs ttl > 0. */
static __always_inline void fb_decrease_ttl(struct iphdr *ip)
{
	__u32 check = (__u32)ip->check + (__u32)bpf_htons(0x0100);

	ip->check = (__sum16)(check + (check >= 0xFFFF));
	ip->ttl--;
}

/* RFC 6040 / INET_ECN_encapsulate: the outer header carries the inner ECN, CE as ECT(0). */
static __always_inline __u8 fb_outer_tos(__u8 inner_tos)
{
	__u8 ecn = inner_tos & FB_ECN_MASK;

	return ecn == FB_ECN_CE ? FB_ECN_ECT_0 : ecn;
}

/* Bob Jenkins' lookup3 final mix over three words, as the kernel's jhash_3words(). */
static __always_inline __u32 fb_rol32(__u32 word, unsigned int shift)
{
	return (word << shift) | (word >> ((32 - shift) & 31));
}

static __always_inline __u32 fb_jhash_3words(__u32 a, __u32 b, __u32 c, __u32 initval)
{
	initval += 0xdeadbeef + (3 << 2);
	a += initval;
	b += initval;
	c += initval;
	c ^= b;
	c -= fb_rol32(b, 14);
	a ^= c;
	a -= fb_rol32(c, 11);
	b ^= a;
	b -= fb_rol32(a, 25);
	c ^= b;
	c -= fb_rol32(b, 16);
	a ^= c;
	a -= fb_rol32(c, 4);
	b ^= a;
	b -= fb_rol32(a, 14);
	c ^= b;
	c -= fb_rol32(b, 24);
	return c;
}

/*
 * The flow hash an outer source port is made from: the packet's own when it has one (its socket's,
 * or the receiving NIC's), exactly as vxlan.ko reads it. A packet without one (ICMP, unconnected
 * UDP) gets a hash of its addresses, protocol and ports, seeded per node; the kernel would run its
 * flow dissector instead, which costs more than the rest of encapsulation. The hash is stored in
 * the skb, so the uplink's queue selection and vxlan.ko, for packets of the flow that we leave to
 * it, use the same one: one flow, one source port, whichever path it takes.
 */
static __always_inline __u32 fb_flow_hash(struct __sk_buff *skb, const struct iphdr *ip,
					  void *data_end, __u32 seed)
{
	__u32 hash = skb->hash;

	if (hash)
		return hash;

	__u32 ports = 0;

	if (!(ip->frag_off & bpf_htons(FB_IP_MF | FB_IP_OFFSET)) &&
	    (ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP ||
	     ip->protocol == IPPROTO_SCTP || ip->protocol == IPPROTO_UDPLITE)) {
		const __u32 *l4 = (const void *)(ip + 1); /* callers accept ihl == 5 only */

		if ((void *)(l4 + 1) <= data_end)
			ports = *l4;
	}
	hash = fb_jhash_3words(ip->saddr, ip->daddr, ports, seed ^ ip->protocol);
	if (!hash)
		hash = 1; /* 0 means "none" to the kernel */
	bpf_set_hash(skb, hash);
	return hash;
}

/*
 * fb_flow_hash for an IPv6 packet: the skb's own hash, else one of its addresses (each folded to
 * a word), next header and ports when the next header is TCP/UDP/SCTP/UDP-Lite itself.
 */
static __always_inline __u32 fb_flow_hash6(struct __sk_buff *skb, const struct ipv6hdr *ip6,
					   void *data_end, __u32 seed)
{
	__u32 hash = skb->hash;

	if (hash)
		return hash;

	const __u32 *s = (const __u32 *)&ip6->saddr;
	const __u32 *d = (const __u32 *)&ip6->daddr;
	__u8 next = ip6->nexthdr;
	__u32 ports = 0;

	if (next == IPPROTO_TCP || next == IPPROTO_UDP || next == IPPROTO_SCTP ||
	    next == IPPROTO_UDPLITE) {
		const __u32 *l4 = (const void *)(ip6 + 1);

		if ((void *)(l4 + 1) <= data_end)
			ports = *l4;
	}
	hash = fb_jhash_3words(s[0] ^ s[1] ^ s[2] ^ s[3], d[0] ^ d[1] ^ d[2] ^ d[3], ports,
			       seed ^ next);
	if (!hash)
		hash = 1;
	bpf_set_hash(skb, hash);
	return hash;
}

/* An IPv6 header's traffic class (its TOS byte). */
static __always_inline __u8 fb_ipv6_tclass(const struct ipv6hdr *ip6)
{
	return (ip6->priority << 4) | (ip6->flow_lbl[0] >> 4);
}

/* The kernel's udp_flow_src_port(): a flow hash folded into [min, max). */
static __always_inline __be16 fb_flow_sport(__u32 hash, __u16 min, __u16 max)
{
	hash ^= hash << 16;
	return bpf_htons((__u16)((((__u64)hash * (max - min)) >> 32) + min));
}

#endif /* FB_COMMON_H */
