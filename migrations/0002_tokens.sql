-- API tokens. Only a SHA-256 of each token is stored; the token itself is shown once.
CREATE TABLE api_tokens (
    token_sha256  text PRIMARY KEY,
    tenant        text        NOT NULL CHECK (tenant <> ''),
    admin         boolean     NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz
);

CREATE INDEX jobs_tenant_created ON jobs (tenant, created_at DESC, id DESC);
