/* SPDX-License-Identifier: GPL-2.0 */
/*
 * VXLAN decapsulation at XDP on the uplink, before any skb exists.
 *
 * Frames for our VTEP lose their outer 50 bytes and continue up the stack as if the inner packet
 * had arrived on the uplink, so GRO merges the inner flow. The inner packet then enters with
 * iif = uplink, which a strict reverse-path filter rejects; the loader uses the tc-ingress program
 * instead when rp_filter is strict. Everything else passes untouched to the kernel (and vxlan.ko).
 * Loaded with BPF_F_XDP_HAS_FRAGS: headers are read from the linear part only.
 */
#include "common.h"
#include "maps.h"
#include "vxlan.h"

static __always_inline int fb_xdp_pass(__u32 reason, __u64 bytes)
{
	fb_count(FB_HOOK_XDP_DECAP, reason, bytes);
	return XDP_PASS;
}

int fb_xdp_decap(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u64 bytes = bpf_xdp_get_buff_len(ctx);
	struct fb_config *cfg = fb_get_config();

	if (!cfg)
		return fb_xdp_pass(FB_PASS_NO_CONFIG, bytes);

	__u32 verdict = fb_classify_vxlan(data, data_end, bytes, cfg);

	if (verdict >= FB_REASON_FIRST_DROP) {
		fb_count(FB_HOOK_XDP_DECAP, verdict, bytes);
		return XDP_DROP;
	}
	if (verdict != FB_DECAP_PASS)
		return fb_xdp_pass(verdict, bytes);

	/* The outer MACs become the inner ones: addressed to this host, so PACKET_HOST. */
	struct ethhdr *outer = data;
	__u8 dst[ETH_ALEN], src[ETH_ALEN];

	fb_mac_copy(dst, outer->h_dest);
	fb_mac_copy(src, outer->h_source);
	if (bpf_xdp_adjust_head(ctx, FB_VXLAN_OVERHEAD))
		return fb_xdp_pass(FB_PASS_ADJUST_FAILED, bytes);

	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	struct ethhdr *inner = data;

	if ((void *)(inner + 1) > data_end) {
		fb_count(FB_HOOK_XDP_DECAP, FB_DROP_WRITE_FAILED, bytes);
		return XDP_DROP;
	}
	fb_mac_copy(inner->h_dest, dst);
	fb_mac_copy(inner->h_source, src);
	fb_count(FB_HOOK_XDP_DECAP, FB_DECAP_PASS, bytes);
	return XDP_PASS;
}
