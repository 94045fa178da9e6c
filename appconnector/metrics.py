"""Every metric the product exports, declared in one place (Prometheus names, served on /metrics).

Parts import the metric they update; nothing else creates metrics. Names are documented in the README.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

# --- DNS ---------------------------------------------------------------------------------------------
DNS_QUERIES = Counter("appconnector_dns_queries", "DNS queries answered, by transport and rcode",
                      ["transport", "rcode"], registry=REGISTRY)
DNS_FAST_PATH = Counter("appconnector_dns_fast_path_answers", "Answers served from the pre-built fast path",
                        registry=REGISTRY)
DNS_MALFORMED = Counter("appconnector_dns_malformed", "Queries that could not be parsed", ["transport"],
                        registry=REGISTRY)
DNS_UNKNOWN_CLIENTS = Counter("appconnector_dns_unknown_clients", "Queries refused: whois found no node",
                              registry=REGISTRY)
DNS_UPSTREAM = Counter("appconnector_dns_upstream_queries", "Upstream lookups by result",
                       ["result"], registry=REGISTRY)
DNS_UPSTREAM_IGNORED = Counter("appconnector_dns_upstream_ignored", "Upstream datagrams ignored: wrong "
                               "transaction ID or not a response (possible spoofing)", registry=REGISTRY)
DNS_UPSTREAM_CACHE = Counter("appconnector_dns_upstream_cache", "Upstream cache lookups by result (hit, miss)",
                             ["result"], registry=REGISTRY)
DNS_SERVFAIL = Counter("appconnector_dns_servfail", "SERVFAIL answers by reason "
                       "(upstream, loop, exhausted, unavailable, overloaded, tailnet, internal)", ["reason"],
                       registry=REGISTRY)
DNS_UDP_SEND_ERRORS = Counter("appconnector_dns_udp_send_errors", "UDP answers the kernel refused to send",
                              registry=REGISTRY)
DNS_DROPPED = Counter("appconnector_dns_dropped", "UDP queries dropped and TCP connections closed unanswered: "
                      "too many queries and connections already in flight", ["transport"], registry=REGISTRY)
DNS_REFUSED_BY_POLICY = Counter("appconnector_dns_refused_by_policy", "Queries refused: the source may not "
                                "use the app of the name (app \"(none)\": no [[apps]] entry covers it)",
                                ["app"], registry=REGISTRY)
ACCESS_REVOKED = Counter("appconnector_access_revoked_mappings", "Mappings released because their node lost "
                         "access to the app", registry=REGISTRY)
DNS_AAAA = Counter("appconnector_dns_aaaa_answers", "AAAA answers for steered names with pool.prefixes6 set "
                   "(v6_pool: the v6 mirror of the node's pool address; nodata: the name has no real IPv6)",
                   ["result"], registry=REGISTRY)
DNS_LOOPS = Counter("appconnector_dns_loops", "Upstream answers inside the pool (a DNS loop)", registry=REGISTRY)
DNS_SVCB = Counter("appconnector_dns_svcb_records", "Upstream HTTPS/SVCB records of steered names by outcome "
                   "(passed: sent on without address hints; foreign_target: left out, its target is not a "
                   "name we steer; malformed: the whole answer became NODATA)", ["result"], registry=REGISTRY)
DNS_FIRST_ANSWER = Histogram("appconnector_dns_new_name_seconds", "Time to answer a name with a new checkout",
                             buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
                             registry=REGISTRY)

# --- pool / replica ----------------------------------------------------------------------------------
POOL_CHECKOUTS = Counter("appconnector_pool_checkouts", "Checkouts by result (hit, new, reused, exhausted, error)",
                         ["result"], registry=REGISTRY)
POOL_CHECKOUTS_REFUSED = Counter("appconnector_pool_checkouts_refused",
                                 "Checkouts this member gave up on, by reason (queue_full: pool.max_queued_checkouts "
                                 "waiting; timeout: not committed within pool.checkout_timeout)", ["reason"],
                                 registry=REGISTRY)
POOL_EXHAUSTED = Counter("appconnector_pool_exhausted", "Checkouts refused because the node's pool is full",
                         registry=REGISTRY)
POOL_MAPPINGS = Gauge("appconnector_pool_mappings", "Mappings held in local state", registry=REGISTRY)
POOL_NODES = Gauge("appconnector_pool_nodes", "Nodes holding at least one mapping", registry=REGISTRY)
POOL_NODE_USE = Gauge("appconnector_pool_node_use_ratio", "Largest share of the pool used by one node",
                      registry=REGISTRY)
POOL_SIZE = Gauge("appconnector_pool_size", "Addresses a node may be given (pool less the DNS address)",
                  registry=REGISTRY)
POOL_TOUCHES = Counter("appconnector_pool_touches", "Last-used marks sent through Raft", registry=REGISTRY)
POOL_TOUCH_BATCHES = Counter("appconnector_pool_touch_batches", "touch_batch commands proposed", registry=REGISTRY)
POOL_CLOCK_SKEW = Counter("appconnector_pool_clock_skew",
                          "Command times more than 5 min ahead of the pool clock (clamped to it)", registry=REGISTRY)
POOL_INVALID_COMMANDS = Counter("appconnector_pool_invalid_commands",
                                "Pool commands or entries ignored as malformed (nothing changed)", registry=REGISTRY)
RAFT_ROLE = Gauge("appconnector_raft_leader", "1 when this member is the Raft leader", registry=REGISTRY)
RAFT_TERM = Gauge("appconnector_raft_term", "Current Raft term", registry=REGISTRY)
RAFT_COMMIT_LAG = Gauge("appconnector_raft_commit_lag", "Leader commit index minus local applied index",
                        registry=REGISTRY)
CLUSTER_REMOVED = Gauge("appconnector_cluster_removed",
                        "1 when this member was removed with `cluster remove` and no longer serves DNS",
                        registry=REGISTRY)
CLUSTER_MEMBERS_ADDED = Counter("appconnector_cluster_members_added",
                                "Joining connectors this member added to the cluster as leader", registry=REGISTRY)
RAFT_COMMIT_SECONDS = Histogram("appconnector_raft_commit_seconds", "Time from proposal to local apply",
                                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
                                registry=REGISTRY)
RAFT_DIVERGED = Counter("appconnector_raft_diverged", "Log truncations of applied entries (must stay 0)",
                        registry=REGISTRY)
STATE_UNTRUSTED = Gauge("appconnector_state_untrusted",
                        "1 when this member's state is marked untrusted (diverged, or a snapshot would not load): "
                        "it serves nothing until `appconnector state reset`", registry=REGISTRY)
RAFT_TICK_FAILURES = Counter("appconnector_raft_tick_failures", "Raft ticks that raised (retried with backoff)",
                             registry=REGISTRY)
RAFT_TRUNCATIONS_REFUSED = Counter("appconnector_raft_truncations_refused",
                                   "Truncations of matching entries our journal guard refused", registry=REGISTRY)
RAFT_RETRIES = Counter("appconnector_raft_retries", "Writes retried after an error or timeout", registry=REGISTRY)
STORAGE_SYNC_SECONDS = Histogram("appconnector_storage_sync_seconds",
                                 "Syncs of a member's Raft files (cluster.fsync) and their duration, by file: "
                                 "journal (msync, one per batch of entries), meta (term and vote), dump "
                                 "(snapshot before the journal is trimmed)", ["file"],
                                 buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                          0.25, 1),
                                 registry=REGISTRY)

# --- NAT ---------------------------------------------------------------------------------------------
NAT_ELEMENTS = Gauge("appconnector_nat_steer_elements", "Elements in the kernel steer map", registry=REGISTRY)
NAT_ELEMENTS6 = Gauge("appconnector_nat_steer6_elements", "Elements of the kernel steer map that are IPv6 "
                      "(in steer6: node IPv6 . v6 pool address)", registry=REGISTRY)
NAT_SEEN_FLOWS6 = Counter("appconnector_nat_seen_flows6", "(node IPv6, v6 pool address) pairs seen in new or "
                          "long flows", registry=REGISTRY)
NAT_RECONCILES = Counter("appconnector_nat_reconciles", "nftables transactions by kind (full, delta) and result",
                         ["kind", "result"], registry=REGISTRY)
NAT_TOUCHES = Counter("appconnector_nat_seen_flows", "(node, address) pairs seen in new or long flows",
                      registry=REGISTRY)
NAT_UNMAPPED_REJECTS = Gauge("appconnector_nat_unmapped_rejects", "Packets to pool addresses with no mapping, "
                             "answered with a TCP reset or ICMP admin-prohibited", registry=REGISTRY)
NAT_UNMAPPED_DROPS = Gauge("appconnector_nat_unmapped_drops", "Packets to pool addresses with no mapping, "
                           "dropped silently (over the reject rate limit)", registry=REGISTRY)
NAT_PENDING = Gauge("appconnector_nat_pending", "Steer-map keys recorded and not yet handed to the kernel "
                    "(0 while a full rebuild is pending: that is one transaction)", registry=REGISTRY)
NAT_WORKER_ERRORS = Counter("appconnector_nat_worker_errors", "NAT worker rounds that failed, by kind "
                            "(nftables: a rebuild refused; internal: a bug); each is retried with backoff",
                            ["kind"], registry=REGISTRY)
NAT_ENABLED = Gauge("appconnector_nat_enabled", "1 when the kernel dataplane is in place", registry=REGISTRY)
NAT_CONFIGURED = Gauge("appconnector_nat_configured", "1 when nat.enabled asks for the kernel dataplane",
                       registry=REGISTRY)
NAT_SEEN_READS = Counter("appconnector_nat_seen_reads", "Reads of the kernel's seen set", registry=REGISTRY)
NAT_LAST_RECONCILE = Gauge("appconnector_nat_last_reconcile_timestamp_seconds",
                           "Unix time of the last nftables transaction that succeeded", registry=REGISTRY)

# --- HTTP ------------------------------------------------------------------------------------------
HTTP_ADMIN_REFUSED = Counter("appconnector_http_admin_refused",
                             "Admin requests refused before anything was done, by reason (token, content_type)",
                             ["reason"], registry=REGISTRY)

# --- tailnet -----------------------------------------------------------------------------------------
TAILNET_WHOIS = Counter("appconnector_tailnet_whois",
                        "LocalAPI whois calls by result (hit, miss, stranger, error, refresh)",
                        ["result"], registry=REGISTRY)
TAILNET_ROUTES_WANTED = Gauge("appconnector_tailnet_routes_wanted",
                              "Pool prefixes this member should advertise (0: standalone, unmanaged or removed)",
                              registry=REGISTRY)
TAILNET_ROUTES_ADVERTISED = Gauge("appconnector_tailnet_routes_advertised",
                                  "Pool prefixes this member has advertised to tailscaled", registry=REGISTRY)
TAILNET_PEERS = Gauge("appconnector_tailnet_cluster_peers", "Tagged peers seen in status", registry=REGISTRY)
TAILNET_ROUTES_SERVED = Gauge("appconnector_tailnet_routes_served",
                              "1 when every pool route is served (primary or approved here, or primary on a "
                              "tagged connector), as tailscaled reports it", registry=REGISTRY)
