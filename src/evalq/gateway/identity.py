"""Who sent a request, as nats-server states it: the team is the requester's account.

A request that crosses a service import into the gateway's account carries a
`Nats-Request-Info` header that nats-server writes: a JSON object with the requester's
account (`acc`) always, and its user (`user`) when the import has `share = true`. The server
removes any such header the client sent before writing its own. Inside one account it
writes nothing, and a client's header passes as sent; so the header is read only on a
request the server carried across an import. Such a request has a reply subject the server
made, under `_R_.`, and no client can give one: the server refuses a client's publish whose
reply begins `_R_.` (a reserved reply). Any other request is the `default` team, whatever
headers it carries, and comes from the queue's own account: an admin, who sees every
team's jobs (docs/DESIGN.md, "Permissions").
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import msgspec
from nats.micro.request import Request

__all__ = ["DEFAULT_TEAM", "IMPORT_REPLY", "OWN_ACCOUNT", "REQUEST_INFO", "Requester", "of_request", "requester"]

log = logging.getLogger("evalq.gateway")

REQUEST_INFO = "Nats-Request-Info"
# The reply subjects nats-server gives the requests it carries across a service import,
# and refuses from clients.
IMPORT_REPLY = "_R_."
DEFAULT_TEAM = "default"


class Requester(msgspec.Struct, frozen=True, kw_only=True):
    team: str = DEFAULT_TEAM
    user: str | None = None
    # A request from the queue's own account (it crossed no import): an operator's, or any
    # request where there are no accounts (`evalq up`). It sees and may cancel every job.
    admin: bool = False

    def may_see(self, team: str) -> bool:
        """Whether this requester may see, follow and cancel a job of `team`."""
        return self.admin or team == self.team


# An import's request whose header cannot be read: a team of its own, never an admin.
ANONYMOUS = Requester()
OWN_ACCOUNT = Requester(admin=True)


class _RequestInfo(msgspec.Struct):
    # The server's object has many more fields (host, client id, round trip); unread.
    acc: str = ""
    user: str = ""


_info = msgspec.json.Decoder(_RequestInfo)


def requester(headers: Mapping[str, str] | None, reply: str | None) -> Requester:
    """The team and user of a request with these headers and this reply subject."""
    if not reply or not reply.startswith(IMPORT_REPLY):
        return OWN_ACCOUNT
    text = (headers or {}).get(REQUEST_INFO)
    if not text:
        return ANONYMOUS
    try:
        info = _info.decode(text)
    except (msgspec.DecodeError, msgspec.ValidationError):
        log.warning(
            "a request came through an import with an unreadable %s header; taken as team %s",
            REQUEST_INFO,
            DEFAULT_TEAM,
        )
        return ANONYMOUS
    if not info.acc:
        return ANONYMOUS
    return Requester(team=info.acc, user=info.user or None)


def of_request(request: Request) -> Requester:
    # nats-py's Request has no reply property; the message it wraps has.
    return requester(request.headers, request._msg.reply)
