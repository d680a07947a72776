"""Who can use the dev identity provider (`gateway.devidp`): its users and its clients.

Users come from a YAML file (`config/devidp-users.yaml` for the demo):

    users:
      - username: alice
        password: alice-demo      # demo only
        email: alice@example.org  # default: USERNAME@example.org
        name: Alice Example       # default: the username
        groups: [engineering]     # default: none
        amr: [pwd]                # default: [pwd]; [pwd, otp] makes the login count as MFA
        email_verified: true      # default: true
        sub: ...                  # default: stable, derived from the username
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway.configfile import Problem, load_model

TokenAuth = Literal["client_secret_basic", "client_secret_post"]


@dataclass(frozen=True, slots=True)
class DevUser:
    """A person who can sign in; empty `email`, `name` and `sub` are derived from the username."""

    username: str
    password: str = field(repr=False)
    email: str = ""
    name: str = ""
    groups: tuple[str, ...] = ()
    amr: tuple[str, ...] = ("pwd",)
    email_verified: bool = True
    sub: str = ""

    def __post_init__(self) -> None:
        derived = hashlib.sha256(f"devidp-user:{self.username}".encode()).hexdigest()[:32]
        object.__setattr__(self, "email", self.email or f"{self.username}@example.org")
        object.__setattr__(self, "name", self.name or self.username)
        object.__setattr__(self, "groups", tuple(self.groups))
        object.__setattr__(self, "amr", tuple(self.amr))
        object.__setattr__(self, "sub", self.sub or derived)

    def profile(self) -> dict[str, Any]:
        """The claims about this person that ID tokens and userinfo carry (besides `sub`)."""
        return {
            "email": self.email,
            "email_verified": self.email_verified,
            "name": self.name,
            "groups": list(self.groups),
        }


@dataclass(frozen=True, slots=True)
class DevClient:
    """A registered relying party; redirect URIs are compared exactly."""

    client_id: str
    client_secret: str = field(repr=False)
    redirect_uris: tuple[str, ...]
    post_logout_redirect_uris: tuple[str, ...] = ()
    backchannel_logout_uri: str | None = None
    token_auth: TokenAuth = "client_secret_basic"  # noqa: S105 (a method's name, not a secret)

    def __post_init__(self) -> None:
        object.__setattr__(self, "redirect_uris", tuple(self.redirect_uris))
        object.__setattr__(self, "post_logout_redirect_uris", tuple(self.post_logout_redirect_uris))


class _UserEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    username: str = Field(min_length=1)
    password: str = Field(min_length=1)
    email: str = ""
    email_verified: bool = True
    name: str = ""
    groups: list[str] = Field(default_factory=list)
    amr: list[str] = Field(default_factory=lambda: ["pwd"])
    sub: str = ""


class _UsersFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    users: list[_UserEntry]


def load_users(path: str | Path) -> dict[str, DevUser]:
    """The users of a YAML file, by username.

    Raises `gateway.configfile.ConfigError` listing every problem with its line.
    """
    loaded = load_model(
        Path(path), os.environ, _UsersFile, secret_files=lambda _: (), checks=_unique_names
    )
    return {
        u.username: DevUser(**{**u.model_dump(), "groups": tuple(u.groups), "amr": tuple(u.amr)})
        for u in loaded.users
    }


def _unique_names(loaded: _UsersFile) -> Iterable[Problem]:
    seen: set[str] = set()
    for i, user in enumerate(loaded.users):
        if user.username in seen:
            yield Problem(f"users: {user.username!r} is listed twice", (("users", i, "username"),))
        seen.add(user.username)
