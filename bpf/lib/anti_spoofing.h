/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Anti-spoofing (--anti-spoofing, fb_config.flags & FB_CFG_CHECK_SOURCES), shared by every decap
 * program of both wire formats.
 *
 * A frame the program decapsulates itself must come from an underlay address holding a lease and
 * carry an inner source inside that lease's subnet (its IPv6 subnet for an inner IPv6 packet). A
 * frame it leaves to the kernel (IP options, fragments, odd VXLAN headers, neither IPv4 nor IPv6
 * inside) would still be decapsulated there, by vxlan.ko or the udp backend's socket, so when it
 * is addressed to our port it must at least come from a lease holder. Only a first fragment
 * shows the UDP port; dropping it leaves the rest to expire in reassembly.
 *
 * The outer source is trusted as the underlay delivers it: this stops strangers and misconfigured
 * or compromised peers, not a host able to forge another's underlay address.
 */
#ifndef FB_ANTI_SPOOFING_H
#define FB_ANTI_SPOOFING_H

#include "common.h"
#include "flannel_bpf.h"
#include "maps.h"

static __always_inline int fb_checking_sources(const struct fb_config *cfg)
{
	return cfg->flags & FB_CFG_CHECK_SOURCES;
}

/* For a frame about to be decapsulated: FB_DECAP_PASS or the drop reason. */
static __always_inline __u32 fb_check_sources(const struct fb_config *cfg, __be32 outer_src,
					      __be32 inner_src)
{
	if (!fb_checking_sources(cfg))
		return FB_DECAP_PASS;

	/* One longest-prefix lookup: the lease owning the inner source must be the sender's. */
	struct fb_remote_key key = { .prefixlen = 32, .subnet = inner_src };
	struct fb_remote *owner = fb_remotes.lookup(&key);

	if (owner && owner->vtep_ip == outer_src)
		return FB_DECAP_PASS;
	if (!fb_senders.lookup(&outer_src))
		return FB_DROP_UNKNOWN_SENDER;
	return FB_DROP_SPOOFED_SOURCE;
}

/* The lease (fb_remotes6 entry) whose IPv6 subnet holds an inner IPv6 source, or NULL. */
static __always_inline struct fb_remote6 *fb_owner6(const struct in6_addr *inner_src)
{
	struct fb_remote6_key key = {.prefixlen = 128};

	__builtin_memcpy(key.subnet, inner_src, sizeof(key.subnet));
	return fb_remotes6.lookup(&key);
}

/* The same for an inner IPv6 source: its lease's IPv6 subnet must be the sender's. */
static __always_inline __u32 fb_check_sources6(const struct fb_config *cfg, __be32 outer_src,
					       const struct in6_addr *inner_src)
{
	if (!fb_checking_sources(cfg))
		return FB_DECAP_PASS;

	struct fb_remote6 *owner = fb_owner6(inner_src);

	if (owner && owner->v4.vtep_ip == outer_src)
		return FB_DECAP_PASS;
	if (!fb_senders.lookup(&outer_src))
		return FB_DROP_UNKNOWN_SENDER;
	return FB_DROP_SPOOFED_SOURCE;
}

static __always_inline int fb_addr6_equal(const __u8 *a, const __u8 *b)
{
	const __u32 *x = (const __u32 *)a, *y = (const __u32 *)b;

	return ((x[0] ^ y[0]) | (x[1] ^ y[1]) | (x[2] ^ y[2]) | (x[3] ^ y[3])) == 0;
}

/* A flannel-v6 frame (IPv6 underlay): the inner source's lease must name the outer source as
 * its PublicIPv6. */
static __always_inline __u32 fb_check_sources6_outer6(const struct fb_config *cfg,
						      const struct in6_addr *outer_src,
						      const struct in6_addr *inner_src)
{
	if (!fb_checking_sources(cfg))
		return FB_DECAP_PASS;

	struct fb_remote6 *owner = fb_owner6(inner_src);
	struct in6_addr src = *outer_src;

	if (owner && fb_addr6_equal(owner->vtep_ip6, (const __u8 *)&src))
		return FB_DECAP_PASS;
	if (!fb_senders6.lookup(&src))
		return FB_DROP_UNKNOWN_SENDER;
	return FB_DROP_SPOOFED_SOURCE;
}

/* For a UDP frame to our address that the program is about to leave to the kernel. */
static __always_inline __u32 fb_check_kernel_bound(const struct fb_config *cfg, struct iphdr *ip,
						   void *data_end, __u32 verdict)
{
	if (!fb_checking_sources(cfg) || verdict == FB_DECAP_PASS ||
	    verdict >= FB_REASON_FIRST_DROP)
		return verdict;
	if (ip->ihl < 5 || ip->frag_off & bpf_htons(FB_IP_OFFSET))
		return verdict;

	struct udphdr *udp = (void *)ip + ip->ihl * 4;

	if ((void *)(udp + 1) > data_end || udp->dest != cfg->port)
		return verdict;
	if (!fb_senders.lookup(&ip->saddr))
		return FB_DROP_UNKNOWN_SENDER;
	return verdict;
}

#endif /* FB_ANTI_SPOOFING_H */
