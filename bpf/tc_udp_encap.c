/* SPDX-License-Identifier: GPL-2.0 */
/*
 * flannel udp encapsulation at tc egress of flannel0, the udp backend's TUN device.
 *
 * flanneld reads every packet routed to flannel0 in userspace, decrements its TTL and sends it as
 * one UDP datagram from IfaceAddr:Port to PublicIP:Port. Here the kernel does the same without the
 * copies: the packet is wrapped in place and sent straight out of the uplink. Whatever we do not
 * handle (no lease for the destination, TTL expiring, no usable underlay route) goes on into the
 * TUN device, where the agent's userspace plane treats it exactly as flanneld would, ICMP
 * included.
 *
 * flannel0 is an L3 device: the packet starts at its IPv4 header. An Ethernet header is pushed
 * first (bpf_skb_change_head, meant for this L3-to-L2 redirect), then the outer IPv4 + UDP headers
 * behind it with the tunnel flags, so GSO packets are segmented correctly on the uplink.
 * BPF_PROG_TEST_RUN always builds Ethernet frames for tc programs, so this one is tested on a
 * real TUN device (tests/test_lab_bpf.py), not with crafted frames.
 */
#include "common.h"
#include "maps.h"
#include "udp.h"
#include "underlay.h"

#define FB_UDP_ENCAP_FLAGS \
	(BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP)

static __always_inline int fb_udp_encap_pass(__u32 reason, __u64 bytes)
{
	fb_count(FB_HOOK_TC_ENCAP, reason, bytes);
	return TC_ACT_UNSPEC; /* on into the TUN device: the userspace plane */
}

int fb_tc_udp_encap(struct __sk_buff *skb)
{
	__u64 bytes = skb->len;

	if (skb->protocol != bpf_htons(ETH_P_IP))
		return fb_udp_encap_pass(FB_PASS_NOT_IPV4, bytes);

	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct iphdr *ip = data;

	if ((void *)(ip + 1) > data_end) {
		if (skb->len < sizeof(*ip) || bpf_skb_pull_data(skb, sizeof(*ip)))
			return fb_udp_encap_pass(FB_PASS_SHORT, bytes);
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		ip = data;
		if ((void *)(ip + 1) > data_end)
			return fb_udp_encap_pass(FB_PASS_SHORT, bytes);
	}
	if (ip->version != 4)
		return fb_udp_encap_pass(FB_PASS_NOT_IPV4, bytes);

	struct fb_config *cfg = fb_get_config();

	if (!cfg)
		return fb_udp_encap_pass(FB_PASS_NO_CONFIG, bytes);

	struct fb_remote_key key = {.prefixlen = 32, .subnet = ip->daddr};
	struct fb_remote *remote = fb_remotes.lookup(&key);

	if (!remote)
		return fb_udp_encap_pass(FB_PASS_NO_REMOTE, bytes); /* the plane answers net unreachable */
	if (remote->flags & FB_REMOTE_SKIP)
		return fb_udp_encap_pass(FB_PASS_SKIP, bytes);
	if (ip->ttl <= 1)
		return fb_udp_encap_pass(FB_PASS_TTL_EXPIRED, bytes);
	/* Only TCP aggregates can take the tunnel GSO type (bpf_skb_adjust_room refuses UDP GSO). */
	if (skb->gso_size && ip->protocol != IPPROTO_TCP)
		return fb_udp_encap_pass(FB_PASS_GSO, bytes);

	/* The packet gains an Ethernet header too: it has none on flannel0. */
	__u32 reason = FB_ENCAP_REDIRECT;
	__u32 seg_hdr_len = fb_segment_headers(ip, data_end); /* counts an Ethernet header ... */
	struct fb_nexthop *hop = fb_underlay_hop(skb, cfg, remote->vtep_ip,
						 FB_UDP_OVERHEAD + ETH_HLEN, /* ... added here */
						 seg_hdr_len ? seg_hdr_len - ETH_HLEN : 0, &reason);

	/* An unresolved neighbour goes to the plane, whose socket resolves it. */
	if (!hop)
		return fb_udp_encap_pass(reason, bytes);

	/* flanneld's sender decrements the inner TTL once, on top of the kernel's forwarding. */
	fb_decrease_ttl(ip);

	struct fb_udp_headers h = {};
	__u32 inner_len = skb->len;

	fb_mac_copy(h.eth.h_dest, hop->dmac);
	fb_mac_copy(h.eth.h_source, hop->smac);
	h.eth.h_proto = bpf_htons(ETH_P_IP);

	/* As flanneld's UDP socket sends: TOS 0, DF set (path MTU discovery on), the default TTL. */
	h.ip.version = 4;
	h.ip.ihl = 5;
	h.ip.tot_len = bpf_htons(inner_len + FB_UDP_OVERHEAD);
	h.ip.id = bpf_htons(hop->ip_id++);
	h.ip.frag_off = bpf_htons(FB_IP_DF);
	h.ip.ttl = cfg->ttl;
	h.ip.protocol = IPPROTO_UDP;
	h.ip.saddr = cfg->local_ip;
	h.ip.daddr = remote->vtep_ip;
	h.ip.check = fb_ipv4_csum(&h.ip);

	/* The socket is bound to IfaceAddr:Port and sends to PublicIP:Port. */
	h.udp.source = cfg->port;
	h.udp.dest = cfg->port;
	h.udp.len = bpf_htons(inner_len + sizeof(struct udphdr));
	h.udp.check = 0; /* legal for IPv4; receivers' sockets accept it */

	if (bpf_skb_change_head(skb, ETH_HLEN, 0))
		return fb_udp_encap_pass(FB_PASS_ADJUST_FAILED, bytes);
	/* From here on the packet is no longer what the TUN device expects: failures drop it. */
	if (bpf_skb_adjust_room(skb, FB_UDP_OVERHEAD, BPF_ADJ_ROOM_MAC, FB_UDP_ENCAP_FLAGS) ||
	    bpf_skb_store_bytes(skb, 0, &h, sizeof(h), 0)) {
		fb_count(FB_HOOK_TC_ENCAP, FB_DROP_WRITE_FAILED, bytes);
		return TC_ACT_SHOT;
	}

	fb_count(FB_HOOK_TC_ENCAP, FB_ENCAP_REDIRECT, bytes);
	return bpf_redirect(hop->ifindex, 0);
}
