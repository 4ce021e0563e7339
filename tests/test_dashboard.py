"""fedloom dashboard: the runs list and statuses, metrics as written, the SSE stream of appended lines
(a torn line waits for its newline), no path traversal, and the page in a real headless Chromium."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from starlette.testclient import TestClient  # noqa: E402

from fedloom.dashboard import create_app, serve  # noqa: E402
from fedloom.dashboard.app import read_complete  # noqa: E402
from fedloom.runner import run  # noqa: E402

TESTS = Path(__file__).parent
SHORT = ["data.dataset=digits", "rounds=2", "data.n_clients=10", "evaluation.federated=false",
         "output.progress=false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A runs folder: a completed real run, a copy of it still running (no summary), an interrupted one."""
    root = tmp_path_factory.mktemp("runs")
    done = run(None, [*SHORT, f"output.dir={str(root)!r}", "name=done"]).run_dir
    running = root / "running"
    shutil.copytree(done, running)
    (running / "summary.json").unlink()
    interrupted = root / "interrupted"
    interrupted.mkdir()
    (interrupted / "metrics.jsonl").write_text(json.dumps({"round": 1, "central_accuracy": 0.25}) + "\n")
    (interrupted / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    (root / "not-a-run").mkdir()
    return root, Path(done).name


def test_the_runs_list_gives_each_runs_status_rounds_and_last_central_metric(runs):
    root, done = runs
    listed = {r["name"]: r for r in TestClient(create_app(root)).get("/api/runs").json()}
    assert set(listed) == {done, "running", "interrupted"}
    assert [listed[n]["status"] for n in (done, "running", "interrupted")] == ["completed", "running", "interrupted"]
    assert listed[done]["rounds"] == 2 and listed[done]["metric"] == "central_accuracy"
    last = [json.loads(line) for line in (root / done / "metrics.jsonl").read_text().splitlines()][-1]
    assert listed[done]["value"] == last["central_accuracy"]
    assert listed["interrupted"]["value"] == 0.25


def test_metrics_partition_and_page_are_served_as_written(runs):
    root, done = runs
    client = TestClient(create_app(root))
    lines = (root / done / "metrics.jsonl").read_text().splitlines()
    assert client.get(f"/api/runs/{done}/metrics").json() == [json.loads(line) for line in lines]
    assert client.get(f"/api/runs/{done}/partition").json() == json.loads((root / done / "partition.json").read_text())
    assert client.get(f"/api/runs/{done}/graph").status_code == 404  # a federated run has none
    assert client.get(f"/api/runs/{done}/summary").json() == json.loads((root / done / "summary.json").read_text())
    page = client.get("/")
    assert page.status_code == 200 and "/static/plotly.min.js" in page.text
    script = client.get("/static/plotly.min.js")
    assert script.status_code == 200 and "Licensed under the MIT license" in script.text[:300]


@pytest.mark.parametrize("name", ["..", "../runs", "%2e%2e", "..%2Fetc", "not-a-run", "nope", "a%2Fb"])
def test_names_outside_the_listing_are_404(runs, name):
    client = TestClient(create_app(runs[0]))
    for view in ("metrics", "stream", "partition", "graph", "summary"):
        assert client.get(f"/api/runs/{name}/{view}").status_code == 404, (name, view)


def test_a_torn_last_line_is_read_only_once_complete(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1}\n{"round": 2, "trai')
    records, offset = read_complete(path)
    assert [r for _, r in records] == [{"round": 1}] and offset == len('{"round": 1}\n')
    with open(path, "a") as f:
        f.write('n_loss": 0.5}\n')
    assert [r for _, r in read_complete(path, offset)[0]] == [{"round": 2, "train_loss": 0.5}]


def _events(text: str) -> list[dict]:
    return [json.loads(line[len("data: "):]) for block in text.split("\n\n") if block.startswith("id: ")
            for line in block.splitlines() if line.startswith("data: ")]


def test_the_stream_sends_lines_appended_after_it_opened_and_ends_with_the_run(tmp_path):
    run_dir = tmp_path / "live"
    run_dir.mkdir()
    metrics = run_dir / "metrics.jsonl"
    metrics.write_text('{"round": 1}\n')

    def write():
        time.sleep(0.3)
        with open(metrics, "a") as f:
            f.write('{"round": 2, "train_loss"')  # torn: must not be sent until its newline
            f.flush()
            time.sleep(0.3)
            f.write(': 0.5}\n')
        time.sleep(0.2)
        (run_dir / "summary.json").write_text('{"status": "completed"}')

    writer = threading.Thread(target=write)
    writer.start()
    started = time.monotonic()
    text = TestClient(create_app(tmp_path, poll_s=0.05)).get("/api/runs/live/stream").text  # until the summary
    writer.join()
    assert time.monotonic() - started >= 0.7  # it stayed open while the lines were appended
    assert _events(text) == [{"round": 1}, {"round": 2, "train_loss": 0.5}]
    assert text.rstrip().endswith("event: end\ndata: {}")


def test_the_stream_resumes_after_the_last_event_id(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "metrics.jsonl").write_text('{"round": 1}\n{"round": 2}\n')
    (tmp_path / "r" / "summary.json").write_text('{"status": "completed"}')
    client = TestClient(create_app(tmp_path))
    text = client.get("/api/runs/r/stream", headers={"Last-Event-ID": str(len('{"round": 1}\n'))}).text
    assert _events(text) == [{"round": 2}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("the browser test needs Debian's chromium and chromium-driver (chromium, chromedriver on PATH)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def _text(browser, by, selector) -> str:
    """The element's text, or "" while the list is being redrawn under it."""
    exceptions = pytest.importorskip("selenium.common.exceptions")
    try:
        return browser.find_element(by, selector).text
    except (exceptions.StaleElementReferenceException, exceptions.NoSuchElementException):
        return ""


def _wait(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out waiting for the page")


def _deployment(run_dir: Path) -> None:
    run_dir.mkdir()
    records = [{"round": r, "train_loss": 1 / r, "central_accuracy": r / 4, "clients_submitted": [0, r]}
               for r in (1, 2, 3)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    (run_dir / "partition.json").write_text(json.dumps({"train_sizes": [3, 4, 5], "label_histogram": [[1, 2]] * 3}))
    (run_dir / "summary.json").write_text(json.dumps({"status": "completed",
                                                      "per_client_accuracy": {"clients": [0, 1, 2],
                                                                              "global": [0.5, 0.75, 1.0]}}))
    (run_dir / "graph.json").write_text(json.dumps({"name": "ring", "n_nodes": 3, "edges": [[0, 1], [1, 2], [2, 0]],
                                                    "byzantine": [2]}))


@pytest.mark.slow
def test_the_page_plots_a_live_runs_rounds_as_they_come(tmp_path):
    browser = _browser()
    env = {**os.environ, "PYTHONPATH": str(TESTS), "SLOW_FORWARD_S": "0.02"}
    overrides = [*SHORT, "rounds=200", "model.name=user_parts:SlowLogistic", "name=live"]
    sets = [a for o in overrides for a in ("--set", o)]
    process = subprocess.Popen([sys.executable, "-m", "fedloom.cli", "run", *sets, "--out", str(tmp_path)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port = _free_port()
    thread = serve(tmp_path, port=port, background=True)
    try:
        _wait(lambda: thread.server.started, 10)
        browser.get(f"http://127.0.0.1:{port}/")
        by = pytest.importorskip("selenium.webdriver.common.by").By
        button = _wait(lambda: browser.find_elements(by.CSS_SELECTOR, "#runs button[data-run^='live']"))[0]
        button.click()
        charts = browser.find_element(by.ID, "charts")
        first = _wait(lambda: int(charts.get_attribute("data-rounds") or 0))
        assert _wait(lambda: int(charts.get_attribute("data-rounds")) > first)
        assert browser.find_elements(by.CSS_SELECTOR, "#metric .main-svg")  # plotly drew the curve
        # the list is redrawn by fetches of its own (first round, 3 s timer): wait for it to show the status
        assert _wait(lambda: "running" in _text(browser, by.CSS_SELECTOR, "#runs button[data-run^='live']"))
        _deployment(tmp_path / "deployed")  # the clients of each round, as a deployment records them
        _wait(lambda: browser.find_elements(by.CSS_SELECTOR, "#runs button[data-run='deployed']"))[0].click()
        # the live run may itself be at round 3 while the click's fetch is under way: wait for the deployed
        # run's own chart, which only a run with clients_submitted records draws
        assert _wait(lambda: charts.get_attribute("data-rounds") == "3"
                     and browser.find_elements(by.CSS_SELECTOR, "#participation .main-svg"))
        assert browser.find_elements(by.CSS_SELECTOR, "#labels .main-svg")  # the label histogram's heatmap
        assert _wait(lambda: browser.find_elements(by.CSS_SELECTOR, "#graph .main-svg"))  # the gossip graph
        assert _wait(lambda: browser.find_elements(by.CSS_SELECTOR, "#clients .main-svg"))  # per-client histogram
    finally:
        browser.quit()
        thread.server.should_exit = True
        process.kill()
        process.wait(30)
        thread.join(10)


def test_without_uvicorn_the_command_says_what_to_install(tmp_path, monkeypatch, capsys):
    from fedloom.cli import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn raises ImportError
    assert main(["dashboard", str(tmp_path)]) == 2
    assert "pip install 'fedloom[dashboard]'" in capsys.readouterr().err


def test_run_dashboard_prints_the_url_and_the_run_completes(tmp_path):
    port = _free_port()
    sets = [a for o in SHORT for a in ("--set", o)]
    done = subprocess.run([sys.executable, "-m", "fedloom.cli", "run", *sets, "--out", str(tmp_path), "--dashboard",
                           "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"dashboard: http://127.0.0.1:{port}/" in done.stderr
    (run_dir,) = tmp_path.iterdir()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
