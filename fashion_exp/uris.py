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


def shown(uri: str, limit: int = 300) -> str:
    """A URI as it may be printed: a password in it replaced by ***, at most `limit`
    characters."""
    secret = r"^([A-Za-z][\w+.-]*://[^:/@]*:)[^@]*@"  # user:<password>@, as SQLAlchemy reads it
    if scheme(uri) in DATABASES:
        uri = re.sub(secret, r"\1***@", uri)
    else:
        try:
            parts = urllib.parse.urlsplit(uri)
            if parts.password is not None:
                netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
                uri = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
        except ValueError:  # not a parsable URL (e.g. "http://[oops")
            uri = re.sub(secret, r"\1***@", uri)
    uri = re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], uri)  # one line
    return uri if len(uri) <= limit else uri[:limit - 3] + "..."
