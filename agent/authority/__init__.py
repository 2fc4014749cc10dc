"""The cluster side: the enrollment authority (CA material, join tokens, registry, HTTPS API)."""
