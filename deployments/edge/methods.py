"""The methods a path allows, said the same way everywhere.

Starlette answers a method a path does not take with the methods of the first route that matched
the path, so `OPTIONS /v1/subjects` said `Allow: POST` though GET works too. Here every route of
the path counts: OPTIONS is answered 204 with all of them in `Allow`, and any other method none
of them takes is 405 with the same `Allow` and a detail naming them. Paths no route knows (and
mounted static files, which answer their own methods) go on to the app as they are.
"""

from __future__ import annotations

from typing import Any, Optional

from starlette.routing import Match, Mount

from .http_edge import Receive, Scope, Send, answer


CANDIDATES = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def matching_route(router: Any, scope: Scope, method: str) -> Any:
    """The route of `router` that takes `method` at the scope's path, or None."""
    probe = {**scope, "method": method}
    for route in router.routes:
        if route.matches(probe)[0] is Match.FULL:
            return route
    return None


def takes_body(router: Any, scope: Scope) -> bool:
    """Whether a route (not a mount: static files take no bodies) takes the request's method at
    its path: only then does the edge read a body (http_edge.py)."""
    route = matching_route(router, scope, scope["method"])
    return route is not None and not isinstance(route, Mount)


class AllowedMethods:
    """ASGI middleware; `router`: the app's router, read at each request (routes are added after
    the middleware is). Routes are asked through `matches`, Starlette's own interface, one
    candidate method at a time, so routers FastAPI nests are asked as its own router asks them."""

    def __init__(self, app: Any, router: Any) -> None:
        self.app = app
        self.router = router

    def _route(self, scope: Scope, method: str) -> Any:
        return matching_route(self.router, scope, method)

    def allowed(self, scope: Scope) -> Optional[set[str]]:
        """The methods the path takes; None where a mount answers (it says its own)."""
        methods = set()
        for method in CANDIDATES:
            route = self._route(scope, method)
            if isinstance(route, Mount):
                return None
            if route is not None:
                methods.add(method)
        return methods

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._route(scope, scope["method"]) is not None:
            return await self.app(scope, receive, send)
        methods = self.allowed(scope)
        if not methods:
            return await self.app(scope, receive, send)  # unknown here: the app's 404
        allow = ", ".join(sorted(methods | {"OPTIONS"}))
        if scope["method"] == "OPTIONS":
            await send({"type": "http.response.start", "status": 204, "headers": [(b"allow", allow.encode())]})
            return await send({"type": "http.response.body", "body": b""})
        await answer(send, 405, f"{scope['method']} is not allowed here; this path allows {allow}",
                     headers={"Allow": allow})
