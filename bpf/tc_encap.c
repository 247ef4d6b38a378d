/* SPDX-License-Identifier: GPL-2.0 */
/*
 * VXLAN encapsulation at tc egress of flannel.<VNI> (IPv4) and flannel-v6.<VNI> (IPv6, which goes
 * over the IPv4 underlay to the peer's flannel.<VNI>, or to a peer without IPv4 over the IPv6
 * underlay as flannel-v6's frame: see fb_remotes6 in flannel_bpf.h).
 *
 * By the time a packet reaches this hook the kernel has routed it to the flannel device and the
 * neighbour layer has given it an Ethernet header, so netfilter and routing behave exactly as with
 * flanneld. We replace what vxlan.ko would do next (FDB lookup, outer headers, underlay route and
 * neighbour) with one LPM lookup and an in-place header push, in flannel's wire format. Whatever
 * we do not handle goes on untouched (TC_ACT_UNSPEC) and vxlan.ko encapsulates it as before.
 * With host routing on, this is also where pods' flows to remote pods are validated.
 */
#include "common.h"
#include "maps.h"
#include "host_routing.h"
#include "vxlan_encap.h"

static __always_inline int fb_encap_pass(__u32 reason, __u64 bytes)
{
	fb_count(FB_HOOK_TC_ENCAP, reason, bytes);
	return TC_ACT_UNSPEC; /* next filter, or on to the kernel untouched */
}

/* At flannel-v6.<VNI>: an IPv6 pod packet for a remote IPv6 subnet, to the peer's IPv4 VTEP, or
 * (FB_REMOTE_IPV6_UNDERLAY) to its PublicIPv6. */
static __always_inline int fb_tc_encap6(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u64 bytes = skb->len;
	struct ipv6hdr *ip6 = NULL;
	__u32 not_ipv6 = fb_frame_ipv6(skb, data, data_end, &ip6);

	if (not_ipv6 || !ip6)
		return fb_encap_pass(not_ipv6, bytes);

	struct fb_config *cfg = fb_get_config();

	if (!cfg)
		return fb_encap_pass(FB_PASS_NO_CONFIG, bytes);

	struct fb_remote6_key key = {.prefixlen = 128};

	__builtin_memcpy(key.subnet, &ip6->daddr, sizeof(key.subnet));
	struct fb_remote6 *remote = fb_remotes6.lookup(&key);

	if (!remote)
		return fb_encap_pass(FB_PASS_NO_REMOTE, bytes);
	if (remote->v4.flags & FB_REMOTE_SKIP)
		return fb_encap_pass(FB_PASS_SKIP, bytes);

	struct fb_inner inner;

	fb_inner_ipv6(skb, cfg, ip6, data_end, &inner);
	if (remote->v4.flags & FB_REMOTE_IPV6_UNDERLAY) {
		const __u64 *own6 = (const __u64 *)cfg->local_ip6;

		if (!(own6[0] | own6[1]))
			return fb_encap_pass(FB_PASS_SKIP, bytes); /* no PublicIPv6 to send from */
		return fb_vxlan6_encap(skb, cfg, remote, &inner, ip6, data_end, FB_HOOK_TC_ENCAP,
				       bytes);
	}
	return fb_vxlan_encap(skb, cfg, &remote->v4, &inner, FB_HOOK_TC_ENCAP, FB_ENCAP_REDIRECT, bytes,
			      0);
}

/* Attached to flannel.<VNI> and, with IPv6, to flannel-v6.<VNI>: each packet by its family. */
int fb_tc_encap(struct __sk_buff *skb)
{
	if (skb->protocol == bpf_htons(ETH_P_IPV6))
		return fb_tc_encap6(skb);

	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u64 bytes = skb->len;
	struct iphdr *ip = NULL;
	__u32 not_ipv4 = fb_frame_ipv4(skb, data, data_end, &ip);

	if (not_ipv4 || !ip)
		return fb_encap_pass(not_ipv4, bytes);

	struct fb_config *cfg = fb_get_config();

	if (!cfg)
		return fb_encap_pass(FB_PASS_NO_CONFIG, bytes);

	struct fb_remote_key key = {.prefixlen = 32, .subnet = ip->daddr};
	struct fb_remote *remote = fb_remotes.lookup(&key);

	if (!remote)
		return fb_encap_pass(FB_PASS_NO_REMOTE, bytes);
	if (remote->flags & FB_REMOTE_SKIP)
		return fb_encap_pass(FB_PASS_SKIP, bytes);
	/* The long way's end for a pod's flow to a remote pod: the host stack has routed, filtered
	 * and (not) translated this packet, and its mark says whether the flow may go short. */
	if (fb_host_routing(cfg) && fb_flow_learn(skb, ip, data_end, FB_FLOW_EGRESS))
		fb_count(FB_HOOK_TC_ENCAP, FB_FLOW_LEARNT, 0);

	struct fb_inner inner;

	fb_inner_ipv4(skb, cfg, ip, data_end, &inner);
	return fb_vxlan_encap(skb, cfg, remote, &inner, FB_HOOK_TC_ENCAP, FB_ENCAP_REDIRECT, bytes,
			      0);
}
