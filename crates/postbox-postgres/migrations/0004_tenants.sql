-- Tenant fairness: relays claim for each tenant with pending messages in
-- turn, so a claim restricted to one tenant must find that tenant's oldest
-- rows without reading past other tenants' backlogs, and the relay must list
-- the tenants cheaply (a loose index scan over this index). Partial: rows
-- without a tenant never enter it, so producers that do not use tenants pay
-- nothing for it.
CREATE INDEX "{t}_tenant_idx" ON "{schema}"."{t}" (tenant, seq)
    WHERE tenant IS NOT NULL AND status = 'pending';
