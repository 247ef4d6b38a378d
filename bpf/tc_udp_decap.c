/* SPDX-License-Identifier: GPL-2.0 */
/*
 * flannel udp decapsulation at tc ingress on the uplink: where native XDP cannot attach, and under
 * a strict reverse-path filter. The inner packet is redirected into flannel0's ingress, so the
 * stack sees it arrive exactly as flanneld's TUN write delivers it (iif flannel0).
 *
 * Unlike the VXLAN program, GSO aggregates (a veth underlay passes a sender's aggregates through
 * unsegmented) are stripped here too: the only other taker is the agent's UDP socket, which would
 * read a whole aggregate as one datagram. The kernel segments them in software further on.
 */
#include "common.h"
#include "maps.h"
#include "udp.h"

#define FB_UDP_DECAP_MIN_LEN (sizeof(struct fb_udp_headers) + sizeof(struct iphdr))

static __always_inline int fb_tc_udp_decap_pass(__u32 reason, __u64 bytes)
{
	fb_count(FB_HOOK_TC_DECAP, reason, bytes);
	return TC_ACT_UNSPEC;
}

int fb_tc_udp_decap(struct __sk_buff *skb)
{
	__u64 bytes = skb->len;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return fb_tc_udp_decap_pass(FB_PASS_NOT_IPV4, bytes);

	struct fb_config *cfg = fb_get_config();

	if (!cfg)
		return fb_tc_udp_decap_pass(FB_PASS_NO_CONFIG, bytes);

	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;

	if (data + FB_UDP_DECAP_MIN_LEN > data_end && !skb->gso_size &&
	    skb->len >= FB_UDP_DECAP_MIN_LEN) {
		if (bpf_skb_pull_data(skb, FB_UDP_DECAP_MIN_LEN))
			return fb_tc_udp_decap_pass(FB_PASS_SHORT, bytes);
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}

	__u32 verdict = fb_classify_udp(data, data_end, bytes, cfg);

	if (verdict >= FB_REASON_FIRST_DROP) {
		fb_count(FB_HOOK_TC_DECAP, verdict, bytes);
		return TC_ACT_SHOT;
	}
	if (verdict != FB_DECAP_PASS)
		return fb_tc_udp_decap_pass(verdict, bytes);

	struct fb_udp_headers *hdr = data;
	struct iphdr *inner = (void *)(hdr + 1);

	if ((void *)(inner + 1) > data_end)
		return fb_tc_udp_decap_pass(FB_PASS_SHORT, bytes);

	/* Direct writes are safe on clones: the kernel unclones before a writing tc program runs. */
	fb_decrease_ttl(inner);

	/* FIXED_GSO: an aggregate's segments lose headers, not payload, so its MSS stays. */
	if (bpf_skb_adjust_room(skb, -FB_UDP_OVERHEAD, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_DECAP_L3_IPV4)) {
		fb_count(FB_HOOK_TC_DECAP, FB_DROP_WRITE_FAILED, bytes); /* TTL changed: no way back */
		return TC_ACT_SHOT;
	}
	fb_count(FB_HOOK_TC_DECAP, FB_DECAP_REDIRECT, bytes);
	return bpf_redirect(cfg->vtep_ifindex, BPF_F_INGRESS);
}
