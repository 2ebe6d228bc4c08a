"""Keeping secrets out of logs, error messages, reprs and HTTP bodies.

Passwords and keys are pydantic `SecretStr` settings (their repr is `**********`); what is left
are credentials written into URLs (`redis://user:pass@host`) and texts that may quote one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

MASK = "***"

# scheme://[user][:password]@  ->  the password part (anything up to the last '@' of the
# authority); used on free text, where a URL may sit inside a sentence
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^/\s]*(?=@)")


def redact_url(url: str) -> str:
    """`url` with its password (if any) replaced by `***`; the user name stays (it names the
    ACL user, which an operator needs to see). Never raises: a URL it cannot parse is masked
    by the free-text rule instead."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return redact_text(url)
    if password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:{MASK}@{host}"))


MIN_SCRUB = 4  # shorter "secrets" would mask letters all over a sentence (and guess nothing)


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with URL passwords and every string of `secrets` (of 4+ characters) masked."""
    out = _URL_PASSWORD.sub(lambda m: m.group("head") + MASK, text)
    for secret in secrets:
        if len(secret) >= MIN_SCRUB:
            out = out.replace(secret, MASK)
    return out
