"""KV tiers below the device pool: a host-RAM LRU and a persistent disk LRU, keyed by the prefix cache's
chained block hash, filled off the hot path and read back asynchronously (docs/kv_tiers.md)."""
