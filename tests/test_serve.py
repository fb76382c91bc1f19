"""`copydet serve` on Ray Serve over HTTP: the batch answer, bad requests, the match page in a real
browser, and a newly published index version picked up without dropping requests.

One service for the module: the bundled sample, a random-init resnet18 at 128 px with crop views,
normalisation and SIFT verification, indexed from the batch run of the same config.
"""
import csv
import io
import shutil
import threading
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

from jobs import adding, indexing
from jobs.config import DEFAULT_SAMPLE, load_config
from jobs.pipeline import run_pipeline
from tests.conftest import free_port

REPO = Path(__file__).resolve().parent.parent
OUTPUT = REPO / "test-output"  # the browser test's screenshot lands here
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync"]
QUERIES = DEFAULT_SAMPLE / "queries"



def service_config(root: Path):
    return load_config(None, [f"output={root / 'run'}", "models.0.scales=[128]", "patches.shard_size=16",
                              "verify.enabled=true", "verify.top_k=3", "verify.min_inliers=8",
                              f"serve.port={free_port()}", "serve.max_upload_bytes=1000000",
                              "serve.max_pixels=4000000", "serve.poll_s=0.3", "serve.max_batch_size=4"])


@pytest.fixture(scope="module")
def service(ray_local, tmp_path_factory):
    from ray import serve

    from jobs.serve.app import start
    root = tmp_path_factory.mktemp("serve")
    cfg = service_config(root)
    run_pipeline(cfg)
    index = root / "index"
    indexing.build_from_run(str(root / "run"), str(index), cfg)
    url = start(str(index), cfg)
    wait_until(lambda: requests.get(f"{url}/healthz", timeout=5).ok, timeout=300)
    yield url, index, root
    serve.shutdown()


def wait_until(ok, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            if ok():
                return
        except requests.ConnectionError:
            pass
        if time.time() > deadline:
            raise TimeoutError("the service never answered as expected")
        time.sleep(0.5)


def post(url: str, data: bytes, kind: str = "image/jpeg") -> requests.Response:
    return requests.post(f"{url}/v1/match", data=data, headers={"Content-Type": kind}, timeout=60)


def test_http_answers_equal_batch_predictions(service):
    url, _, root = service
    batch: dict[str, list[tuple[str, float]]] = {}
    with open(root / "run" / "predictions.csv") as f:
        for r in csv.DictReader(f):
            batch.setdefault(r["query_id"], []).append((r["reference_id"], float(r["score"])))
    files = sorted(QUERIES.glob("*.jpg"))
    for f in files:
        answer = post(url, f.read_bytes()).json()
        want = sorted(batch[f.stem], key=lambda x: -x[1])
        assert [m["reference_id"] for m in answer["matches"]] == [r for r, _ in want], f.stem
        assert all(abs(m["score"] - s) < 1e-4 for m, (_, s) in zip(answer["matches"], want)), f.stem
        assert answer["is_copy"] == (answer["matches"][0]["score"] >= answer["threshold"])
        assert {"decode", "views", "model", "search", "verify", "total"} <= set(answer["timings"])
    several = [("images", (f.name, f.read_bytes(), "image/jpeg")) for f in files[:3]]
    results = requests.post(f"{url}/v1/match:batch", files=several, timeout=60).json()["results"]
    assert [[m["reference_id"] for m in r["matches"]] for r in results] == \
        [[x for x, _ in sorted(batch[f.stem], key=lambda x: -x[1])] for f in files[:3]]
    multipart = requests.post(f"{url}/v1/match", files={"image": ("q.jpg", files[0].read_bytes())}, timeout=60)
    assert multipart.json()["matches"] == post(url, files[0].read_bytes()).json()["matches"]
    assert "/v1/match" in requests.get(f"{url}/openapi.json", timeout=10).json()["paths"]
    assert requests.get(f"{url}/docs", timeout=10).ok


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size).save(buf, "PNG")
    return buf.getvalue()


