-- Prepaid credit grants (POST /v1/customers/{id}/credits), durable here so that the wallets
-- in Redis can always be rebuilt from them and the raw rows. A grant is written once per
-- (tenant, idempotency key) after a lookup; two ingestors granting the same key at the same
-- moment may both write, and every reader keeps the first by grant time (first_grant_per_key).
-- expires_at_ms 0: never expires. Tenant first in the sort key: every read names the tenant.
CREATE TABLE IF NOT EXISTS mcp_customer_grants
(
    tenant_id       String,
    idempotency_key String,
    customer_id     String,
    amount_micros   Int64,
    granted_at_ms   Int64,
    expires_at_ms   Int64,
    note            String
)
ENGINE = MergeTree()
ORDER BY (tenant_id, idempotency_key);
