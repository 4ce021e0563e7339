"""The documentation site: it builds with warnings as errors, its Python examples run, its configs load.

A guide's ```python block with a ``title="name.py"`` is a file the page asks the reader to write: it is
written into the page's working directory (where the other blocks import it from) rather than run.
"""

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from fedloom.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
FENCE = re.compile(r"^```(\w+)([^\n]*)\n(.*?)^```\s*$", re.M | re.S)
TITLE = re.compile(r'title="([\w.]+\.py)"')
QUIET_MKDOCS = {"NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's notice about MkDocs 2


def blocks(page: Path, language: str) -> list[tuple[str | None, str]]:
    """(file name or None, code) of each fenced block of ``language`` on the page, in order."""
    found = []
    for match in FENCE.finditer(page.read_text()):
        if match.group(1) == language:
            title = TITLE.search(match.group(2))
            found.append((title.group(1) if title else None, match.group(3)))
    return found


def write_files(page: Path, into: Path) -> None:
    for name, code in blocks(page, "python"):
        if name:
            (into / name).write_text(code)


def name(page: Path) -> str:
    return str(page.relative_to(DOCS))


def mkdocs(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    pytest.importorskip("mkdocs", reason="the docs need the docs extra: pip install -e '.[docs]'")
    pytest.importorskip("mkdocstrings_handlers.python", reason="pip install -e '.[docs]' (mkdocstrings-python)")
    env = {**os.environ, **QUIET_MKDOCS, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_site_builds_strict(tmp_path):
    built = mkdocs("--site-dir", str(tmp_path / "site"))
    assert built.returncode == 0, built.stderr[-3000:]
    api = (tmp_path / "site" / "reference" / "run" / "index.html").read_text()
    assert "fedloom.runner.run" in api and "fedloom.runner.Stepper" in api  # rendered from the docstrings
    assert "continue the run directory" in api
    assert (tmp_path / "site" / "architecture" / "index.html").exists()
    pages = {p: p.read_text() for p in (tmp_path / "site").rglob("*.html")}
    outside = {p.name: m for p, text in pages.items() for m in re.findall(r'(?:href|src)="(?:https?:)?//[^"]+', text)}
    assert len(pages) > 15 and outside == {}  # the site works offline and points nowhere else


def _site_copy(tmp_path: Path, page: str) -> Path:
    """mkdocs.yml and docs/ copied, with one more page (in the nav) holding ``page``."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    docs = tmp_path / "docs"
    subprocess.run(["cp", "-r", str(DOCS), str(docs)], check=True)
    (docs / "extra.md").write_text(page)
    config |= {"docs_dir": str(docs), "site_dir": str(tmp_path / "site"), "nav": [*config["nav"], {"x": "extra.md"}]}
    (handler,) = [p["mkdocstrings"] for p in config["plugins"] if isinstance(p, dict) and "mkdocstrings" in p]
    handler["handlers"]["python"]["paths"] = [str(ROOT), str(tmp_path)]
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    return tmp_path


@pytest.mark.parametrize("page, complaint", [
    ("# x\n\nSee [the runner][fedloom.runner.no_such_function].\n", "no_such_function"),
    ("# x\n\n::: badly_documented.f\n", "nope"),
], ids=["broken cross-reference", "docstring naming a missing parameter"])
def test_strict_build_fails_on(tmp_path, page, complaint):
    (tmp_path / "badly_documented.py").write_text(
        'def f(x):\n    """Do it.\n\n    Args:\n        nope: not a parameter of f.\n    """\n')
    built = mkdocs(cwd=_site_copy(tmp_path, page))
    assert built.returncode != 0 and complaint in built.stderr, built.stderr[-3000:]


PYTHON_PAGES = [p for p in PAGES if any(title is None for title, _ in blocks(p, "python"))]


@pytest.mark.slow  # each page runs a few 2-round experiments
@pytest.mark.parametrize("page", PYTHON_PAGES, ids=name)
def test_python_examples_run(page, tmp_path):
    """A page's untitled blocks run in order as one script (later blocks use earlier names), in a
    fresh directory holding the page's titled files."""
    write_files(page, tmp_path)
    script = "\n\n".join(code for title, code in blocks(page, "python") if title is None)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)]), "MPLBACKEND": "Agg"}
    ran = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert ran.returncode == 0, f"{name(page)}:\n{ran.stderr[-3000:]}"


