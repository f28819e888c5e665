"""Secret references (`env:`, `file:`, `aws-sm:`) without pydantic: checking one, fetching its
value, and `SecretStr`, a string that never shows itself.

The guest agent stands on this module alone: pydantic costs every agent about 20 MB of memory.
`drflow.secrets` wraps the same checks and values in pydantic models for the orchestrator. Values
are fetched on demand, cached for the life of the process, and never put into messages,
exceptions or logs.
"""

from __future__ import annotations

import json
import os
import re
import threading
from typing import Any, Protocol

SCHEMES = ("env", "file", "aws-sm")
REF_EXAMPLES = (
    '{ref: "env:NAME"}, {ref: "file:/path/to/file"} or {ref: "aws-sm:SECRET_ID#json_key"}'
)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SCHEME_LIKE = re.compile(r"[a-z][a-z0-9+.-]{0,15}")


class SecretError(Exception):
    """A secret reference could not be resolved; the message names the ref, never the value."""


class HasRef(Protocol):
    """A secret reference of either kind (this module's or drflow.secrets' pydantic model)."""

    @property
    def ref(self) -> str: ...


class SecretValue(Protocol):
    """A secret of either kind: this module's SecretStr or pydantic's."""

    def get_secret_value(self) -> str: ...


class AwsConfig(Protocol):
    """What resolving needs from the config's `aws` section (drflow.config.AwsConfig)."""

    @property
    def region(self) -> str | None: ...
    @property
    def endpoint_url(self) -> str | None: ...
    @property
    def access_key_id(self) -> HasRef | None: ...
    @property
    def secret_access_key(self) -> HasRef | None: ...
    @property
    def session_token(self) -> HasRef | None: ...

    def model_dump_json(self) -> str: ...


class SecretStr:
    """A secret string: `repr`, `str` and formatting show asterisks; `get_secret_value()` the
    value. pydantic's SecretStr interface, for code that must not load pydantic."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "SecretStr('**********')" if self._value else "SecretStr('')"

    def __str__(self) -> str:
        return "**********" if self._value else ""

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, SecretStr) and other._value == self._value)

    def __hash__(self) -> int:
        return hash(self._value)

    def __len__(self) -> int:
        return len(self._value)


def refuse_inline(data: Any) -> None:
    """ValueError unless `data` can be a reference (a mapping); never echoes the input."""
    # An inline value here is very likely the secret itself.
    if isinstance(data, str | int | float | bytes):
        raise ValueError(f"inline secrets are not allowed; use a reference such as {REF_EXAMPLES}")
    if not isinstance(data, dict):
        raise ValueError(f"must be a secret reference such as {REF_EXAMPLES}")


def check_ref(ref: str) -> str:
    """`ref` if it is a well-formed `scheme:location`, else ValueError saying how to write it."""
    scheme, sep, rest = ref.partition(":")
    if not sep or scheme not in SCHEMES:
        # Without a plausible scheme the text may be the secret itself: do not repeat it.
        named = f" {scheme!r}" if sep and _SCHEME_LIKE.fullmatch(scheme) else ""
        raise ValueError(
            f"unknown secret reference scheme{named}: must start with one of "
            + ", ".join(f"'{s}:'" for s in SCHEMES)
        )
    if scheme == "env" and not _ENV_NAME.fullmatch(rest):
        raise ValueError("env: reference needs a variable name, e.g. 'env:SLACK_BOT_TOKEN'")
    if scheme == "file" and not rest.startswith("/"):
        raise ValueError("file: reference needs an absolute path, e.g. 'file:/etc/drflow/token'")
    if scheme == "aws-sm":
        secret_id, _, key = _split_aws(rest)
        if not secret_id or key == "":
            raise ValueError(
                "aws-sm: reference needs a secret id and an optional non-empty json key, "
                "e.g. 'aws-sm:prod/drflow#password'"
            )
    return ref


class SecretRef:
    """Where a secret lives (`{ref: "scheme:location"}` in a config file), checked when made."""

    __slots__ = ("ref",)

    def __init__(self, ref: str) -> None:
        if not isinstance(ref, str):
            raise ValueError(f"must be a secret reference such as {REF_EXAMPLES}")
        self.ref = check_ref(ref)

    @classmethod
    def parse(cls, data: Any) -> SecretRef:
        """From a config file's value: `{ref: "..."}` and nothing else."""
        if isinstance(data, SecretRef):
            return data
        refuse_inline(data)
        extra = sorted(str(k) for k in data if k != "ref")
        if extra:
            raise ValueError(f"a secret reference has only `ref`, not {', '.join(extra)}")
        if "ref" not in data:
            raise ValueError(f"must be a secret reference such as {REF_EXAMPLES}")
        return cls(data["ref"])

    @property
    def scheme(self) -> str:
        return self.ref.partition(":")[0]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SecretRef) and other.ref == self.ref

    def __hash__(self) -> int:
        return hash(self.ref)

    def __repr__(self) -> str:
        return f"SecretRef(ref={self.ref!r})"

    def __str__(self) -> str:
        return self.ref


def _split_aws(rest: str) -> tuple[str, str, str | None]:
    """`SECRET_ID#key` → (id, '#', key); ARNs contain ':' but never '#'."""
    secret_id, sep, key = rest.rpartition("#")
    if not sep:
        return rest, "", None
    return secret_id, sep, key


_cache: dict[tuple[str, str], str] = {}
_aws_cache: dict[tuple[str, str], str] = {}
_lock = threading.Lock()


def clear_cache() -> None:
    """Forget every resolved secret (after a rotation, or between tests)."""
    with _lock:
        _cache.clear()
        _aws_cache.clear()


