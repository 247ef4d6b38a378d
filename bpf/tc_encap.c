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
	if (eth->h_proto != bpf_htons(ETH_P_IP))
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

	struct bpf_fib_lookup fib;
	__u32 route = fb_underlay_route(skb, cfg, remote->vtep_ip, FB_VXLAN_OVERHEAD, &fib);

	if (route != FB_ENCAP_REDIRECT)
		return fb_encap_pass(route, bytes);

	struct fb_encap_headers h = {};
	__u32 inner_len = skb->len; /* the inner frame, Ethernet header included */
	__u8 inner_tos = ip->tos;

	fb_mac_copy(h.outer_eth.h_dest, fib.dmac);
	fb_mac_copy(h.outer_eth.h_source, fib.smac);
	h.outer_eth.h_proto = bpf_htons(ETH_P_IP);

	h.ip.version = 4;
	h.ip.ihl = 5;
	h.ip.tos = fb_outer_tos(inner_tos);
	h.ip.tot_len = bpf_htons(inner_len + sizeof(struct iphdr) + sizeof(struct udphdr) +
				 sizeof(struct fb_vxlanhdr));
	/* DF clear as vxlan.ko sends it; IDs random, since fragments of ours are never expected. */
	h.ip.id = (__be16)bpf_get_prandom_u32();
	h.ip.ttl = cfg->ttl;
	h.ip.protocol = IPPROTO_UDP;
	h.ip.saddr = cfg->local_ip;
	h.ip.daddr = remote->vtep_ip;
	h.ip.check = fb_ipv4_csum(&h.ip);

	/* skb_get_hash(), as vxlan.ko: the socket's or the stack's hash when set, else dissected. */
	__u32 hash = skb->hash;

	if (!hash)
		hash = bpf_get_hash_recalc(skb);
	h.udp.source = fb_flow_sport(hash, cfg->sport_min, cfg->sport_max);
	h.udp.dest = cfg->port;
	h.udp.len = bpf_htons(inner_len + sizeof(struct udphdr) + sizeof(struct fb_vxlanhdr));
	h.udp.check = 0; /* legal for IPv4 (RFC 7348) and what Cilium and Calico send */

	h.vxlan.flags = bpf_htonl(FB_VXLAN_FLAGS_VNI);
	h.vxlan.vni = bpf_htonl(cfg->vni << 8);

	/* Inner MACs as the peer's vxlan.ko requires: its VtepMAC, from our VtepMAC. */
	fb_mac_copy(h.inner_eth.h_dest, remote->vtep_mac);
	fb_mac_copy(h.inner_eth.h_source, cfg->vtep_mac);
	h.inner_eth.h_proto = bpf_htons(ETH_P_IP);

	if (bpf_skb_adjust_room(skb, FB_VXLAN_OVERHEAD, BPF_ADJ_ROOM_MAC, FB_ENCAP_FLAGS))
		return fb_encap_pass(FB_PASS_ADJUST_FAILED, bytes);
	if (bpf_skb_store_bytes(skb, 0, &h, sizeof(h), 0)) {
		fb_count(FB_HOOK_TC_ENCAP, FB_DROP_WRITE_FAILED, bytes);
		return TC_ACT_SHOT;
	}

	fb_count(FB_HOOK_TC_ENCAP, FB_ENCAP_REDIRECT, bytes);
	return bpf_redirect(fib.ifindex, 0);
}
