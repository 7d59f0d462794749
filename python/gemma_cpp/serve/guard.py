"""What reaches the server's endpoints: one ASGI middleware that answers, before any endpoint
runs, for whom the server is (Host), which web pages may call it (Origin, CORS), the API key,
what a request body may be (application/json, at most `max_request_bytes`, sent within
`read_timeout` seconds), and the headers every response carries.

The setting it defends is a server on a laptop's loopback without a key: a web page the user
visits can make the browser send requests to 127.0.0.1, and read the answers after DNS
rebinding (the page's own name made to resolve to 127.0.0.1, as in Ollama's CVE-2024-28224).

- Host: bound to a loopback address, the server answers only requests whose Host is a
  loopback name or address (`localhost`, `*.localhost`, `127.0.0.1`, `[::1]`, any port) or one
  of `allowed_hosts`; a rebound page's requests carry its own name and get a 400. Bound
  elsewhere, `allowed_hosts` (and loopback names) apply when given, else any Host is answered
  (the key is then the protection, and the server says so when it starts without one).
- Origin: a browser names the page's origin on every cross-origin request and on same-origin
  POSTs. A request from another origin that `allowed_origins` does not list gets a 403, and so
  does its preflight. With `allowed_origins`, CORS is on for those origins: preflights are
  answered, responses carry `Access-Control-Allow-Origin`; credentials (cookies) are never
  allowed, with `*` or without (the key is a header, which CORS passes when allowed).
- Bodies: a POST must be `application/json` (415 otherwise), which a page cannot send across
  origins without a preflight. A body over `max_request_bytes` gets a 413 before any of it is
  parsed (by its Content-Length when it has one, else as soon as the bytes read exceed it); a
  body that has not fully arrived `read_timeout` seconds after the headers gets a 408. Either
  way the connection is closed.
- Every response: `X-Content-Type-Options: nosniff` and `Cross-Origin-Resource-Policy:
  same-origin`; an HTML page also a Content-Security-Policy (`PAGE_CSP`) unless it sets its own.

Refusals are counted by reason (`refused`) and every response by status (`statuses`), for
/metrics."""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import secrets
import socket
from typing import Dict, Iterable, Optional, Sequence, Tuple
from urllib.parse import urlsplit

# A page the server ships loads its scripts, styles and data from the server itself, and
# cannot be framed by another site.
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
            "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
# FastAPI's /docs and /redoc load Swagger UI and ReDoc from this CDN (and run an inline
# script): their pages get a policy that names it, until the package ships those pages itself.
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
            "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net https://fonts.googleapis.com; "
            "font-src https://fonts.gstatic.com; img-src 'self' data: https://fastapi.tiangolo.com "
            "https://cdn.redoc.ly; worker-src blob:; connect-src 'self'; frame-ancestors 'none'")
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
logger = logging.getLogger("gemma_cpp.serve")
CORS_METHODS = "GET, POST, OPTIONS"
CORS_EXPOSED = "Retry-After, x-gemma-cpp-replica"
PREFLIGHT_MAX_AGE = "600"
DEFAULT_MAX_REQUEST_BYTES = 4 << 20  # a full 32k-token context of text is about 0.2 MB of JSON
DEFAULT_READ_TIMEOUT = 30.0


def error_body(status: int, message: str, code: str, param: Optional[str] = None,
               kind: str = "invalid_request_error") -> bytes:
    """OpenAI's error shape: {"error": {message, type, param, code}}."""
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}}).encode()


# ---- names and addresses ------------------------------------------------------------------

def _strip_port(authority: str) -> Optional[str]:
    """The host of a Host header's value (`name`, `name:port`, `[v6]`, `[v6]:port`), lower
    case, without a trailing dot; None when it is not one."""
    a = authority.strip().lower()
    if a.startswith("["):
        end = a.find("]")
        if end < 0 or (a[end + 1:] and not (a[end + 1] == ":" and a[end + 2:].isdigit())):
            return None
        host = a[1:end]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
        return host
    host, sep, port = a.partition(":")
    if sep and not port.isdigit():
        return None
    host = host.rstrip(".")
    if not host or any(c in host for c in "/\\@ ?#[]"):
        return None
    return host


