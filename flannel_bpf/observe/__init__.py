"""What operators see: Prometheus metrics and the HTTP endpoint, the status file and `status`,
`leases`/`peers`/`stats`, systemd notification, logs."""
