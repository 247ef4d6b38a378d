/* SPDX-License-Identifier: GPL-2.0 */
/* flannel's udp wire format: the bare inner IPv4 packet as the payload of one UDP datagram. */
#ifndef FB_UDP_H
#define FB_UDP_H

#include "common.h"
#include "flannel_bpf.h"
#include "anti_spoofing.h"

/* Outer Ethernet + IPv4 + UDP: the 42 bytes udp encapsulation writes (the 28 on the wire + L2). */
struct fb_udp_headers {
	struct ethhdr eth;
	struct iphdr ip;
	struct udphdr udp;
} __attribute__((packed));

/* The frame is UDP to our address: a udp-backend datagram whose inner packet may go on? */
static __always_inline __u32 fb_classify_udp_ours(void *data, void *data_end, __u64 frame_len,
						   const struct fb_config *cfg)
{
	struct fb_udp_headers *hdr = data;

	if (hdr->ip.version != 4 || hdr->ip.ihl != 5)
		return FB_PASS_IP_OPTIONS;
	if (hdr->ip.frag_off & bpf_htons(FB_IP_MF | FB_IP_OFFSET))
		return FB_PASS_FRAGMENT;
	if ((void *)(hdr + 1) > data_end)
		return FB_PASS_SHORT;
	if (hdr->udp.dest != cfg->port)
		return FB_PASS_NOT_OURS;

	struct iphdr *inner = (void *)(hdr + 1);

	if ((void *)(inner + 1) > data_end)
		return FB_PASS_SHORT; /* flanneld drops datagrams under 20 bytes; the socket counts them */
	if (inner->version != 4)
		return FB_PASS_INNER_NOT_IPV4;

	/* What ip_rcv() would reject after the TUN write; dropped here, where it shows. */
	__u32 inner_len = bpf_ntohs(inner->tot_len);

	if (inner->ihl < 5 || inner_len < inner->ihl * 4u ||
	    inner_len > frame_len - sizeof(struct fb_udp_headers))
		return FB_DROP_INNER_MALFORMED;

	/* Before the TTL: a stranger's datagram must not reach the socket and draw an ICMP error. */
	__u32 sources = fb_check_sources(cfg, hdr->ip.saddr, inner->saddr);

	if (sources != FB_DECAP_PASS)
		return sources;
	if (inner->ttl <= 1)
		return FB_PASS_TTL_EXPIRED;
	return FB_DECAP_PASS;
}

/*
 * Classify a frame on the uplink. Returns FB_DECAP_PASS when it is a udp-backend datagram for us
 * whose inner packet may be forwarded, otherwise the reason to leave it to the socket (or drop).
 */
static __always_inline __u32 fb_classify_udp(void *data, void *data_end, __u64 frame_len,
					      const struct fb_config *cfg)
{
	struct fb_udp_headers *hdr = data;

	if ((void *)(&hdr->eth + 1) > data_end)
		return FB_PASS_SHORT;
	if (fb_eth_proto(&hdr->eth) != bpf_htons(ETH_P_IP))
		return FB_PASS_NOT_IPV4;
	if ((void *)(&hdr->ip + 1) > data_end)
		return FB_PASS_SHORT;
	if (hdr->ip.protocol != IPPROTO_UDP || hdr->ip.daddr != cfg->local_ip)
		return FB_PASS_NOT_OURS;

	__u32 verdict = fb_classify_udp_ours(data, data_end, frame_len, cfg);

	return fb_check_kernel_bound(cfg, &hdr->ip, data_end, verdict);
}

#endif /* FB_UDP_H */
