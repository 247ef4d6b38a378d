/* SPDX-License-Identifier: GPL-2.0 */
/* Recognising VXLAN frames meant for this host's flannel VTEP; shared by both decap hooks. */
#ifndef FB_VXLAN_H
#define FB_VXLAN_H

#include "common.h"
#include "flannel_bpf.h"
#include "anti_spoofing.h"

/* An IPv6 packet inside (a peer's flannel-v6 traffic over the IPv4 underlay): what ipv6_rcv()
 * would reject anyway is dropped, then the sources are checked as for IPv4. */
static __always_inline __u32 fb_classify_inner_ipv6(void *data_end, __u64 frame_len,
						    const struct fb_config *cfg, struct iphdr *ip,
						    struct ipv6hdr *inner)
{
	if ((void *)(inner + 1) > data_end)
		return FB_PASS_SHORT;
	if (inner->version != 6 ||
	    sizeof(*inner) + bpf_ntohs(inner->payload_len) >
		    frame_len - sizeof(struct fb_encap_headers))
		return FB_DROP_INNER_MALFORMED;
	return fb_check_sources6(cfg, ip->saddr, &inner->saddr);
}

/* The frame is UDP to our address: is it VXLAN for our VTEP, and safe to strip here? */
static __always_inline __u32 fb_classify_vxlan_ours(void *data, void *data_end, __u64 frame_len,
						     const struct fb_config *cfg, struct iphdr *ip)
{
	if (ip->version != 4 || ip->ihl != 5)
		return FB_PASS_IP_OPTIONS;
	if (ip->frag_off & bpf_htons(FB_IP_MF | FB_IP_OFFSET))
		return FB_PASS_FRAGMENT;

	struct udphdr *udp = (void *)(ip + 1);

	if ((void *)(udp + 1) > data_end)
		return FB_PASS_SHORT;
	if (udp->dest != cfg->port)
		return FB_PASS_NOT_OURS;

	/* Typed pointers, not fb_encap_headers' packed fields: word loads instead of byte loads. */
	struct fb_vxlanhdr *vxlan = (void *)(udp + 1);
	struct ethhdr *inner_eth = (void *)(vxlan + 1);
	struct iphdr *inner = (void *)(inner_eth + 1);

	if ((void *)(inner + 1) > data_end)
		return FB_PASS_SHORT;
	if (vxlan->flags != bpf_htonl(FB_VXLAN_FLAGS_VNI))
		return FB_PASS_BAD_FLAGS;
	if (vxlan->vni != bpf_htonl(cfg->vni << 8))
		return FB_PASS_OTHER_VNI;
	if (!fb_mac_equal(inner_eth->h_dest, cfg->vtep_mac))
		return FB_PASS_OTHER_MAC;
	if (fb_eth_proto(inner_eth) == bpf_htons(ETH_P_IPV6))
		return fb_classify_inner_ipv6(data_end, frame_len, cfg, ip,
					      (struct ipv6hdr *)(inner_eth + 1));
	if (fb_eth_proto(inner_eth) != bpf_htons(ETH_P_IP))
		return FB_PASS_INNER_NOT_IPV4;

	/* What ip_rcv() would reject anyway; dropping here keeps it visible in our counters. */
	__u32 inner_len = bpf_ntohs(inner->tot_len);

	if (inner->version != 4 || inner->ihl < 5 || inner_len < inner->ihl * 4u ||
	    inner_len > frame_len - sizeof(struct fb_encap_headers))
		return FB_DROP_INNER_MALFORMED;
	return fb_check_sources(cfg, ip->saddr, inner->saddr);
}

/* IPv6 extension headers that may come between the fixed header and UDP: not parsed here. */
#define FB_IPV6_FRAGMENT 44

/*
 * A frame of flannel-v6.<VNI> (VXLAN over the IPv6 underlay, as flanneld's and vxlan.ko's peers
 * send IPv6 pod packets): for our PublicIPv6, UDP right after the fixed header, our VNI, to
 * flannel-v6's MAC, IPv6 inside. Its outer UDP checksum is not verified, as for IPv4: the inner
 * packet carries its own.
 */
