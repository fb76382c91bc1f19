"""``copydet serve``: the query service as a Ray Serve application with a FastAPI ingress.

Routes: ``POST /v1/match`` (one image: raw bytes with an ``image/*`` or
``application/octet-stream`` type, or ``multipart/form-data`` with a file field ``image``),
``POST /v1/match:batch`` (multipart, several ``images`` fields), ``GET /healthz``,
``GET /v1/references/{id}/thumbnail``, ``GET /`` (the match page) and ``GET /docs`` (OpenAPI).

Each replica holds the models and one index version (:class:`jobs.serve.engine.Matcher`);
concurrent requests are embedded as one batch (``@serve.batch``). A watcher thread loads a
newly published version beside the old one and swaps it in when ready, so no request is
dropped and in-flight batches finish on the version they started with. Replicas, resources,
batching and limits come from the ``serve`` section of the index's config.
"""
# No `from __future__ import annotations` here: FastAPI reads the route parameters' types at
# run time, and Serve's ingress re-wraps these methods outside this module's namespace.
import asyncio
import io
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve
from ray.serve.exceptions import RayServeException
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.imageio import ImageDecodeError, decode_rgb, load_rgb
from ensemble.index.layout import IndexDir, IndexFolderError
from jobs.config import PipelineConfig
from jobs.runtime import require_gpus
from jobs.serve.engine import Matcher
from jobs.serve.uploads import BadRequest, read_images, read_upload

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("page.html")
APP_NAME = "copydet"

api = FastAPI(title="copydet", version="1",
              description="Image copy detection against a living reference index: is this upload a copy, "
                          "of what, how sure?")


def refusal(e: Exception) -> BadRequest:
    """``e`` in the API's error shape: itself when the service refused the request, else a 500
    whose trace goes to the replica's log (a client never parses a plain-text 500)."""
    if isinstance(e, BadRequest):
        return e
    log.error("serve: unexpected error", exc_info=e)
    return BadRequest(500, "internal_error", f"{type(e).__name__} (the service's log has the details)")


def error_body(bad: BadRequest) -> dict:
    return {"error": {"code": bad.code, "message": str(bad)}}


def error(e: Exception) -> JSONResponse:
    bad = refusal(e)
    return JSONResponse(error_body(bad), status_code=bad.status)


@api.exception_handler(StarletteHTTPException)
async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    """Routing errors (unknown path, wrong method) in the API's error shape too."""
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
    return JSONResponse(error_body(BadRequest(e.status_code, code, f"{request.method} {request.url.path}: "
                                                                   f"{e.detail}")),
                        status_code=e.status_code, headers=getattr(e, "headers", None))


