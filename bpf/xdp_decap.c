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

/*
 * The whole frame's length, linear part and fragments, for the counters and the truncation check.
 * The helper call is skipped in the common case: an IPv4 frame whose header says it fits the
 * linear part (fragments would lie beyond it).
 */
static __always_inline __u64 fb_xdp_frame_len(struct xdp_md *ctx, void *data, void *data_end)
{
	__u64 linear = data_end - data;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct ipv6hdr *ip6 = (void *)(eth + 1);

	if ((void *)(ip + 1) <= data_end && fb_eth_proto(eth) == bpf_htons(ETH_P_IP) &&
	    ETH_HLEN + bpf_ntohs(ip->tot_len) <= linear)
		return linear;
	if ((void *)(ip6 + 1) <= data_end && fb_eth_proto(eth) == bpf_htons(ETH_P_IPV6) &&
	    ETH_HLEN + sizeof(*ip6) + bpf_ntohs(ip6->payload_len) <= linear)
		return linear;
	return bpf_xdp_get_buff_len(ctx);
}

int fb_xdp_decap(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u64 bytes = fb_xdp_frame_len(ctx, data, data_end);
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
	struct fb_macs macs = *(struct fb_macs *)data;
	int overhead = fb_eth_proto(data) == bpf_htons(ETH_P_IPV6) ? FB_VXLAN6_OVERHEAD
								    : FB_VXLAN_OVERHEAD;

	if (bpf_xdp_adjust_head(ctx, overhead))
		return fb_xdp_pass(FB_PASS_ADJUST_FAILED, bytes);

	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (data + sizeof(macs) > data_end) {
		fb_count(FB_HOOK_XDP_DECAP, FB_DROP_WRITE_FAILED, bytes);
		return XDP_DROP;
	}
	*(struct fb_macs *)data = macs;
	fb_count(FB_HOOK_XDP_DECAP, FB_DECAP_PASS, bytes);
	return XDP_PASS;
}