def fetch(ref: str, aws: AwsConfig | None = None) -> str:
    """The value the reference `ref` points to (SecretError if it cannot be had or is empty);
    `aws` (region, endpoint, credentials) is used for `aws-sm:`. Keep what it returns local."""
    scheme = ref.partition(":")[0]
    key = (ref, _aws_key(aws) if scheme == "aws-sm" else "")
    with _lock:
        hit = _cache.get(key)
    if hit is not None:
        return hit
    if scheme == "env":
        value = _resolve_env(ref)
    elif scheme == "file":
        value = _resolve_file(ref)
    else:
        value = _resolve_aws(ref, aws)
    if not value:
        raise SecretError(f"secret {ref}: the value is empty")
    with _lock:
        _cache[key] = value
    return value


def resolve(ref: HasRef, aws: AwsConfig | None = None) -> SecretStr:
    """The value `ref` points to, as this module's SecretStr."""
    return SecretStr(fetch(ref.ref, aws))


def _resolve_env(ref: str) -> str:
    name = ref.partition(":")[2]
    value = os.environ.get(name)
    if value is None:
        raise SecretError(f"secret {ref}: environment variable {name} is not set")
    return value


def _resolve_file(ref: str) -> str:
    path = ref.partition(":")[2]
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError as e:
        raise SecretError(f"secret {ref}: cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise SecretError(f"secret {ref}: {path} is not UTF-8 text") from None


def _aws_key(aws: AwsConfig | None) -> str:
    return "" if aws is None else aws.model_dump_json()


def aws_client_kwargs(aws: AwsConfig | None) -> dict[str, Any]:
    """Keyword arguments for `boto3.client(...)` from the config's `aws` section.

    Absent settings are left out so boto3's default chain (environment, profile, instance role)
    applies. Credentials are resolved here, so the caller gets plain strings: keep them local.
    """
    if aws is None:
        return {}
    kw: dict[str, Any] = {}
    if aws.region:
        kw["region_name"] = aws.region
    if aws.endpoint_url:
        kw["endpoint_url"] = aws.endpoint_url
    if aws.access_key_id is not None and aws.secret_access_key is not None:
        kw["aws_access_key_id"] = fetch(aws.access_key_id.ref)
        kw["aws_secret_access_key"] = fetch(aws.secret_access_key.ref)
        if aws.session_token is not None:
            kw["aws_session_token"] = fetch(aws.session_token.ref)
    return kw


def _fetch_aws_secret(secret_id: str, aws: AwsConfig | None, where: str) -> str:
    # boto3 costs ~0.3 s to import: only pay it when an aws-sm: ref is actually resolved.
    import boto3
    from botocore.config import Config
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        NoRegionError,
    )

    cache_key = (secret_id, _aws_key(aws))
    with _lock:
        hit = _aws_cache.get(cache_key)
    if hit is not None:
        return hit
    try:
        client = boto3.session.Session().client(
            "secretsmanager",
            config=Config(connect_timeout=3, read_timeout=10, retries={"max_attempts": 2}),
            **aws_client_kwargs(aws),
        )
        resp = client.get_secret_value(SecretId=secret_id)
    except ClientError as e:
        err = e.response.get("Error", {})
        code = err.get("Code", "error")
        if code == "ResourceNotFoundException":
            raise SecretError(f"{where}: secret {secret_id!r} does not exist") from None
        raise SecretError(f"{where}: {code}: {err.get('Message', '')}") from None
    except NoRegionError:
        raise SecretError(f"{where}: no AWS region: set aws.region in the config") from None
    except NoCredentialsError:
        raise SecretError(
            f"{where}: no AWS credentials: set aws.access_key_id and aws.secret_access_key, "
            "or configure boto3's default chain (environment, profile, instance role)"
        ) from None
    except EndpointConnectionError as e:
        raise SecretError(f"{where}: cannot reach Secrets Manager at {e.kwargs.get('endpoint_url')}"
                          ) from None
    except BotoCoreError as e:
        raise SecretError(f"{where}: {type(e).__name__}: {e}") from None
    if "SecretString" in resp:
        value = str(resp["SecretString"])
    else:
        try:
            value = bytes(resp["SecretBinary"]).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            raise SecretError(f"{where}: the secret is binary, not UTF-8 text") from None
    with _lock:
        _aws_cache[cache_key] = value
    return value


def _resolve_aws(ref: str, aws: AwsConfig | None) -> str:
    secret_id, _, key = _split_aws(ref.partition(":")[2])
    where = f"secret {ref}"
    if aws is not None:
        # Credentials for Secrets Manager cannot themselves live in Secrets Manager.
        for name in ("access_key_id", "secret_access_key", "session_token"):
            cred = getattr(aws, name)
            if cred is not None and cred.ref.startswith("aws-sm:"):
                raise SecretError(f"{where}: aws.{name} must be an env: or file: reference")
        try:
            aws_client_kwargs(aws)
        except SecretError as e:
            raise SecretError(f"{where}: AWS credentials unavailable: {e}") from None
    raw = _fetch_aws_secret(secret_id, aws, where)
    if key is None:
        return raw
    try:
        doc = json.loads(raw)
    except ValueError:
        # JSONDecodeError keeps the whole document: never chain it.
        doc = None
    if not isinstance(doc, dict):
        raise SecretError(f"{where}: secret {secret_id!r} is not a JSON object, so #{key} "
                          "cannot be looked up; drop the #key to use the whole value")
    if key not in doc:
        keys = ", ".join(sorted(str(k) for k in doc)) or "none"
        raise SecretError(f"{where}: secret {secret_id!r} has no key {key!r} (keys: {keys})")
    value = doc[key]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise SecretError(f"{where}: key {key!r} of secret {secret_id!r} is not a string")
    return str(value)
