"""Identity: who is calling and what they may do.

The public interface of the identity domain: bearer tokens (HS256 JWTs over a local key),
their tenants, scopes and the key's file. Other domains import from here, never from the modules
inside (an import-linter contract, pyproject.toml). Identity imports no other domain.
"""

from processor.identity.tokens import (
    ALGORITHM,
    AUDIENCE,
    DEFAULT_TENANT,
    KEY_BYTES,
    KEY_FILE_NAME,
    PROCESSOR_TENANT,
    SCOPES,
    SYSTEM_SCOPES,
    TOKEN_TTL_S_DEFAULT,
    TOKEN_TTL_S_MAX,
    AuthError,
    Claims,
    ScopeError,
    bearer_token,
    issue_token,
    key_id,
    load_or_create_key,
    principal_of,
    require_scope,
    tenant_of_principal,
    tenant_slot,
    verify_token,
)

__all__ = [
    "ALGORITHM",
    "AUDIENCE",
    "DEFAULT_TENANT",
    "KEY_BYTES",
    "KEY_FILE_NAME",
    "PROCESSOR_TENANT",
    "SCOPES",
    "SYSTEM_SCOPES",
    "TOKEN_TTL_S_DEFAULT",
    "TOKEN_TTL_S_MAX",
    "AuthError",
    "Claims",
    "ScopeError",
    "bearer_token",
    "issue_token",
    "key_id",
    "load_or_create_key",
    "principal_of",
    "require_scope",
    "tenant_of_principal",
    "tenant_slot",
    "verify_token",
]
