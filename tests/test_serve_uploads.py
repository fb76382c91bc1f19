"""Reading uploads off a request (jobs.serve.uploads): limits hold while the body arrives."""
from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from jobs.serve.uploads import BadRequest, read_images, read_upload

CHUNK = 64 * 1024
BOUNDARY = b"xyzzy"


def chunked_multipart(total_chunks: int, sent: list[int]) -> Request:
    """A multipart POST whose file part is ``total_chunks`` x 64 KiB, sent chunked (no length);
    ``sent`` counts the chunks the server pulled."""
    head = (b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="images"; filename="a.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n")

    async def receive() -> dict:
        sent.append(1)
        n = len(sent)
        body = head if n == 1 else b"\xff" * CHUNK if n <= total_chunks else b"\r\n--" + BOUNDARY + b"--\r\n"
        return {"type": "http.request", "body": body, "more_body": n <= total_chunks}

    scope = {"type": "http", "method": "POST", "path": "/v1/match:batch", "query_string": b"",
             "headers": [(b"content-type", b"multipart/form-data; boundary=" + BOUNDARY),
                         (b"transfer-encoding", b"chunked")]}
    return Request(scope, receive)


@pytest.mark.parametrize("read", [read_upload, read_images])
def test_a_chunked_multipart_body_is_refused_once_past_the_request_limit(read):
    """It declares no length: the whole body (2 GiB in the audit) was spooled to disk before the
    size was checked; now reading stops at the limit."""
    sent: list[int] = []
    with pytest.raises(BadRequest) as e:
        asyncio.run(read(chunked_multipart(10_000, sent), 10 * CHUNK, 20 * CHUNK))
    assert e.value.status == 413 and "(serve.max_request_bytes)" in str(e.value)
    assert len(sent) <= 22  # the head and 20 chunks fit; the next one is over: 640 MiB were never read


def test_a_chunked_multipart_body_under_the_limits_is_read_whole():
    sent: list[int] = []
    [(data, name)] = asyncio.run(read_images(chunked_multipart(8, sent), 10 * CHUNK, 20 * CHUNK))
    assert name == "a.jpg" and data == b"\xff" * (7 * CHUNK)
