//! The commented example configuration `ringtun print-default-config` prints: every node key with
//! its default value and what it is for, plus a small mesh (a host-mode HBONE workload on this
//! node, a plain-TCP workload on another node, and a service in front of it) and a commented
//! authorization policy. Its tests keep it loadable and in step with the defaults the validator
//! applies.

/// A complete, valid configuration; each node key shows its default.
pub const DEFAULT_CONFIG_YAML: &str = r#"# ringtun node configuration. Check a file with `ringtun check-config <file>`.
version: 1                        # required; the only version this ringtun reads

node:
  name: node-a                    # required; workloads whose `node` equals it are served here
  trust_domain: cluster.local     # SPIFFE trust domain of mesh identities
  root_namespace: istio-system    # a policy here applies mesh-wide (with a selector: in every namespace)
  reactors: auto                  # reactor threads: `auto` (one per core) or 1..=256
  pin_reactors: true              # pin reactor N to CPU N (off when nodes share a machine)
  driver: auto                    # auto (io_uring, else epoll) | io_uring | epoll
  socket_mark: 0x539              # SO_MARK on ringtun's own sockets so capture rules skip them
  deliver_client_address: auto    # inbound reaches the app from the client's address: auto (where
                                  # the capture rules route replies back) | on (required) | off
  ports:                          # listeners inside every captured workload; must be distinct
    outbound: 15001               # outbound capture (nat REDIRECT)
    inbound_plaintext: 15006      # inbound plain TCP (TPROXY)
    inbound_hbone: 15008          # inbound mesh tunnels (mTLS HTTP/2 CONNECT)
  admin: 127.0.0.1:15000          # admin endpoint (keep it on loopback), or `off`
  metrics: 0.0.0.0:15020          # Prometheus metrics, or `off`
  readiness: 0.0.0.0:15021        # readiness probe, or `off`
  timeouts:                       # durations: <integer> then ms, s, m or h
    connect: 5s                   # upstream connect, then the connection fails
    handshake: 2s                 # TLS handshake of a connection to 15008 (at most `connect`)
    idle: 1h                      # a flow with no bytes either way is closed
    drain: 30s                    # on SIGTERM, how long open flows may finish
  limits:                         # per-reactor resource caps
    max_flows_per_reactor: 16384  # accepts beyond this are refused and counted (the fd budget may cap it lower)
    max_handshakes_per_reactor: 256  # connections to 15008 still in their TLS handshake
    max_handshakes_per_source: 16    # of those, from one client address (IPv6: one /64)
    max_tunnels_per_peer: 256     # server tunnels per peer identity and per peer address
    flow_receive_buffer: 131072   # SO_RCVBUF of a flow's sockets (not tunnels); 0: kernel autotuning
  splice:                         # the zero-copy fast path (pipes between sockets)
    pipe_size: 262144             # bytes per pipe (F_SETPIPE_SZ), 4096..=16 MiB
    max_bytes_per_wakeup: 1048576 # per flow direction before yielding to other flows
    pipe_pool_size: 64            # empty pipes kept per reactor for reuse
    pipes_per_reactor: 256        # pipes carrying bytes at once (2 fds each); beyond, bytes are copied
  hbone:                          # mesh tunnels (used when `tls` below is set)
    max_streams_per_tunnel: 100   # connections one pooled outbound tunnel carries (ztunnel: 100)
    keepalive_interval: 10s       # PING the peer this often (`off`: never)
    keepalive_timeout: 20s        # a PING unanswered this long closes the tunnel (a lost peer)
    pool_idle_timeout: 5m         # an outbound tunnel without connections this long is closed (inbound: 2×)
    ktls: auto                    # auto (kernel TLS when offered) | off (always rustls)
    ktls_record_budget: 8388608   # TLS records per key: then a key update, or a new tunnel (< 2^24)
    cipher: any                   # any (AES-128-GCM preferred) | aes_128_gcm | aes_256_gcm
    zero_copy: true               # kTLS: splice DATA payload (false: copy it once each way)
  # Mutual TLS for HBONE tunnels (optional; `ringtun certs --config <file>` makes dev certs).
  # tls:
  #   trust_bundle: /etc/ringtun/certs/ca.pem    # PEM CA certificates peers must chain to
  #   certificate_dir: /etc/ringtun/certs        # <dir>/<ns>/<sa>/cert.pem and key.pem
  #   # Or node CA mode instead of certificate_dir: ringtun issues its own workloads'
  #   # certificates from an intermediate CA, in memory, renewed at half their lifetime.
  #   # node_ca: {certificate: /etc/ringtun/node-ca.pem, key: /etc/ringtun/node-ca-key.pem, certificate_lifetime: 1h}