def test_bad_requests_get_4xx_and_the_server_keeps_answering(service):
    url, _, _ = service
    good = (QUERIES / "Q0001.jpg").read_bytes()
    cases = [  # (body, content type, status, error code, words in the message)
        (b"this is not an image", "image/jpeg", 422, "not_an_image", "not an image"),
        (good[: len(good) // 2], "image/jpeg", 422, "not_an_image", "truncated"),
        (_png((3000, 3000)), "image/png", 422, "too_many_pixels", "too many pixels"),  # 9 Mpx > serve.max_pixels
        (b"\xff" * 1_000_001, "image/jpeg", 413, "too_large", "over the limit"),
        (good, "text/plain", 415, "unsupported_media_type", "text/plain"),
        (b"", "image/jpeg", 422, "not_an_image", "empty"),
    ]
    for body, kind, status, code, words in cases:
        r = post(url, body, kind)
        assert r.status_code == status, (code, r.text)
        err = r.json()["error"]
        assert err["code"] == code and words in err["message"], err
        assert post(url, good).status_code == 200  # still up, still answering
    r = requests.post(f"{url}/v1/match", files={"other": ("x.txt", b"hi", "text/plain")}, data={"a": "b"},
                      timeout=30)
    assert r.status_code == 422 and r.json()["error"]["code"] == "not_an_image"
    r = requests.post(f"{url}/v1/match", files={"a": (None, "b")}, timeout=30)  # a form field, no file
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_image"
    assert requests.get(f"{url}/v1/references/nope/thumbnail", timeout=10).status_code == 404
    mixed = requests.post(f"{url}/v1/match:batch", timeout=60, files=[
        ("images", ("ok.jpg", good, "image/jpeg")), ("images", ("bad.jpg", b"nope", "image/jpeg"))]).json()
    assert "matches" in mixed["results"][0] and mixed["results"][1]["error"]["code"] == "not_an_image"
    big = requests.post(f"{url}/v1/match:batch", timeout=60, files=[  # one file over the limit: its own 413
        ("images", ("big.jpg", b"\xff" * 1_000_001, "image/jpeg")), ("images", ("ok.jpg", good, "image/jpeg"))])
    assert big.status_code == 200, big.text
    assert big.json()["results"][0]["error"]["code"] == "too_large" and "matches" in big.json()["results"][1]
    for r, status, code in [(requests.get(f"{url}/v1/match", timeout=10), 405, "method_not_allowed"),
                            (requests.get(f"{url}/nope", timeout=10), 404, "not_found")]:
        assert r.status_code == status and r.json()["error"]["code"] == code, r.text  # the API's shape
    assert requests.get(f"{url}/healthz", timeout=10).json()["status"] == "ok"


def test_health_names_a_published_version_that_does_not_load(tmp_path):
    """The service keeps answering from the version it has, and says so, instead of reporting ok."""
    import asyncio

    from jobs.serve.app import CopyDetService
    service = CopyDetService.func_or_class
    (tmp_path / "versions" / "v000001").mkdir(parents=True)
    (tmp_path / "CURRENT").write_text("v000002\n")  # published, but not there: it cannot load
    index = type("Index", (), {"paths": {"R1": "r1.jpg"}, "keys": {"k": None}})
    cfg = type("Cfg", (), {"copy_threshold": lambda self: 0.5})()
    replica = type("Replica", (), {"root": str(tmp_path), "overrides": [], "load_error": None,
                                   "matcher": type("M", (), {"version": "v000001", "index": index, "cfg": cfg})})()

    replica.load_error = service.poll(replica)
    health = asyncio.run(service.healthz(replica))
    assert health["status"] == "stale" and health["version"] == "v000001" and "v000002" in health["load_error"]
    (tmp_path / "CURRENT").write_text("v000001\n")  # the operator points CURRENT back
    replica.load_error = service.poll(replica)
    assert asyncio.run(service.healthz(replica))["status"] == "ok"
    (tmp_path / "versions" / "v000002").mkdir()
    (tmp_path / "CURRENT").write_text("v000002\n")  # published, not yet picked up
    health = asyncio.run(service.healthz(replica))
    assert (health["status"], health["published"], health["load_error"]) == ("loading", "v000002", None)


def test_an_unexpected_error_answers_in_the_json_error_shape():
    """Not Starlette's plain-text 500: a client parses one error shape, the trace goes to the log."""
    import asyncio
    import json

    from jobs.serve.app import CopyDetService

    class Upload:  # the request's body stream breaks half way
        headers = {"content-type": "image/jpeg"}

        async def stream(self):
            yield b"\xff\xd8"
            raise OSError("connection reset")

    class Replica:
        limits = type("Limits", (), {"max_upload_bytes": 1000, "max_request_bytes": 2000})

    r = asyncio.run(CopyDetService.func_or_class.match(Replica(), Upload()))
    assert r.status_code == 500
    assert json.loads(r.body) == {"error": {"code": "internal_error",  # what went wrong stays in the log
                                            "message": "OSError (the service's log has the details)"}}


def test_a_replica_holds_a_bounded_number_of_uploads_decoded():
    """A batch request of 64 images, or 64 requests at once, must not sit decoded in one replica
    together (at serve.max_pixels an upload decodes to 150 MB): the rest wait as bytes."""
    import asyncio
    import io

    from PIL import Image

    from jobs.serve.app import CopyDetService
    service = CopyDetService.func_or_class
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    held = peak = 0

    class Replica:
        limits = type("Limits", (), {"max_pixels": 10**6})

        def __init__(self) -> None:
            self.decoded = asyncio.Semaphore(8)  # as __init__ sizes it for serve.max_batch_size 4

        async def decode(self, data: bytes, name: str):
            nonlocal held, peak
            held += 1
            peak = max(peak, held)
            return await service.decode(self, data, name)

        async def match_batch(self, upload):
            nonlocal held
            await asyncio.sleep(0.02)  # embedding the batch
            held -= 1
            return {"matches": [], "timings": {"embed": 0.02}}

    async def many() -> list[dict]:
        replica = Replica()
        return await asyncio.gather(*(service.answer(replica, png.getvalue(), f"u{i}.png") for i in range(40)))

    answers = asyncio.run(many())
    assert len(answers) == 40 and all(a["timings"]["embed"] == 0.02 for a in answers)
    assert peak == 8 and held == 0


def test_a_thumbnail_that_does_not_read_names_the_reference_not_the_servers_path(tmp_path):
    import asyncio
    import json

    from jobs.serve.app import CopyDetService

    class Replica:
        limits = type("Limits", (), {"thumbnail_side": 64})
        matcher = type("M", (), {"index": type("I", (), {"paths": {"R1": str(tmp_path / "private" / "R1.jpg")}})})

    r = asyncio.run(CopyDetService.func_or_class.thumbnail(Replica(), "R1"))
    assert r.status_code == 404
    assert json.loads(r.body) == {"error": {"code": "reference_unreadable",
                                            "message": "R1: its image does not read (file not found)"}}


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (.ci/install installs it)")
def test_match_page_in_a_real_browser(service):
    from playwright.sync_api import sync_playwright
    url, _, _ = service
    OUTPUT.mkdir(exist_ok=True)
    shot = OUTPUT / "match_page.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(url + "/")
            page.set_input_files("#file", str(QUERIES / "Q0014.jpg"))  # R0017 with text overlaid
            page.wait_for_selector("body[data-state=done]", timeout=60_000)
            rows = page.locator(".match")
            assert rows.count() >= 1
            assert rows.first.get_attribute("data-reference-id") == "R0017"
            assert "verified" in rows.first.inner_text()
            assert page.evaluate("document.querySelector('.match canvas').width") > 100  # the pair was drawn
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")


@pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed (.ci/install installs it)")
def test_the_match_page_shows_a_reference_id_as_text_never_as_html(service):
    """A reference id is a file name, which whoever adds references chooses: the page wrote it with
    innerHTML, so `<img src=x onerror=...>.jpg` ran its script in every viewer's page."""
    from playwright.sync_api import sync_playwright
    url, _, _ = service
    evil = '<img src=x onerror="document.body.dataset.pwned=1">'
    answer = {"matches": [{"reference_id": evil, "score": 0.9, "q_value": 0.05, "verified": False, "inliers": 3,
                           "copy_prob": None, "keypoints": []}],
              "is_copy": True, "threshold": 0.43807006, "version": "v000001",
              "batch_size": 1, "timings": {"embed": 0.1}}
    thumb = (QUERIES / "Q0014.jpg").read_bytes()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.route("**/v1/match", lambda route: route.fulfill(json=answer))
            page.route("**/thumbnail", lambda route: route.fulfill(body=thumb, content_type="image/jpeg"))
            page.goto(url + "/")
            page.set_input_files("#file", str(QUERIES / "Q0014.jpg"))
            page.wait_for_selector("body[data-state=done]", timeout=60_000)
            page.wait_for_timeout(300)  # an injected image's onerror would have fired by now
            assert page.evaluate("document.body.dataset.pwned") is None
            assert page.locator("#verdict img, .match .meta img").count() == 0
            assert f"copy of {evil}" in page.inner_text("#verdict")
            assert "threshold 0.438)" in page.inner_text("#verdict")  # rounded as the scores are
            assert f"#1 {evil}" in page.inner_text(".match .meta")
            assert "not verified (3 inliers)" in page.inner_text(".match .meta")
            assert "score 0.9000 (q-value 0.050)" in page.inner_text(".match .meta")
        finally:
            browser.close()


def test_new_version_is_picked_up_without_dropping_requests(service, tmp_path):
    url, index, _ = service
    before = requests.get(f"{url}/healthz", timeout=10).json()
    new = tmp_path / "new"
    new.mkdir()
    img = Image.open(QUERIES / "Q0003.jpg")  # an unrelated query: indexed now, it must become its own best match
    img.save(new / "RNEW.jpg")
    statuses, stop = [], threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            statuses.append(post(url, (QUERIES / "Q0002.jpg").read_bytes()).status_code)

    t = threading.Thread(target=hammer)
    t.start()
    try:
        version = adding.add_folder(str(index), str(new))[0]
        deadline = time.time() + 60
        while requests.get(f"{url}/healthz", timeout=10).json()["version"] != version and time.time() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        t.join()
    health = requests.get(f"{url}/healthz", timeout=10).json()
    assert health["version"] == version != before["version"] and health["references"] == before["references"] + 1
    assert statuses and set(statuses) == {200}
    assert post(url, (QUERIES / "Q0003.jpg").read_bytes()).json()["matches"][0]["reference_id"] == "RNEW"
    gone = indexing.remove_ids(str(index), ["RNEW"]).version
    deadline = time.time() + 60
    while requests.get(f"{url}/healthz", timeout=10).json()["version"] != gone and time.time() < deadline:
        time.sleep(0.2)
    answer = post(url, (QUERIES / "Q0003.jpg").read_bytes()).json()
    assert answer["version"] == gone and "RNEW" not in [m["reference_id"] for m in answer["matches"]]
    shutil.rmtree(new)


def test_a_cluster_shared_with_other_serve_apps(service):
    """Stopping copydet's service leaves other Serve apps of the cluster running; a second copydet
    service is refused (it would replace the first unseen); one started where Serve already runs
    names that Serve's port, not the config's. (It stops and restarts the app.)"""
    from ray import serve

    from jobs.serve.app import APP_NAME, start, stop
    url, index, root = service
    with pytest.raises(RuntimeError, match="a copydet service already runs on this Ray cluster"):
        start(str(index), service_config(root))

    @serve.deployment
    class Other:
        async def __call__(self, request) -> str:
            return "other"

    serve.run(Other.bind(), name="other", route_prefix="/other", blocking=False)
    wait_until(lambda: requests.get(f"{url}/other", timeout=5).text == "other")
    stop()
    assert APP_NAME not in serve.status().applications
    assert requests.get(f"{url}/other", timeout=5).text == "other"
    assert start(str(index), service_config(root)) == url  # another serve.port: Serve's own is used
    serve.delete("other")
    wait_until(lambda: requests.get(f"{url}/healthz", timeout=5).ok)


def test_stop_answers_the_requests_in_flight(service):
    """Stopping (SIGTERM, Ctrl-C) lets the replica finish what it holds and the proxy relay it.
    Last in this module: it stops the module's service."""
    from jobs.serve.app import stop
    url, _, _ = service
    answered: dict[str, tuple[object, float]] = {}

    def ask(f: Path) -> None:
        try:
            answered[f.name] = (post(url, f.read_bytes()).status_code, time.monotonic())
        except requests.RequestException as e:
            answered[f.name] = (repr(e), time.monotonic())

    threads = [threading.Thread(target=ask, args=(f,)) for f in sorted(QUERIES.glob("*.jpg"))[:8]]
    for t in threads:
        t.start()
    time.sleep(1.0)
    stopping = time.monotonic()
    stop()
    for t in threads:
        t.join()
    assert [status for status, _ in answered.values()] == [200] * 8, answered
    assert any(t > stopping for _, t in answered.values())  # some were still in flight when the stop began


def test_is_copy_compares_scores_as_copies_csv_does():
    """A configured 0.7 admits a stored 0.7 (float32 0.69999999), as copies.csv does; the answer
    shows scores and threshold as the CSVs write them."""
    from types import SimpleNamespace

    import pyarrow as pa

    from jobs.serve.engine import Matcher
    fused = pa.table({"query_id": ["q0"], "reference_id": ["R1"], "score": pa.array([0.7], pa.float32())})
    served = SimpleNamespace(cfg=SimpleNamespace(copy_threshold=lambda: 0.7), scorers={}, version="v1",
                             verified=lambda inliers, prob: None, q_value=lambda score: None)
    answer = Matcher.answer(served, fused, "q0", {}, {}, 1)
    assert (answer["is_copy"], answer["matches"][0]["score"], answer["threshold"]) == (True, 0.7, 0.7)