@serve.deployment
@serve.ingress(api)
class CopyDetService:
    """One model replica: the models, the published index version, and a watcher for new ones."""

    def __init__(self, root: str, overrides: Sequence[str] = ()) -> None:
        self.root, self.overrides = root, list(overrides)
        self.matcher = Matcher(root, None, self.overrides)
        cfg = self.matcher.cfg.serve
        self.limits = cfg
        self.match_batch.set_max_batch_size(cfg.max_batch_size)
        self.match_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        # Uploads held decoded at once, from decoding to their answer: the batch being embedded and
        # the next. The other requests wait as bytes (at serve.max_pixels, one decodes to 150 MB).
        self.decoded = asyncio.Semaphore(2 * cfg.max_batch_size)
        self.load_error: str | None = None
        self.stop = threading.Event()
        threading.Thread(target=self.watch, daemon=True, name="index-watcher").start()

    def watch(self) -> None:
        """Load each newly published version off the request path, then swap it in."""
        while not self.stop.wait(self.limits.poll_s):
            error = self.poll()
            if error and error != self.load_error:
                log.error(f"serve: {error}; still answering from {self.matcher.version}")
            self.load_error = error

    def poll(self) -> str | None:
        """Swap in the published version if it is new; why it could not be loaded, if it could not
        (a bad version must not stop the service: it keeps answering from the old one)."""
        try:
            current = IndexDir(self.root).current()
            if current and current != self.matcher.version:
                self.matcher = Matcher(self.root, current, self.overrides, reuse=self.matcher)
                log.info(f"serve: now answering from index version {current}")
        except Exception as e:
            return f"the published index version does not load ({type(e).__name__}: {e})"
        return None

    def __del__(self) -> None:
        self.stop.set()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def match_batch(self, uploads: list) -> list[dict]:
        """``(image, bytes)`` pairs of concurrent requests, answered as one batch."""
        matcher = self.matcher  # this batch stays on this version even if a new one is swapped in
        return await asyncio.to_thread(matcher.match, [img for img, _ in uploads], [data for _, data in uploads])

    async def decode(self, data: bytes, name: str) -> tuple[object, float]:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            img = await asyncio.to_thread(decode_rgb, data, name, None, self.limits.max_pixels)
        except ImageDecodeError as e:
            raise BadRequest(422, "too_many_pixels" if "too many pixels" in e.reason else "not_an_image",
                             str(e)) from e
        return img, loop.time() - t0

    async def answer(self, data: bytes, name: str) -> dict:
        async with self.decoded:
            img, seconds = await self.decode(data, name)
            result = await self.match_batch((img, data))
        result = {**result, "timings": {"decode": round(seconds, 4), **result["timings"]}}
        result["timings"]["total"] = round(sum(v for k, v in result["timings"].items() if k != "total"), 4)
        return result

    @api.post("/v1/match", summary="Is this image a copy of a reference? Top matches, scores, verification")
    async def match(self, request: Request) -> JSONResponse:
        try:
            data, name = await read_upload(request, self.limits.max_upload_bytes, self.limits.max_request_bytes)
            return JSONResponse(await self.answer(data, name))
        except Exception as e:
            return error(e)

    @api.post("/v1/match:batch", summary="Several images (multipart fields `images`); one result or error each")
    async def match_many(self, request: Request) -> JSONResponse:
        try:
            uploads = await read_images(request, self.limits.max_upload_bytes, self.limits.max_request_bytes)
        except Exception as e:
            return error(e)

        async def one(data: bytes | BadRequest, name: str) -> dict:
            try:
                if isinstance(data, BadRequest):
                    raise data
                return {"name": name, **(await self.answer(data, name))}
            except Exception as e:
                return {"name": name, **error_body(refusal(e))}
        return JSONResponse({"results": list(await asyncio.gather(*(one(d, n) for d, n in uploads)))})

    @api.get("/healthz", summary="Liveness, which index version answers, and whether it is the published one")
    async def healthz(self) -> dict:
        m, error = self.matcher, self.load_error
        try:
            published = IndexDir(self.root).current()
        except IndexFolderError:  # CURRENT names no version: load_error says so
            published = None
        status = "ok" if published == m.version else "stale" if error else "loading"
        return {"status": status, "version": m.version, "published": published, "load_error": error,
                "references": len(m.index.paths), "keys": sorted(m.index.keys), "threshold": m.cfg.copy_threshold()}

    @api.get("/v1/references/{reference_id:path}/thumbnail", summary="A reference image, shrunk")
    async def thumbnail(self, reference_id: str) -> Response:
        path = self.matcher.index.paths.get(reference_id)
        if path is None:
            return error(BadRequest(404, "unknown_reference", f"{reference_id}: not a live reference of this index"))
        try:
            img = await asyncio.to_thread(load_rgb, path, self.limits.thumbnail_side)
        except ImageDecodeError as e:  # the reason, not the server's path
            log.warning(f"serve: thumbnail of {reference_id}: {e}")
            return error(BadRequest(404, "reference_unreadable",
                                    f"{reference_id}: its image does not read ({e.reason})"))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        return Response(buf.getvalue(), media_type="image/jpeg")

    @api.get("/", response_class=HTMLResponse, summary="The match page")
    async def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE.read_text())


def application(root: str, cfg: PipelineConfig, overrides: Sequence[str] = ()) -> serve.Application:
    """The bound Serve application, replicas and resources from ``cfg.serve``."""
    s = cfg.serve
    return CopyDetService.options(
        num_replicas=s.num_replicas, max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        ray_actor_options={"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
    ).bind(str(Path(root).resolve()), list(overrides))


def start(root: str, cfg: PipelineConfig, overrides: Sequence[str] = ()) -> str:
    """Start Serve's HTTP proxy on ``serve.host:serve.port`` and deploy the app; returns its URL.
    Ray must be initialised (``jobs.runtime.init_ray``). On a cluster whose Serve already runs, the
    app joins that Serve's proxy (its host and port, not the config's); a copydet app already
    deployed there is refused: deploying would replace it unseen."""
    running = serve.status()
    if APP_NAME in running.applications:
        raise RuntimeError(f"a copydet service already runs on this Ray cluster (Serve app {APP_NAME!r}); "
                           "stop it first (SIGTERM or Ctrl-C to its `copydet serve`)")
    require_gpus(cfg.serve.num_gpus, "serve.num_gpus")
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(application(root, cfg, overrides), name=APP_NAME, route_prefix="/", blocking=False)
    if running.applications or running.proxies:
        http = serve.context._get_global_client().http_config  # no public API names a running Serve's port
        log.warning(f"Ray Serve already ran on this cluster: the service is on its proxy at {http.host}:{http.port} "
                    "(serve.host / serve.port apply to a Serve that copydet starts)")
        return f"http://{http.host}:{http.port}"
    return f"http://{cfg.serve.host}:{cfg.serve.port}"


def stop() -> None:
    """Stop serving: the app is deleted first, so replicas answer the requests they hold while the
    proxy still relays them (Serve's graceful shutdown), then Serve itself unless other apps use it."""
    try:
        serve.delete(APP_NAME)
    except RayServeException:  # Serve never started (a stop while starting)
        return
    if not serve.status().applications:
        serve.shutdown()
