"""A small Kubernetes API server for the pool watcher: answers the few API paths
KubernetesPoolWatcher uses (pods list + watch, one InferencePool get + watch), in the API
server's wire format (lists, newline-delimited watch events, 404 Status), from in-memory
state. Shared by test_endpoints_pool.py and test_chart_args.py."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web


class FakeApiServer:
    """Answers the API paths KubernetesPoolWatcher uses, from in-memory state."""

    def __init__(self, pools: dict[str, dict], pool_name: str = "llm") -> None:
        self.pools = pools  # "group/version" -> pool object
        self.pool_name = pool_name
        self.pods: list[dict] = []
        self.pod_events: asyncio.Queue[dict | None] = asyncio.Queue()
        self.pool_events: asyncio.Queue[dict | None] = asyncio.Queue()
        # InferenceObjectives / InferenceModelRewrites (inference.networking.x-k8s.io/v1alpha2)
        # by plural: the listed items, and the watch's events.
        self.objects: dict[str, list[dict]] = {
            "inferenceobjectives": [],
            "inferencemodelrewrites": [],
        }
        self.object_events: dict[str, asyncio.Queue[dict | None]] = {
            plural: asyncio.Queue() for plural in self.objects
        }
        self.pod_lists = 0
        self.closing = False
        app = web.Application()
        app.router.add_get("/api/v1/namespaces/{ns}/pods", self.pods_handler)
        app.router.add_get(
            "/apis/{group}/{version}/namespaces/{ns}/inferencepools/{name}", self.pool_get
        )
        app.router.add_get(
            "/apis/{group}/{version}/namespaces/{ns}/inferencepools", self.pool_watch
        )
        for plural in self.objects:
            app.router.add_get(
                f"/apis/inference.networking.x-k8s.io/v1alpha2/namespaces/{{ns}}/{plural}",
                self.objects_handler,
            )
        self.runner = web.AppRunner(app)

    async def start(self) -> str:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}"

    async def _stream(self, request: web.Request, queue: asyncio.Queue) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        while not self.closing:
            try:
                event = await asyncio.wait_for(queue.get(), 0.05)
            except TimeoutError:
                continue
            if event is None:
                break  # drop the watch
            await response.write(json.dumps(event).encode() + b"\n")
        return response

    async def pods_handler(self, request: web.Request) -> web.StreamResponse:
        if self.closing:
            raise web.HTTPServiceUnavailable()
        if request.query.get("watch") in ("true", "True", "1"):
            return await self._stream(request, self.pod_events)
        self.pod_lists += 1
        return web.json_response(
            {"kind": "PodList", "metadata": {"resourceVersion": "5"}, "items": self.pods}
        )

    async def pool_get(self, request: web.Request) -> web.Response:
        key = f"{request.match_info['group']}/{request.match_info['version']}"
        if key not in self.pools:
            return web.json_response(
                {"kind": "Status", "code": 404, "reason": "NotFound"}, status=404
            )
        return web.json_response(self.pools[key])

    async def pool_watch(self, request: web.Request) -> web.StreamResponse:
        assert request.query.get("fieldSelector") == f"metadata.name={self.pool_name}"
        return await self._stream(request, self.pool_events)

    async def objects_handler(self, request: web.Request) -> web.StreamResponse:
        plural = request.path.rsplit("/", 1)[1]
        if request.query.get("watch") in ("true", "True", "1"):
            return await self._stream(request, self.object_events[plural])
        return web.json_response(
            {"kind": "List", "metadata": {"resourceVersion": "7"}, "items": self.objects[plural]}
        )

    async def stop(self) -> None:
        self.closing = True
        await self.runner.cleanup()