CONFIGS = [(p, i, lang) for p in PAGES for lang in ("toml", "yaml") for i, _ in enumerate(blocks(p, lang))]


@pytest.mark.parametrize("page, index, language", CONFIGS, ids=lambda v: name(v) if isinstance(v, Path) else str(v))
def test_config_examples_load(page, index, language, tmp_path, monkeypatch):
    """Every ```toml and ```yaml block is a whole experiment config (user parts: the page's files)."""
    write_files(page, tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    code = blocks(page, language)[index][1]
    raw = tomllib.loads(code) if language == "toml" else yaml.safe_load(code)
    cfg = load_config(raw)
    for key, value in raw.items():
        if not isinstance(value, dict):
            assert getattr(cfg, key) == value  # the block's top-level values are what the config holds


def test_fence_parser_sees_every_block():
    """Guards the parser: the guides' blocks are found, titled ones as files."""
    extending = DOCS / "guides" / "extending.md"
    titles = [title for title, _ in blocks(extending, "python")]
    assert titles.count(None) == 1 and {"my_models.py", "my_tasks.py", "my_transforms.py"} <= set(titles)
    assert len(blocks(extending, "toml")) == 3
    assert sum(len(blocks(p, "python")) for p in PAGES) >= 8


HANDSHAKE = """
from concurrent import futures
import grpc
from fedloom.deploy.security import ClientTLS, ServerTLS
server = grpc.server(futures.ThreadPoolExecutor(1))
port = server.add_secure_port("127.0.0.1:0", ServerTLS("c.pem", "k.pem").credentials())
server.start()
for ca, host in (("ca.pem", "localhost"), (None, "localhost"), ("ca.pem", "127.0.0.1")):
    channel = grpc.secure_channel(f"{host}:{port}", ClientTLS(ca).credentials())
    try:
        grpc.channel_ready_future(channel).result(timeout=5)
        print("connected", ca, host)
    except grpc.FutureTimeoutError:
        print("refused", ca, host)
server.stop(0)
"""


def test_deployment_guide_makes_working_certificates(tmp_path):
    """The TLS guide's openssl commands make a server certificate that fedloom's TLS settings accept, signed
    by the CA a client is told to trust (a client trusting other roots, or connecting by another name, is refused)."""
    pytest.importorskip("grpc", reason="the deploy extra: pip install -e '.[deploy]'")
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (Debian: apt-get install openssl)")
    (script,) = [code for _, code in blocks(DOCS / "guides" / "deployment.md", "bash") if "openssl" in code]
    made = subprocess.run(["bash", "-euc", script], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRPC_VERBOSITY": "NONE"}
    shook = subprocess.run([sys.executable, "-c", HANDSHAKE], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=120)
    assert shook.stdout.split("\n")[:3] == ["connected ca.pem localhost", "refused None localhost",
                                            "refused ca.pem 127.0.0.1"], shook.stdout + shook.stderr[-2000:]


def test_the_index_links_a_guide_for_each_task():
    """Issue 19's guides: each task named on the home page, linked to a page in the site's navigation."""
    index = (DOCS / "index.md").read_text()
    section = index[index.index("## Guides by task"):]
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    pages = set(re.findall(r"[\w/-]+\.md", str(nav)))
    for task in ("Your own data", "Your own model and task", "A new aggregator or transform", "Decentralized learning",
                 "Deployment with TLS", "Reproducing a paper's table"):
        line = next(item for item in section.split("\n- ") if item.startswith(task))
        linked = re.findall(r"\]\(([\w/.-]+\.md)", line)
        assert linked and set(linked) <= pages, (task, linked)
