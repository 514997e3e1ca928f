"""Secrets kept out of messages: a database URL's password and query values are masked before a
URL (or an error that quotes it) is printed."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

MASK = "***"


def mask_url(url: str) -> str:
    """`url` with the password of its user info and every query value replaced by ***.

    'postgresql://user:pw@host/db?sslkey=k' -> 'postgresql://user:***@host/db?sslkey=***'. The user
    info ends at the last '@', so a password holding '@' stays hidden. When the text does not parse
    as scheme://..., everything after '//' is masked, and a text with neither '//' nor '@' nor '?'
    (a plain file name) is shown as it is.
    """
    try:
        parts = urlsplit(url)
        if not parts.scheme or "://" not in url:
            raise ValueError("not scheme://...")
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, host = netloc.rpartition("@")
            user, colon, _ = userinfo.partition(":")
            netloc = f"{user}{':' + MASK if colon else ''}@{host}"
        query = "&".join(f"{key}={MASK}" for key, _ in parse_qsl(parts.query, keep_blank_values=True))
        return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
    except ValueError:
        if "//" in url:
            return url.split("//", 1)[0] + "//" + MASK
        return MASK if ("@" in url or "?" in url) else url


def scrub(text: str, url: str) -> str:
    """`text` (e.g. a driver's error message) with `url`, and whatever of it could be a secret,
    replaced by the masked URL."""
    text = text.replace(url, mask_url(url))
    secrets = []
    try:
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        secrets.append(userinfo.partition(":")[2])
        secrets += [value for _, value in parse_qsl(parts.query, keep_blank_values=True)]
    except ValueError:
        pass
    if "//" in url and "://" not in url:  # unparsed: the part after '//' may hold a password
        secrets.append(url.split("//", 1)[1])
    # A driver may split the user info at the first '@' instead of the last: "user:p@ss-w0rd@host"
    # becomes password "p" and host "ss-w0rd@host", which its error then quotes.
    secrets += [secret.split("@", k)[k] for secret in secrets for k in range(1, secret.count("@") + 1)]
    for secret in sorted((s for s in secrets if len(s) >= 3), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text
