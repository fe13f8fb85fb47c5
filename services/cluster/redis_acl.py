"""Redis ACL users of a cluster: one per component, one for operators, and no default user.

    user default off                               # a caller without credentials gets NOAUTH
    user router on #SHA256 ~epserve:CLUSTER:* resetchannels +@all -@dangerous -scan -randomkey -dbsize
    user attention ...  user expert ...            # the same rules under their own names and passwords
    user admin on #SHA256 ~* &* +@all               # operators (`epserve placement`), probes, `epserve up`

A component's user reaches only its cluster's keys (``Keys.prefix``), no administrative command
(CONFIG, KEYS, FLUSHALL, SHUTDOWN, ACL, ...) and no command that lists keys (SCAN, RANDOMKEY; key
patterns do not filter them): a leaked component password cannot reconfigure Redis or read another
cluster. The file holds SHA-256 hashes, never the passwords. ``epserve up`` writes it for
its embedded Redis; the Helm chart renders the same rules (tests/deploy/test_chart.py compares them).
"""
from __future__ import annotations

import hashlib
import secrets

from epserve.services.cluster.keys import SERVICE_KINDS, Keys

ADMIN_USER = "admin"
USERS = (*SERVICE_KINDS, ADMIN_USER)
COMPONENT_RULES = "resetchannels +@all -@dangerous -scan -randomkey -dbsize"   # no listing of other clusters' keys
ADMIN_RULES = "~* &* +@all"


def new_passwords() -> dict[str, str]:
    """A random URL-safe password for every user."""
    return {user: secrets.token_urlsafe(24) for user in USERS}


def acl_file(passwords: dict[str, str], keys: Keys) -> str:
    """The text of an ACL file (``redis-server --aclfile``) for ``passwords`` (user -> password)."""
    lines = ["user default off"]
    for user in USERS:
        rules = ADMIN_RULES if user == ADMIN_USER else f"~{keys.prefix}:* {COMPONENT_RULES}"
        lines.append(f"user {user} on #{hashlib.sha256(passwords[user].encode()).hexdigest()} {rules}")
    return "\n".join(lines) + "\n"
