/* SPDX-License-Identifier: GPL-2.0 */
/* The underlay hop of an encapsulated packet; shared by both wire formats' encapsulation. */
#ifndef FB_UNDERLAY_H
#define FB_UNDERLAY_H

#include "common.h"
#include "flannel_bpf.h"

/*
 * Whether the packet still fits the uplink once wrapped in overhead bytes (GSO packets are
 * segmented to fit), and the underlay route to the peer, looked up as the kernel's tunnels do
 * (bound to the uplink). Returns FB_ENCAP_REDIRECT with fib filled, or the reason to pass.
 *
 * Only a complete answer is used. An unresolved neighbour goes to the kernel path, which resolves
 * it (bpf_redirect_neigh would queue the packet with its inner route attached, and the queue flush
 * would then write the inner next hop's MACs as the outer ones).
 */
static __always_inline __u32 fb_underlay_route(struct __sk_buff *skb, const struct fb_config *cfg,
					       __be32 peer, __s32 overhead,
					       struct bpf_fib_lookup *fib)
{
	__u32 mtu = 0;

	if (bpf_check_mtu(skb, cfg->uplink_ifindex, &mtu, overhead, 0))
		return FB_PASS_TOO_BIG;

	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = AF_INET;
	fib->ipv4_src = cfg->local_ip;
	fib->ipv4_dst = peer;
	fib->ifindex = cfg->uplink_ifindex;
	int rc = bpf_fib_lookup(skb, fib, sizeof(*fib), BPF_FIB_LOOKUP_OUTPUT);

	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return FB_PASS_NO_NEIGH;
	if (rc == BPF_FIB_LKUP_RET_FWD_DISABLED)
		return FB_PASS_NOT_FORWARDING;
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return FB_PASS_NO_ROUTE;
	return FB_ENCAP_REDIRECT;
}

#endif /* FB_UNDERLAY_H */