def _is_loopback_name(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback(bind_host: str) -> bool:
    """Whether a server bound to `bind_host` (an address or a name) is reachable only from this
    machine: a loopback address, `localhost`, or a name all of whose addresses are loopback."""
    h = bind_host.strip().strip("[]").lower()
    if not h:
        return False
    if _is_loopback_name(h):
        return True
    try:
        ipaddress.ip_address(h)
        return False  # an address that is not loopback (0.0.0.0 and :: included)
    except ValueError:
        pass
    try:
        addresses = {info[4][0].split("%")[0] for info in socket.getaddrinfo(h, None)}
    except (OSError, UnicodeError):
        return False
    return bool(addresses) and all(ipaddress.ip_address(a).is_loopback for a in addresses)


def open_warning(bind_host: str, api_key: Optional[str]) -> Optional[str]:
    """The line a server bound beyond loopback without a key prints when it starts, or None."""
    if api_key is None and not is_loopback(bind_host):
        return (f"gemma-cpp serve: warning: listening on {bind_host} without an API key: anyone who can reach "
                f"this address can use the model, and so can web pages by DNS rebinding unless --allowed-hosts "
                f"is given (give --api-key-file or $GEMMA_CPP_API_KEY)")
    return None


class HostRule:
    """Which Host header values are answered (the module's doc says why): loopback names and
    addresses, and `allowed_hosts`; or any, when the server is bound beyond loopback and no
    allowed_hosts are given. Entries: a name or address (`example.com`, `10.0.0.5`,
    `[fe80::1]`; a port is ignored), `.example.com` for that domain and its subdomains, or `*`
    for any."""

    def __init__(self, bind_host: str, allowed_hosts: Iterable[str] = ()):
        self.names, self.domains, any_host = set(), [], False
        for entry in allowed_hosts:
            e = entry.strip().lower()
            if e == "*":
                any_host = True
                continue
            if e.startswith("."):
                name = _strip_port(e[1:])
                if name is not None and ":" not in e:
                    self.domains.append("." + name)
                    continue
            else:
                bare = e.strip("[]")
                name = bare if _is_ip(bare) else _strip_port(e)
                if name is not None:
                    self.names.add(_canonical(name))
                    continue
            raise ValueError(f"allowed hosts: {entry!r} is not a host name or address (give names such as "
                             f"'example.com', '.example.com' for a domain and its subdomains, or '*')")
        # Loopback names are answered whenever any rule applies: no other site can make a
        # browser send them (a rebound name stays the attacker's name).
        self.any = any_host or (not is_loopback(bind_host) and not self.names and not self.domains)
        self._seen: Dict[Optional[str], bool] = {}

    def allows(self, host_header: Optional[str]) -> bool:
        if self.any:
            return True
        known = self._seen.get(host_header)
        if known is None:
            known = self._allows(host_header)
            if len(self._seen) >= 256:  # the answers for the Host values seen, bounded
                self._seen.clear()
            self._seen[host_header] = known
        return known

    def _allows(self, host_header: Optional[str]) -> bool:
        host = _strip_port(host_header) if host_header is not None else None
        if host is None:
            return False
        host = _canonical(host)
        if _is_loopback_name(host):
            return True
        return host in self.names or any(host == d[1:] or host.endswith(d) for d in self.domains)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _canonical(host: str) -> str:
    """An address in its one written form (`0:0::1` is `::1`); a name as it is."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host


def _origin_key(origin: str) -> Optional[Tuple[str, str, int]]:
    """(scheme, host, port) of a web origin (`http://localhost:3000`), None if it is not one."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/") \
            or parts.query or parts.fragment or parts.username is not None:
        return None
    return parts.scheme, parts.hostname.rstrip("."), port or (443 if parts.scheme == "https" else 80)


class OriginRule:
    """Which web origins may call the server across origins: `allowed_origins` entries are
    origins (`https://app.example`, `http://localhost:3000`) or `*` for any."""

    def __init__(self, allowed_origins: Iterable[str] = ()):
        self.any, self.origins = False, set()
        for entry in allowed_origins:
            if entry.strip() == "*":
                self.any = True
                continue
            key = _origin_key(entry)
            if key is None:
                raise ValueError(f"allowed origins: {entry!r} is not a web origin (scheme://host[:port], such as "
                                 f"'http://localhost:3000'), nor '*'")
            self.origins.add(key)

    @property
    def enabled(self) -> bool:
        return self.any or bool(self.origins)

    def allows(self, origin: str) -> bool:
        return self.any or _origin_key(origin) in self.origins

    @staticmethod
    def same_origin(origin: str, host_header: Optional[str], scheme: str) -> bool:
        """Whether a request's Origin is the server's own, as the Host header names it."""
        key = _origin_key(origin)
        if key is None or host_header is None or key[0] != scheme:
            return False
        try:
            parts = urlsplit(f"{scheme}://{host_header.strip()}")
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError:
            return False
        return (parts.hostname or "").rstrip(".") == key[1] and port == key[2]


# ---- the middleware -----------------------------------------------------------------------

