/* SPDX-License-Identifier: GPL-2.0 */
/*
 * VXLAN encapsulation at tc egress of flannel.<VNI>.
 *
 * By the time a packet reaches this hook the kernel has routed it to the flannel device and the
 * neighbour layer has given it an Ethernet header, so netfilter and routing behave exactly as with
 * flanneld. We replace what vxlan.ko would do next (FDB lookup, outer headers, underlay route and
 * neighbour) with one LPM lookup and an in-place header push, in flannel's wire format. Whatever
 * we do not handle goes on untouched (TC_ACT_UNSPEC) and vxlan.ko encapsulates it as before.
 */
#include "common.h"
#include "maps.h"
#include "underlay.h"

/* ENCAP_L2(14), not 14 + 8: with the VXLAN header counted, every GSO packet is dropped. */
#define FB_ENCAP_FLAGS                                                                          \
	(BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP |  \
	 BPF_F_ADJ_ROOM_ENCAP_L2_ETH | BPF_F_ADJ_ROOM_ENCAP_L2(ETH_HLEN))

static __always_inline int fb_encap_pass(__u32 reason, __u64 bytes)
{
	fb_count(FB_HOOK_TC_ENCAP, reason, bytes);
	return TC_ACT_UNSPEC; /* next filter, or on to the kernel untouched */
}

int fb_tc_encap(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u64 bytes = skb->len;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return fb_encap_pass(FB_PASS_NOT_IPV4, bytes);
	if ((void *)(ip + 1) > data_end)
		return fb_encap_pass(FB_PASS_SHORT, bytes);
	if (fb_eth_proto(eth) != bpf_htons(ETH_P_IP))
		return fb_encap_pass(FB_PASS_NOT_IPV4, bytes);
	if (ip->version != 4 || ip->ihl != 5)
		return fb_encap_pass(FB_PASS_IP_OPTIONS, bytes);

	struct fb_config *cfg = fb_get_config();

	if (!cfg)
		return fb_encap_pass(FB_PASS_NO_CONFIG, bytes);

	struct fb_remote_key key = {.prefixlen = 32, .subnet = ip->daddr};
	struct fb_remote *remote = fb_remotes.lookup(&key);

	if (!remote)
		return fb_encap_pass(FB_PASS_NO_REMOTE, bytes);
	if (remote->flags & FB_REMOTE_SKIP)
		return fb_encap_pass(FB_PASS_SKIP, bytes);

	__u32 hash = fb_flow_hash(skb, ip, data_end, cfg->local_ip);
	__u32 reason = FB_ENCAP_REDIRECT;
	struct fb_nexthop *hop = fb_underlay_hop(skb, cfg, remote->vtep_ip, FB_VXLAN_OVERHEAD, &reason);

	if (!hop)
		return fb_encap_pass(reason, bytes);

	/* The outer IPv4 header, built before the packet moves: it needs the inner TOS. */
	__u32 inner_len = skb->len; /* the inner frame, Ethernet header included */
	struct iphdr outer_ip = {
		.version = 4,
		.ihl = 5,
		.tos = fb_outer_tos(ip->tos),
		.tot_len = bpf_htons(inner_len + FB_VXLAN_OVERHEAD - sizeof(struct ethhdr)),
		/* DF clear as vxlan.ko sends it; the ID counts per peer and CPU from a random start. */
		.id = bpf_htons(hop->ip_id++),
		.ttl = cfg->ttl,
		.protocol = IPPROTO_UDP,
		.saddr = cfg->local_ip,
		.daddr = remote->vtep_ip,
	};

	outer_ip.check = fb_ipv4_csum(&outer_ip);
	if (bpf_skb_adjust_room(skb, FB_VXLAN_OVERHEAD, BPF_ADJ_ROOM_MAC, FB_ENCAP_FLAGS))
		return fb_encap_pass(FB_PASS_ADJUST_FAILED, bytes);

	/* Written in place: no helper call per header. */
	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	struct fb_encap_headers *h = data;

	if ((void *)(h + 1) > data_end) {
		fb_count(FB_HOOK_TC_ENCAP, FB_DROP_WRITE_FAILED, bytes);
		return TC_ACT_SHOT;
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
	udp->source = fb_flow_sport(hash, cfg->sport_min, cfg->sport_max);
	udp->dest = cfg->port;
	udp->len = bpf_htons(inner_len + sizeof(struct udphdr) + sizeof(struct fb_vxlanhdr));
	udp->check = 0; /* legal for IPv4 (RFC 7348) and what Cilium and Calico send */
	vxlan->flags = bpf_htonl(FB_VXLAN_FLAGS_VNI);
	vxlan->vni = bpf_htonl(cfg->vni << 8);
	/* Inner MACs as the peer's vxlan.ko requires: its VtepMAC, from our VtepMAC. */
	__builtin_memcpy(inner_eth->h_dest, remote->vtep_mac, ETH_ALEN);
	__builtin_memcpy(inner_eth->h_source, cfg->vtep_mac, ETH_ALEN);
	fb_set_eth_proto(inner_eth, bpf_htons(ETH_P_IP));

	fb_count(FB_HOOK_TC_ENCAP, FB_ENCAP_REDIRECT, bytes);
	return bpf_redirect(hop->ifindex, 0);
}
