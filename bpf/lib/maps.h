/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Every map, declared once. FB_PIN_DIR is set by the loader to this agent instance's versioned
 * pin directory, so two agents on one machine never share maps and a restarted agent finds its
 * own again (bcc reopens an existing pin instead of creating a new map).
 */
#ifndef FB_MAPS_H
#define FB_MAPS_H

#include "flannel_bpf.h"

#ifndef FB_PIN_DIR
#error "FB_PIN_DIR must be defined by the loader"
#endif

BPF_TABLE_PINNED("lpm_trie", struct fb_remote_key, struct fb_remote, fb_remotes, FB_MAX_REMOTES,
		 FB_PIN_DIR "/fb_remotes", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct fb_remote6_key, struct fb_remote6, fb_remotes6, FB_MAX_REMOTES,
		 FB_PIN_DIR "/fb_remotes6", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("array", __u32, struct fb_config, fb_config, 1, FB_PIN_DIR "/fb_config");
BPF_TABLE_PINNED("percpu_array", __u32, struct fb_counter, fb_stats, FB_STATS_ENTRIES,
		 FB_PIN_DIR "/fb_stats");
BPF_TABLE_PINNED("percpu_array", __u32, struct fb_nexthop, fb_nexthops, FB_NEXTHOP_SLOTS,
		 FB_PIN_DIR "/fb_nexthops");
BPF_TABLE_PINNED("percpu_array", __u32, struct fb_nexthop6, fb_nexthops6, FB_NEXTHOP_SLOTS,
		 FB_PIN_DIR "/fb_nexthops6");
BPF_TABLE_PINNED("hash", __be32, __u32, fb_senders, FB_MAX_SENDERS, FB_PIN_DIR "/fb_senders",
		 BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct in6_addr, __u32, fb_senders6, FB_MAX_SENDERS,
		 FB_PIN_DIR "/fb_senders6", BPF_F_NO_PREALLOC);
/* Host routing: LRU, so a flow nobody uses any more makes room by itself. */
BPF_TABLE_PINNED("lru_hash", struct fb_flow_key, struct fb_flow, fb_flows, FB_MAX_FLOWS,
		 FB_PIN_DIR "/fb_flows");
BPF_TABLE_PINNED("lru_hash", __be32, struct fb_endpoint, fb_endpoints, FB_MAX_ENDPOINTS,
		 FB_PIN_DIR "/fb_endpoints");

static __always_inline struct fb_config *fb_get_config(void)
{
	__u32 zero = 0;
	struct fb_config *cfg = fb_config.lookup(&zero);

	/* An all-zero entry exists from creation on: not configured until the port is set. */
	if (cfg && cfg->port == 0)
		return NULL;
	return cfg;
}

static __always_inline void fb_count(__u32 hook, __u32 reason, __u64 bytes)
{
	__u32 index = hook * FB_REASON_MAX + reason;
	struct fb_counter *counter = fb_stats.lookup(&index);

	/* Per-CPU slots: plain increments are safe and cheaper than atomics. */
	if (counter) {
		counter->packets++;
		counter->bytes += bytes;
	}
}

#endif /* FB_MAPS_H */