def route_path(scope) -> str:
    """The request's path within the app: without the root_path of a mount (uvicorn's
    --root-path, Ray's route_prefix), which ASGI servers leave at its front."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root):] or "/"
    return path


class Refusal(Exception):
    """A request answered by the guard itself: status, OpenAI's error body, extra headers."""

    def __init__(self, status: int, reason: str, message: str, code: str, close: bool = False,
                 headers: Sequence[Tuple[bytes, bytes]] = (), kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.reason, self.message, self.code, self.close = status, reason, message, code, close
        self.headers, self.kind = list(headers), kind


class _Gone(Exception):
    """The client disconnected before its body arrived."""


class Guard:
    """The ASGI middleware (plain, so that streams and their disconnects pass untouched).

    Paths are the app's own (after a mount's root_path). protect_paths: prefixes of the paths
    that need the API key (when one is set). gate: asked for each POST to gated_paths (the
    requests that tokenize or generate) once its body is read, before it is parsed,
    `gate.enter(scope)` says why the server takes no more now (a 503 with Retry-After:
    retry_after seconds) or None, and `gate.leave(scope)` is called once the request is over.
    docs_paths: FastAPI's pages that load from a CDN (DOCS_CSP). WebSocket connections get the
    Host and Origin rules (a refusal closes them with code 1008)."""

    def __init__(self, app, *, hosts: HostRule, origins: OriginRule, api_key: Optional[str],
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, read_timeout: float = DEFAULT_READ_TIMEOUT,
                 statuses: Optional[Dict[str, int]] = None, refused: Optional[Dict[str, int]] = None,
                 gate=None, retry_after: int = 1,
                 protect_paths: Tuple[str, ...] = ("/v1/", "/tokenize", "/detokenize"),
                 gated_paths: Tuple[str, ...] = ("/v1/completions", "/v1/chat/completions", "/tokenize",
                                                 "/detokenize"),
                 docs_paths: Tuple[str, ...] = ("/docs", "/redoc")):
        self.app, self.hosts, self.origins, self.api_key = app, hosts, origins, api_key
        self.gate, self.retry_after, self.gated_paths = gate, retry_after, gated_paths
        self.max_request_bytes, self.read_timeout = int(max_request_bytes), float(read_timeout)
        self.protect_paths, self.docs_paths = protect_paths, docs_paths
        # Counters, for /metrics: responses by status, refusals by reason (the app's dicts).
        self.statuses: Dict[str, int] = {} if statuses is None else statuses
        self.refused: Dict[str, int] = {} if refused is None else refused

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = scope["headers"]
        hosts = [v for k, v in headers if k == b"host"]
        host = hosts[0].decode("latin-1") if len(hosts) == 1 else None
        origin_raw = [v for k, v in headers if k == b"origin"]
        origin = origin_raw[0].decode("latin-1") if origin_raw else None
        path = route_path(scope)
        cors: list = []
        gated = False
        try:
            if not self.hosts.allows(host):
                shown = "none" if host is None else repr(host) if len(hosts) == 1 else "several"
                raise Refusal(400, "host", f"this server does not answer for the Host {shown}: when it listens on "
                                           f"a loopback address it answers only localhost, 127.0.0.1 and [::1], "
                                           f"which protects it from DNS rebinding; add names with --allowed-hosts",
                              "host_not_allowed")
            scheme = scope.get("scheme", "http").replace("ws", "http")
            if origin is not None and not self.origins.same_origin(origin, host, scheme):
                if not self.origins.allows(origin):
                    raise Refusal(403, "origin", f"requests from the web origin {origin!r} are not allowed: give it "
                                                 f"to the server with --allowed-origins to let its pages call the "
                                                 f"API", "origin_not_allowed")
                cors = self._cors_headers(origin)
            if scope["type"] == "websocket":  # the same Host and Origin rules; nothing else applies
                return await self.app(scope, receive, send)
            method = scope["method"]
            if cors and method == "OPTIONS" and any(k == b"access-control-request-method" for k, _ in headers):
                return await self._preflight(scope, send, cors)
            self._check_key(path, headers)
            if method in BODY_METHODS:
                receive = await self._body(scope, receive)
            # After the body: a client slow to send it holds no place meanwhile.
            if self.gate is not None and method == "POST" and path in self.gated_paths:
                why = self.gate.enter(scope)
                if why is not None:
                    raise Refusal(503, "busy", why, "server_busy", kind="server_error",
                                  headers=[(b"retry-after", str(self.retry_after).encode())])
                gated = True
        except Refusal as r:
            self._count(r.reason)
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008, "reason": r.message[:120]})
            return await self._respond(send, r.status, error_body(r.status, r.message, r.code, kind=r.kind), cors,
                                       r.headers + ([(b"connection", b"close")] if r.close else []))
        except _Gone:
            return

        started = False

        async def guarded_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = dict(message, headers=self._headers(path, list(message.get("headers", [])), cors))
                self._status(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, guarded_send)
        except Exception:
            # What the app did not answer becomes OpenAI's 500 here, with this guard's headers
            # (Starlette's own 500, further out, has none); the traceback goes to the log.
            logger.exception("%s %s failed", scope.get("method"), path)
            if started:
                raise
            await self._respond(send, 500, error_body(500, "the server failed on this request (its log says how)",
                                                      "internal_error", kind="server_error"), cors, [])
        finally:
            if gated:
                self.gate.leave(scope)

    # -- the checks --

    def _check_key(self, path: str, headers) -> None:
        key = self.api_key
        if key is None or not path.startswith(self.protect_paths):
            return
        auth = next((v for k, v in headers if k == b"authorization"), b"").decode("latin-1")
        given = auth[7:] if auth.lower().startswith("bearer ") else None
        if given is None or not secrets.compare_digest(given.encode("latin-1"), key.encode("utf-8")):
            what = "Missing API key" if given is None else "Incorrect API key provided"
            raise Refusal(401, "api_key", f"{what}: send 'Authorization: Bearer <key>'", "invalid_api_key")

    async def _body(self, scope, receive):
        """Reads the whole body (bounded in size and time) and returns a receive that replays
        it, then waits for the client's disconnect as the server's own receive does."""
        ctype = next((v for k, v in scope["headers"] if k == b"content-type"), b"").decode("latin-1")
        if ctype.split(";")[0].strip().lower() != "application/json":
            raise Refusal(415, "media_type", f"request bodies must be 'Content-Type: application/json', got "
                                             f"{ctype or 'none'!r}", "unsupported_media_type")
        limit = self.max_request_bytes
        lengths = [v for k, v in scope["headers"] if k == b"content-length"]
        if lengths:
            if len(lengths) != 1 or not lengths[0].strip().isdigit():
                raise Refusal(400, "bad_length", "the Content-Length header is not one number",
                              "invalid_content_length", close=True)
            if int(lengths[0]) > limit:
                raise Refusal(413, "too_large", f"the request body is {int(lengths[0])} bytes; this server takes at "
                                                f"most {limit} (--max-request-bytes)", "request_too_large",
                              close=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.read_timeout
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
            except asyncio.TimeoutError:
                raise Refusal(408, "timeout", f"the request body did not arrive within {self.read_timeout:g} s "
                                              f"(--read-timeout)", "request_timeout", close=True) from None
            if message["type"] == "http.disconnect":
                raise _Gone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise Refusal(413, "too_large", f"the request body is over {limit} bytes, the most this server "
                                                f"takes (--max-request-bytes)", "request_too_large", close=True)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()
        return replay

    # -- responses --

    def _cors_headers(self, origin: str) -> list:
        if self.origins.any:
            return [(b"access-control-allow-origin", b"*"), (b"access-control-expose-headers", CORS_EXPOSED.encode())]
        return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin"),
                (b"access-control-expose-headers", CORS_EXPOSED.encode())]

    async def _preflight(self, scope, send, cors: list) -> None:
        asked = next((v for k, v in scope["headers"] if k == b"access-control-request-headers"), b"")
        headers = cors + [(b"access-control-allow-methods", CORS_METHODS.encode()),
                          (b"access-control-max-age", PREFLIGHT_MAX_AGE.encode())]
        if asked:
            headers.append((b"access-control-allow-headers", asked))
        await self._respond(send, 204, b"", [], headers)

    def _headers(self, path: str, headers: list, cors: list) -> list:
        names = {k.lower() for k, _ in headers}
        out = headers + [h for h in cors if h[0] not in names]
        out.append((b"x-content-type-options", b"nosniff"))
        out.append((b"cross-origin-resource-policy", b"same-origin"))
        ctype = next((v for k, v in headers if k.lower() == b"content-type"), b"")
        if ctype.startswith(b"text/html") and b"content-security-policy" not in names:
            csp = DOCS_CSP if path in self.docs_paths else PAGE_CSP
            out.append((b"content-security-policy", csp.encode()))
        return out

    async def _respond(self, send, status: int, body: bytes, cors: list, extra: list) -> None:
        headers = [(b"content-type", b"application/json")] if body else []
        headers += [(b"content-length", str(len(body)).encode())] + extra
        headers = self._headers("", headers, cors)
        self._status(status)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    def _status(self, status: int) -> None:
        self.statuses[str(status)] = self.statuses.get(str(status), 0) + 1

    def _count(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1


__all__ = ["Guard", "HostRule", "OriginRule", "is_loopback", "open_warning", "error_body", "PAGE_CSP",
           "DEFAULT_MAX_REQUEST_BYTES", "DEFAULT_READ_TIMEOUT"]