workloads:
  # Host mode: the one local workload without `netns` is the host itself. In pod mode each
  # local workload names its network namespace instead, e.g. `netns: pod-client`
  # (= /var/run/netns/pod-client) or an absolute path.
  - name: client
    namespace: default
    service_account: client       # default `default`; identity ns/default/sa/client
    ips: [10.1.1.2]
    node: node-a                  # this node: served by this process
    protocol: HBONE               # HBONE (mTLS tunnel, the default) | TCP
    healthy: true                 # unhealthy workloads are never chosen as endpoints
    labels: {app: client}         # Kubernetes labels, for policy selectors
  # A workload on another node that accepts only plain TCP.
  - name: echo-1
    namespace: default
    ips: [10.1.2.2]
    node: node-b
    protocol: TCP

services:
  - name: echo
    namespace: default
    vips: [10.96.0.10]            # may not be any workload's own address
    ports:
      - {port: 80, target_port: 8080}
    endpoints: [default/echo-1]   # `namespace/name`, or `name` in the service's namespace

# Authorization policies: Istio's AuthorizationPolicy (name, namespace and the spec's fields,
# keys in snake_case), as a node proxy reads it: L4 fields only. Checked by `check-config`;
# the data path does not enforce them yet. Uncomment to try:
# policies:
#   - name: allow-client-peers
#     namespace: default
#     selector: {match_labels: {app: client}}  # none: the whole namespace (root namespace: the mesh)
#     action: ALLOW                 # ALLOW (the default) | DENY | AUDIT (log only); once an ALLOW
#                                   # applies to a workload, connections no ALLOW matches are denied
#     rules:                        # any rule; within a rule every part; within a part any entry
#       - from: [{source: {principals: [cluster.local/ns/default/sa/echo-*]}}]
#         to: [{operation: {ports: [8080]}}]
#       # also: namespaces, service_accounts, ip_blocks and not_* of each; `when` on source.ip,
#       # source.namespace, source.principal, destination.ip, destination.port. HTTP fields
#       # (methods, paths, headers…) cannot be seen here: such a rule matches nothing in an
#       # ALLOW policy and everything in a DENY one (check-config warns).
#       - from: [{source: {ip_blocks: [10.1.0.0/16]}}]
#         when: [{key: destination.port, values: ["9090"]}]
"#;

#[cfg(test)]
mod tests {
    use super::super::validate::{
        DEFAULT_ADMIN, DEFAULT_LIMITS, DEFAULT_METRICS, DEFAULT_PORTS, DEFAULT_READINESS,
        DEFAULT_ROOT_NAMESPACE, DEFAULT_SOCKET_MARK, DEFAULT_SPLICE, DEFAULT_TIMEOUTS,
        DEFAULT_TRUST_DOMAIN,
    };
    use super::super::{load, ClientAddressChoice, DriverChoice, Protocol};
    use super::DEFAULT_CONFIG_YAML;

    #[test]
    fn default_config_loads_without_errors() {
        let cfg = match load(DEFAULT_CONFIG_YAML) {
            Ok(cfg) => cfg,
            Err(e) => panic!("default config has errors:\n{e}"),
        };
        assert_eq!(cfg.workloads.len(), 2);
        assert_eq!(cfg.services.len(), 1);
        assert_eq!(
            cfg.workloads[0].netns, None,
            "the local example is host mode"
        );
        assert_eq!(cfg.workloads[0].protocol, Protocol::Hbone);
        assert_eq!(cfg.workloads[1].protocol, Protocol::Tcp);
    }

    #[test]
    fn default_config_shows_the_defaults_the_validator_applies() {
        let Ok(cfg) = load(DEFAULT_CONFIG_YAML) else {
            panic!("default config must load")
        };
        let n = &cfg.node;
        assert_eq!(n.trust_domain, DEFAULT_TRUST_DOMAIN);
        assert_eq!(n.root_namespace, DEFAULT_ROOT_NAMESPACE);
        assert_eq!(n.reactors, None);
        assert_eq!(n.driver, DriverChoice::Auto);
        assert_eq!(n.socket_mark, DEFAULT_SOCKET_MARK);
        assert_eq!(n.deliver_client_address, ClientAddressChoice::Auto);
        assert_eq!(n.ports, DEFAULT_PORTS);
        assert_eq!(n.admin_addr, DEFAULT_ADMIN.parse().ok());
        assert_eq!(n.metrics_addr, DEFAULT_METRICS.parse().ok());
        assert_eq!(n.readiness_addr, DEFAULT_READINESS.parse().ok());
        assert_eq!(n.timeouts, DEFAULT_TIMEOUTS);
        assert_eq!(n.limits, DEFAULT_LIMITS);
        assert_eq!(n.splice, DEFAULT_SPLICE);
        assert_eq!(n.hbone, super::super::DEFAULT_HBONE);
        assert_eq!(
            n.hbone.ktls_record_budget,
            crate::tls::ktls::TX_RECORD_BUDGET,
            "the default retirement budget is the kTLS module's"
        );
        // A node section with only the name must come out identical.
        let Ok(minimal) = load("version: 1\nnode:\n  name: node-a\n") else {
            panic!("minimal config must load")
        };
        assert_eq!(minimal.node, cfg.node);
    }

