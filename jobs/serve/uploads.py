"""Reading image uploads off a request, or a :class:`BadRequest` that says what is wrong.

Accepted: the raw bytes with an ``image/*`` or ``application/octet-stream`` content type, or
``multipart/form-data`` with file fields (``image`` for one, ``images`` for several). Sizes are
checked against the declared length before anything is read, and counted while reading (a
chunked body declares none): ``serve.max_upload_bytes`` a file, ``serve.max_request_bytes`` a
multipart request.
"""
from __future__ import annotations

from collections.abc import AsyncGenerator

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartParser
from starlette.requests import Request

RAW_TYPES = ("image/", "application/octet-stream")
MULTIPART = "multipart/form-data"
MAX_FILES = 64


class BadRequest(ValueError):
    """A request the service refuses: HTTP ``status``, a stable ``code`` and a message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def too_large(size: int, limit: int, key: str = "serve.max_upload_bytes") -> BadRequest:
    return BadRequest(413, "too_large", f"upload of {size} bytes is over the limit of {limit} bytes ({key})")


def content_type(request: Request) -> str:
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if not kind.startswith((*RAW_TYPES, MULTIPART)):
        raise BadRequest(415, "unsupported_media_type",
                         f"content type {kind or '(none)'!r} is not an image upload; send the image bytes as "
                         f"image/* or application/octet-stream, or {MULTIPART} with a file field 'image'")
    return kind


async def _capped(request: Request, limit: int, key: str) -> AsyncGenerator[bytes, None]:
    """The body's chunks, refused (naming the config ``key``) once more than ``limit`` bytes
    arrived: a declared length is checked first, a chunked body as it arrives."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(int(declared), limit, key)
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise too_large(seen, limit, key)
        yield chunk


async def _body(request: Request, limit: int) -> bytes:
    return b"".join([chunk async for chunk in _capped(request, limit, "serve.max_upload_bytes")])


async def _files(request: Request, limit: int) -> list[tuple[str, UploadFile]]:
    parser = MultiPartParser(request.headers, _capped(request, limit, "serve.max_request_bytes"), max_files=MAX_FILES)
    try:
        form = await parser.parse()
    except BadRequest:
        raise
    except Exception as e:  # starlette raises its own MultiPartException types
        raise BadRequest(400, "bad_multipart", f"cannot read the multipart body: {e}") from e
    return [(field, v) for field, v in form.multi_items() if isinstance(v, UploadFile)]


async def _read(upload: UploadFile, limit: int) -> bytes:
    if upload.size is not None and upload.size > limit:
        raise too_large(upload.size, limit)
    return await upload.read()


async def read_upload(request: Request, limit: int, request_limit: int) -> tuple[bytes, str]:
    """``(bytes, name)`` of the one image of a ``/v1/match`` request."""
    if content_type(request) != MULTIPART:
        return await _body(request, limit), "upload"
    files = await _files(request, request_limit)
    picked = [u for field, u in files if field == "image"] or [u for _, u in files]
    if not picked:
        raise BadRequest(400, "no_image", "multipart body has no file field; send the image as field 'image'")
    return await _read(picked[0], limit), picked[0].filename or "upload"


async def read_images(request: Request, limit: int, request_limit: int) -> list[tuple[bytes | BadRequest, str]]:
    """``(bytes, name)`` of every file of a ``/v1/match:batch`` request (multipart only); a file
    over the size limit gives its refusal in place of its bytes, so the others are still answered."""
    if content_type(request) != MULTIPART:
        raise BadRequest(415, "unsupported_media_type", f"a batch is sent as {MULTIPART} with file fields 'images'")
    files = await _files(request, request_limit)
    if not files:
        raise BadRequest(400, "no_image", "multipart body has no file field; send the images as fields 'images'")
    out: list[tuple[bytes | BadRequest, str]] = []
    for i, (_, upload) in enumerate(files):
        try:
            data: bytes | BadRequest = await _read(upload, limit)
        except BadRequest as e:
            data = e
        out.append((data, upload.filename or f"image{i}"))
    return out
