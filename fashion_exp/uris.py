"""The references a user writes, and their allowed forms: tracking store URIs and model URIs.

Written once here, so that the config checks (before anything heavy is imported) and the
tracking code that follows them agree; nothing here imports MLflow.
"""

from __future__ import annotations

import re
import urllib.parse

# Tracking URI schemes MLflow takes (a path without one is a local folder).
URI_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql")
DATABASES = ("postgresql", "mysql", "mssql")
SERVERS = ("http", "https")  # a tracking server's schemes
# Model references: a run's logged model, a registered version or alias, a logged model id.
MODEL_SCHEMES = ("runs:/", "models:/")
MODEL_FORMS = ("runs:/<run_id>/model, models:/<name>/<version>, models:/<name>@<alias> or "
               "models:/m-<model_id>")


def scheme(uri: str) -> str:
    """The scheme of a URI without its driver ('postgresql+psycopg://' -> 'postgresql');
    '' for a path."""
    return uri.split("://", 1)[0].split("+", 1)[0].lower() if "://" in uri else ""


def is_server(uri: str) -> bool:
    """Whether a tracking URI names a tracking server (http:// or https://)."""
    return scheme(uri) in SERVERS


def lower_scheme(uri: str) -> str:
    """The URI with its scheme in lower case ('Sqlite:///x.db' -> 'sqlite:///x.db'): schemes
    are case-insensitive (RFC 3986), but SQLAlchemy loads a dialect by the name as written
    and MLflow and this project compare them as 'sqlite', 'http'..."""
    if "://" not in uri:
        return uri
    kind, rest = uri.split("://", 1)
    return f"{kind.lower()}://{rest}"


def without_password(uri: str, mask: str = "***") -> str:
    """The URI with the password of its user:password@ replaced by `mask`; mask '' drops it
    with its colon (user@host)."""
    secret = r"^([A-Za-z][\w+.-]*://[^:/@]*):[^@]*@"  # user:<password>@, as SQLAlchemy reads it
    hidden = f":{mask}" if mask else ""
    if scheme(uri) in DATABASES:
        return re.sub(secret, lambda m: f"{m.group(1)}{hidden}@", uri)
    try:
        parts = urllib.parse.urlsplit(uri)
        if parts.password is None:
            return uri
        netloc = parts.netloc.replace(f":{parts.password}@", f"{hidden}@", 1)
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    except ValueError:  # not a parsable URL (e.g. "http://[oops")
        return re.sub(secret, lambda m: f"{m.group(1)}{hidden}@", uri)


def printable(text: str) -> str:
    """Text as it may go into a one-line message or log line: control characters escaped
    (a newline as \\n, an escape as \\x1b)."""
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], text)


def shown(uri: str, limit: int = 300) -> str:
    """A URI as it may be printed: a password in it replaced by ***, on one line, at most
    `limit` characters."""
    uri = printable(without_password(uri))
    return uri if len(uri) <= limit else uri[:limit - 3] + "..."