static __always_inline __u32 fb_classify_vxlan6(void *data, void *data_end, __u64 frame_len,
						 const struct fb_config *cfg)
{
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6 = (void *)(eth + 1);

	if ((void *)(ip6 + 1) > data_end)
		return FB_PASS_SHORT;
	if (!cfg->vtep6_ifindex || !fb_addr6_equal((const __u8 *)&ip6->daddr, cfg->local_ip6))
		return FB_PASS_NOT_OURS;
	if (ip6->nexthdr == FB_IPV6_FRAGMENT)
		return FB_PASS_FRAGMENT;
	if (ip6->nexthdr != IPPROTO_UDP)
		return ip6->nexthdr == IPPROTO_TCP || ip6->nexthdr == IPPROTO_ICMPV6
			       ? FB_PASS_NOT_OURS
			       : FB_PASS_IP_OPTIONS; /* extension headers: the kernel parses them */

	struct udphdr *udp = (void *)(ip6 + 1);
	struct fb_vxlanhdr *vxlan = (void *)(udp + 1);
	struct ethhdr *inner_eth = (void *)(vxlan + 1);
	struct ipv6hdr *inner = (void *)(inner_eth + 1);

	if ((void *)(udp + 1) > data_end)
		return FB_PASS_SHORT;
	if (udp->dest != cfg->port)
		return FB_PASS_NOT_OURS;
	if ((void *)(inner_eth + 1) > data_end)
		return FB_PASS_SHORT;
	if (vxlan->flags != bpf_htonl(FB_VXLAN_FLAGS_VNI))
		return FB_PASS_BAD_FLAGS;
	if (vxlan->vni != bpf_htonl(cfg->vni << 8))
		return FB_PASS_OTHER_VNI;
	if (!fb_mac_equal(inner_eth->h_dest, cfg->vtep6_mac))
		return FB_PASS_OTHER_MAC;
	if (fb_eth_proto(inner_eth) != bpf_htons(ETH_P_IPV6))
		return FB_PASS_INNER_NOT_IPV4;
	if ((void *)(inner + 1) > data_end)
		return FB_PASS_SHORT;
	if (inner->version != 6 ||
	    sizeof(*inner) + bpf_ntohs(inner->payload_len) > frame_len - ETH_HLEN - FB_VXLAN6_OVERHEAD)
		return FB_DROP_INNER_MALFORMED;
	return fb_check_sources6_outer6(cfg, &ip6->saddr, &inner->saddr);
}

/* A frame the IPv6 classification left to the kernel: addressed to our VXLAN port from an
 * address holding no lease, it is dropped under anti-spoofing as for IPv4. */
static __always_inline __u32 fb_check_kernel_bound6(const struct fb_config *cfg, void *data,
						    void *data_end, __u32 verdict)
{
	if (!fb_checking_sources(cfg) || verdict == FB_DECAP_PASS ||
	    verdict >= FB_REASON_FIRST_DROP || verdict == FB_PASS_NOT_OURS)
		return verdict;

	struct ipv6hdr *ip6 = data + ETH_HLEN;
	struct udphdr *udp = (void *)(ip6 + 1);

	if ((void *)(udp + 1) > data_end || ip6->nexthdr != IPPROTO_UDP || udp->dest != cfg->port)
		return verdict;

	struct in6_addr src = ip6->saddr;

	if (!fb_senders6.lookup(&src))
		return FB_DROP_UNKNOWN_SENDER;
	return verdict;
}

/*
 * Classify a frame starting at data. Returns FB_DECAP_PASS when it is flannel VXLAN for us and
 * safe to strip, otherwise the reason to leave it alone (or drop it). frame_len is the whole
 * frame, linear part and fragments, so truncated inner packets are caught even with XDP frags.
 * An IPv6 frame is flannel-v6's (FB_VXLAN6_OVERHEAD to strip), an IPv4 one flannel's.
 */
static __always_inline __u32 fb_classify_vxlan(void *data, void *data_end, __u64 frame_len,
						const struct fb_config *cfg)
{
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return FB_PASS_SHORT;
	if (fb_eth_proto(eth) == bpf_htons(ETH_P_IPV6))
		return fb_check_kernel_bound6(cfg, data, data_end,
					      fb_classify_vxlan6(data, data_end, frame_len, cfg));
	if (fb_eth_proto(eth) != bpf_htons(ETH_P_IP))
		return FB_PASS_NOT_IPV4;

	struct iphdr *ip = (void *)(eth + 1);

	if ((void *)(ip + 1) > data_end)
		return FB_PASS_SHORT;
	if (ip->protocol != IPPROTO_UDP || ip->daddr != cfg->local_ip)
		return FB_PASS_NOT_OURS;

	__u32 verdict = fb_classify_vxlan_ours(data, data_end, frame_len, cfg, ip);

	return fb_check_kernel_bound(cfg, ip, data_end, verdict);
}

#endif /* FB_VXLAN_H */
