-- Tenant fairness: relays claim for each tenant with pending messages in
-- turn, so a claim restricted to one tenant must find that tenant's oldest
-- rows without reading past other tenants' backlogs, and the relay must list
-- the tenants cheaply (one `min(tenant)` lookup per tenant on this index).
-- Partial: rows without a tenant never enter it.
CREATE INDEX IF NOT EXISTS {index_tenant} ON {table} (tenant, seq)
    WHERE tenant IS NOT NULL AND status = 'pending';
