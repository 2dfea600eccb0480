"""The web console (HTTPS, browser client certificates).

:mod:`gateway.web.server` runs it (the node's TLS terminator in front of uvicorn);
:mod:`gateway.web.app` builds the Starlette application: every request is admitted by
the node's one gatekeeper (:mod:`gateway.gate`) and the one authorization table
(:data:`gateway.authz.POLICY`, ``/console/...`` entries), state-changing requests carry a
CSRF token, every response a strict Content-Security-Policy. The core's pages (home,
transfers, the officer's audit pages) are in :mod:`gateway.web.officer`; each role adds
its own through :meth:`gateway.roles.RoleHooks.console_pages`.
"""
