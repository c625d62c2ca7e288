"""Identity: who is calling and what they may do.

The public interface of the identity domain: bearer tokens (HS256 JWTs over a local key),
their scopes and the key's file. Other domains import from here, never from the modules
inside (an import-linter contract, pyproject.toml). Identity imports no other domain.
"""

from processor.identity.tokens import (
    ALGORITHM,
    KEY_BYTES,
    KEY_FILE_NAME,
    SCOPES,
    SYSTEM_SCOPES,
    TOKEN_TTL_S_DEFAULT,
    TOKEN_TTL_S_MAX,
    AuthError,
    Claims,
    ScopeError,
    bearer_token,
    issue_token,
    load_or_create_key,
    require_scope,
    verify_token,
)

__all__ = [
    "ALGORITHM",
    "KEY_BYTES",
    "KEY_FILE_NAME",
    "SCOPES",
    "SYSTEM_SCOPES",
    "TOKEN_TTL_S_DEFAULT",
    "TOKEN_TTL_S_MAX",
    "AuthError",
    "Claims",
    "ScopeError",
    "bearer_token",
    "issue_token",
    "load_or_create_key",
    "require_scope",
    "verify_token",
]