    #[test]
    fn commented_tls_example_loads_once_uncommented() {
        let text = DEFAULT_CONFIG_YAML
            .replace("  # tls:", "  tls:")
            .replace("  #   trust_bundle:", "    trust_bundle:")
            .replace("  #   certificate_dir:", "    certificate_dir:");
        let cfg = match load(&text) {
            Ok(cfg) => cfg,
            Err(e) => panic!("uncommented tls example has errors:\n{e}"),
        };
        let tls = cfg.node.tls.expect("tls section");
        assert_eq!(tls.trust_bundle.to_str(), Some("/etc/ringtun/certs/ca.pem"));
        assert_eq!(
            tls.certificate_dir.as_deref().and_then(|d| d.to_str()),
            Some("/etc/ringtun/certs")
        );
        // The node CA example, uncommented in place of the directory.
        let text = DEFAULT_CONFIG_YAML
            .replace("  # tls:", "  tls:")
            .replace("  #   trust_bundle:", "    trust_bundle:")
            .replace("  #   # node_ca:", "    node_ca:");
        let cfg = match load(&text) {
            Ok(cfg) => cfg,
            Err(e) => panic!("uncommented node CA example has errors:\n{e}"),
        };
        let ca = cfg.node.tls.and_then(|t| t.node_ca).expect("node_ca");
        assert_eq!(ca.certificate.to_str(), Some("/etc/ringtun/node-ca.pem"));
        assert_eq!(
            ca.certificate_lifetime,
            std::time::Duration::from_secs(3600)
        );
    }

    #[test]
    fn commented_policy_example_loads_once_uncommented() {
        let (head, example) = DEFAULT_CONFIG_YAML
            .split_once("# policies:")
            .expect("the default config has a policy example");
        let uncommented: String = format!("# policies:{example}")
            .lines()
            .map(|l| l.strip_prefix("# ").unwrap_or(l))
            .map(|l| format!("{l}\n"))
            .collect();
        let checked = match super::super::check(&format!("{head}{uncommented}")) {
            Ok(c) => c,
            Err(e) => panic!("uncommented policy example has errors:\n{e}"),
        };
        assert!(checked.warnings.is_empty(), "{:?}", checked.warnings);
        let p = &checked.config.policies[0];
        assert_eq!(
            (p.namespace.as_str(), p.name.as_str()),
            ("default", "allow-client-peers")
        );
        assert_eq!(p.rules.len(), 2);
        assert_eq!(
            checked.config.workloads[0]
                .labels
                .get("app")
                .map(String::as_str),
            Some("client")
        );
    }

    #[test]
    fn default_config_shows_every_node_key_with_a_comment() {
        for key in [
            "name:",
            "trust_domain:",
            "root_namespace:",
            "reactors:",
            "pin_reactors:",
            "driver:",
            "socket_mark:",
            "deliver_client_address:",
            "ports:",
            "outbound:",
            "inbound_plaintext:",
            "inbound_hbone:",
            "admin:",
            "metrics:",
            "readiness:",
            "timeouts:",
            "connect:",
            "idle:",
            "drain:",
            "limits:",
            "max_flows_per_reactor:",
            "handshake:",
            "max_handshakes_per_reactor:",
            "max_handshakes_per_source:",
            "max_tunnels_per_peer:",
            "flow_receive_buffer:",
            "splice:",
            "pipe_size:",
            "max_bytes_per_wakeup:",
            "pipe_pool_size:",
            "pipes_per_reactor:",
            "hbone:",
            "max_streams_per_tunnel:",
            "pool_idle_timeout:",
            "ktls:",
            "ktls_record_budget:",
            "cipher:",
            "zero_copy:",
        ] {
            let line = DEFAULT_CONFIG_YAML
                .lines()
                .find(|l| l.trim_start().starts_with(key))
                .unwrap_or_else(|| panic!("default config lacks `{key}`"));
            assert!(line.contains('#'), "`{key}` has no comment");
        }
    }
}
