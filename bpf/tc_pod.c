/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Host routing (--host-routing=bpf) at a pod's veth, on the host's side of it.
 *
 * fb_tc_pod_egress (tc ingress: what the pod sends): a packet to a remote pod subnet whose flow
 * the host stack has validated is encapsulated here and sent to the uplink, skipping the bridge,
 * routing and netfilter of this host; its TTL drops by one, as forwarding would. Its source must
 * be the pod this veth was learnt for. Anything else continues into the bridge untouched.
 *
 * fb_tc_pod_deliver (tc egress: what the host stack delivers to the pod): never changes a packet.
 * For packets that came in from the overlay (flannel.<VNI>) and were routed here by the host, it
 * records the pod (veth, MACs) in fb_endpoints and, for those marked validated, the flow in
 * fb_flows, so that tc_decap.c can hand the rest of the flow straight to the pod.
 */
#include "common.h"
#include "maps.h"
#include "host_routing.h"
#include "vxlan_encap.h"

static __always_inline int fb_pod_pass(__u32 reason, __u64 bytes)
{
	fb_count(FB_HOOK_POD_EGRESS, reason, bytes);
	return TC_ACT_OK; /* on into the bridge, the long way */
}

/* Ethernet, IPv4 without options and a TCP header without options: all the flow key, the flow
 * hash and the GSO header length read. */
#define FB_POD_HEADERS (ETH_HLEN + 20 + 20)

int fb_tc_pod_egress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u64 bytes = skb->len;
	struct iphdr *ip = NULL;

	/* A frame from a packet ring (AF_PACKET's TX_RING, trafgen) or a driver that builds skbs
	 * from pages has only its Ethernet header in the linear part; the host stack pulls the rest
	 * as it parses. Pull it here too, or every such packet would take the long way. A short
	 * frame that is linear already (the common case) costs no helper call. */
	if (data + FB_POD_HEADERS > data_end && data_end - data < skb->len) {
		__u32 want = skb->len < FB_POD_HEADERS ? skb->len : FB_POD_HEADERS;

		if (bpf_skb_pull_data(skb, want))
			return fb_pod_pass(FB_PASS_SHORT, bytes);
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
	}
	__u32 not_ipv4 = fb_frame_ipv4(skb, data, data_end, &ip);

	if (not_ipv4 || !ip)
		return fb_pod_pass(not_ipv4, bytes);

	struct fb_config *cfg = fb_get_config();

	if (!cfg || !fb_host_routing(cfg))
		return fb_pod_pass(FB_PASS_NO_CONFIG, bytes);

	struct fb_remote_key rkey = {.prefixlen = 32, .subnet = ip->daddr};
	struct fb_remote *remote = fb_remotes.lookup(&rkey);

	if (!remote)
		return fb_pod_pass(FB_PASS_NO_REMOTE, bytes);
	if (remote->flags & FB_REMOTE_SKIP)
		return fb_pod_pass(FB_PASS_SKIP, bytes);
	if (ip->ttl <= 1)
		return fb_pod_pass(FB_PASS_TTL_EXPIRED, bytes); /* the stack sends the ICMP error */

	/* Only the pod behind this veth, with its own address, goes short: no pod can borrow
	 * another's validated flow by sending with its source address. */
	struct fb_endpoint *self = fb_endpoints.lookup(&ip->saddr);

	if (!self || self->ifindex != skb->ifindex)
		return fb_pod_pass(FB_PASS_NO_ENDPOINT, bytes);

	struct fb_flow_key key;
	__u32 why = fb_flow_key_of(ip, data_end, FB_FLOW_EGRESS, &key);

	if (!why)
		why = fb_flow_check(&key);
	if (why)
		return fb_pod_pass(why, bytes);

	struct fb_inner inner;

	fb_inner_ipv4(skb, cfg, ip, data_end, &inner);
	return fb_vxlan_encap(skb, cfg, remote, &inner, FB_HOOK_POD_EGRESS, FB_ENCAP_FROM_POD,
			      bytes, 1);
}

int fb_tc_pod_deliver(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = NULL;

	if (fb_frame_ipv4(skb, data, data_end, &ip) || !ip)
		return TC_ACT_OK;

	struct fb_config *cfg = fb_get_config();

	if (!cfg || !fb_host_routing(cfg))
		return TC_ACT_OK;
	/* With br_netfilter, frames bridged from another pod of this node pass mangle POSTROUTING
	 * "-o cni0" too, and get the mark when their connection is established. They were never
	 * routed: their source MAC is that pod's, and a pod could send one to a third pod's MAC with
	 * another pod's address, teaching fb_endpoints the wrong veth for it. Only a packet the
	 * host routed in from the overlay (it entered at flannel.<VNI>) says who lives here. */
	if (skb->ingress_ifindex != cfg->vtep_ifindex)
		return TC_ACT_OK;

	/* Who lives here does not depend on the flow's validation: a pod whose only traffic in is
	 * unvalidated (a Service's replies, ICMP errors) is learnt too, so its own validated flows
	 * out can go short. Written only when new or changed: most of these packets are the long
	 * way's, NATed flows' included. */
	struct fb_endpoint *known = fb_endpoints.lookup(&ip->daddr);

	if (!known || known->ifindex != skb->ifindex || !fb_mac_equal(known->mac, eth->h_dest) ||
	    !fb_mac_equal(known->gw_mac, eth->h_source)) {
		struct fb_endpoint endpoint = {.ifindex = skb->ifindex};

		fb_mac_copy(endpoint.mac, eth->h_dest);
		fb_mac_copy(endpoint.gw_mac, eth->h_source);
		fb_endpoints.update(&ip->daddr, &endpoint);
		fb_count(FB_HOOK_POD_DELIVER, FB_POD_LEARNT, skb->len);
	}
	if (fb_flow_learn(skb, ip, data_end, FB_FLOW_INGRESS))
		fb_count(FB_HOOK_POD_DELIVER, FB_FLOW_LEARNT, skb->len);
	return TC_ACT_OK;
}
