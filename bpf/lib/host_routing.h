/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Host routing's flow cache: which connections the host stack has validated (flannel_bpf.h,
 * "Host routing"), looked up by the short ways and written where the long way ends.
 */
#ifndef FB_HOST_ROUTING_H
#define FB_HOST_ROUTING_H

#include "common.h"
#include "flannel_bpf.h"
#include "maps.h"

#define FB_TCP_CONTROL 0x07 /* FIN, SYN, RST in the TCP flags byte */

static __always_inline int fb_host_routing(const struct fb_config *cfg)
{
	return cfg->flags & FB_CFG_HOST_ROUTING;
}

/*
 * The flow key of an IPv4 packet (no options, checked by the caller) in direction dir. Returns 0,
 * or the FB_PASS_* reason it has none: not TCP, UDP or ICMP, a fragment, headers not in the
 * linear part, or a TCP segment with SYN, FIN or RST (those always take the long way).
 */
static __always_inline __u32 fb_flow_key_of(const struct iphdr *ip, void *data_end, __u8 dir,
					    struct fb_flow_key *key)
{
	if (ip->frag_off & bpf_htons(FB_IP_MF | FB_IP_OFFSET))
		return FB_PASS_NO_PORTS;
	key->saddr = ip->saddr;
	key->daddr = ip->daddr;
	key->proto = ip->protocol;
	key->dir = dir;
	key->pad = 0;
	key->sport = 0;
	key->dport = 0;
	if (ip->protocol == IPPROTO_ICMP)
		return 0;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
		return FB_PASS_NO_PORTS;

	const __be16 *ports = (const void *)(ip + 1);

	if ((void *)(ports + 2) > data_end)
		return FB_PASS_SHORT;
	key->sport = ports[0];
	key->dport = ports[1];
	if (ip->protocol == IPPROTO_TCP) {
		const __u8 *flags = (const __u8 *)(ip + 1) + 13;

		if ((void *)(flags + 1) > data_end)
			return FB_PASS_SHORT;
		if (*flags & FB_TCP_CONTROL)
			return FB_PASS_TCP_CONTROL;
	}
	return 0;
}

/* Whether the flow may take the short way now: 0, or the FB_PASS_* reason it may not. */
static __always_inline __u32 fb_flow_check(const struct fb_flow_key *key)
{
	struct fb_flow *flow = fb_flows.lookup(key);

	if (!flow)
		return FB_PASS_NOT_VALIDATED;
	if (bpf_ktime_get_ns() >= flow->expires)
		return FB_PASS_REVALIDATE;
	return 0;
}

/* Where the long way ends: a packet the host stack marked validated renews its flow. */
static __always_inline int fb_flow_learn(struct __sk_buff *skb, const struct iphdr *ip,
					 void *data_end, __u8 dir)
{
	struct fb_flow_key key;

	if (!(skb->mark & FB_MARK_VALIDATED))
		return 0;

	__u32 why = fb_flow_key_of(ip, data_end, dir, &key);

	if (why == FB_PASS_TCP_CONTROL) {
		/* A FIN or RST ends the flow's shortcut: what follows goes the long way. */
		fb_flows.delete(&key);
		return 0;
	}
	if (why)
		return 0;

	struct fb_flow flow = {.expires = bpf_ktime_get_ns() + FB_FLOW_TTL_NS};

	fb_flows.update(&key, &flow);
	return 1;
}

#endif /* FB_HOST_ROUTING_H */
