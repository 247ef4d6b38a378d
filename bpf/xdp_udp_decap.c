/* SPDX-License-Identifier: GPL-2.0 */
/*
 * flannel udp decapsulation at XDP on the uplink.
 *
 * flanneld receives each datagram on its socket, decrements the inner TTL and writes the packet
 * into flannel0. Here the outer IPv4 + UDP headers are cut out in place (the Ethernet header moves
 * up 28 bytes), the TTL is decremented the same way, and the inner packet continues up the stack
 * as if it had arrived on the uplink. As with VXLAN, a strict rp_filter rejects that, and the
 * loader picks the tc-ingress program instead. Anything else goes on to the socket untouched.
 */
#include "common.h"
#include "maps.h"
#include "udp.h"

static __always_inline int fb_xdp_udp_pass(__u32 reason, __u64 bytes)
{
	fb_count(FB_HOOK_XDP_DECAP, reason, bytes);
	return XDP_PASS;
}

int fb_xdp_udp_decap(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u64 bytes = bpf_xdp_get_buff_len(ctx);
	struct fb_config *cfg = fb_get_config();

	if (!cfg)
		return fb_xdp_udp_pass(FB_PASS_NO_CONFIG, bytes);

	__u32 verdict = fb_classify_udp(data, data_end, bytes, cfg);

	if (verdict >= FB_REASON_FIRST_DROP) {
		fb_count(FB_HOOK_XDP_DECAP, verdict, bytes);
		return XDP_DROP;
	}
	if (verdict != FB_DECAP_PASS)
		return fb_xdp_udp_pass(verdict, bytes);

	struct fb_udp_headers *hdr = data;
	struct iphdr *inner = (void *)(hdr + 1);
	struct ethhdr eth;

	if ((void *)(inner + 1) > data_end) /* proven by the classifier; the verifier wants it here */
		return fb_xdp_udp_pass(FB_PASS_SHORT, bytes);
	fb_decrease_ttl(inner);
	__builtin_memcpy(&eth, &hdr->eth, sizeof(eth));
	if (bpf_xdp_adjust_head(ctx, FB_UDP_OVERHEAD))
		return fb_xdp_udp_pass(FB_PASS_ADJUST_FAILED, bytes); /* TTL already one lower: harmless */

	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	struct ethhdr *out = data;

	if ((void *)(out + 1) > data_end) {
		fb_count(FB_HOOK_XDP_DECAP, FB_DROP_WRITE_FAILED, bytes);
		return XDP_DROP;
	}
	__builtin_memcpy(out, &eth, sizeof(eth));
	fb_count(FB_HOOK_XDP_DECAP, FB_DECAP_PASS, bytes);
	return XDP_PASS;
}
