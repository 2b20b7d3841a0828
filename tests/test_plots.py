"""DVC plots that draw with no network: the inlined HTML template, the dvc.yaml plots in headless
Chromium (`dvc plots show` and `dvc plots diff`), and the static PNG of the latency chart.

The template comes from the vl-convert-python wheel (a dependency: no npm). The browser checks
need Chromium (`apt-get install -y chromium`); where it is missing those tests skip and say so.
"""

from __future__ import annotations

import functools
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, unavailable, venv_env

from kiln.cli import plots as cli_plots
from kiln.report import plots, plots_page

VEGA_TEMPLATES = ROOT / "plots" / "templates"
CHROMIUM = next(
    (
        p
        for p in (
            os.environ.get("KILN_CHROMIUM"),
            shutil.which("chromium"),
            shutil.which("chromium-browser"),
            shutil.which("google-chrome"),
        )
        if p
    ),
    None,
)


@pytest.fixture
def chromium() -> str:
    """Headless Chromium: .ci/run installs it, so in CI its absence fails the test; elsewhere it skips."""
    if CHROMIUM is None:
        unavailable("no headless Chromium: `apt-get install -y chromium` (.ci/run does), or set KILN_CHROMIUM")
    return str(CHROMIUM)


needs_chromium = pytest.mark.usefixtures("chromium")

# The top-level `plots:` of dvc.yaml, used when dvc.yaml has none yet (it is the snippet docs/plots.md shows).
PLOTS_SECTION = yaml.safe_load("""
plots:
  - latency:
      template: plots/templates/latency.json
      title: ms per image against batch size, per target
      x: batch
      y:
        reports/latency.csv: ms_per_image
      x_label: batch size (images per call)
      y_label: ms per image (lower is better)
  - throughput:
      template: plots/templates/throughput.json
      title: images/s per target, at its main batch size
      x: images_per_s
      y:
        reports/summary.csv: target
      x_label: images/s (higher is better)
      y_label: target
  - accuracy_vs_speed:
      template: plots/templates/pareto.json
      title: accuracy against speed (grey line - the Pareto front)
      x: images_per_s
      y:
        reports/summary.csv: top1_agreement
      x_label: images/s at the main batch size (higher is better)
      y_label: top-1 agreement with eager fp32
  - serving:
      template: plots/templates/serving.json
      title: p99 latency against offered request rate, open loop, per target
      x: offered_rate
      y:
        reports/serving.csv: p99_ms
      x_label: offered requests/s
      y_label: p99 end-to-end ms (queueing included; lower is better)
  - speed_vs_memory:
      template: plots/templates/speed_memory.json
      title: speed against peak memory (grey line - the Pareto front)
      x: peak_rss_mb
      y:
        reports/summary.csv: images_per_s
      x_label: peak resident memory of the benchmark process, MB (lower is better)
      y_label: images/s at the main batch size (higher is better)
""")["plots"]

LATENCY = {  # target -> rows of reports/plots/<target>.csv (batch, ms_per_image, images_per_s, p50_ms, p99_ms)
    "torch-eager": [(1, 48.74, 20.52, 48.74, 62.59), (8, 39.31, 25.44, 314.48, 349.49), (32, 42.42, 23.57, 1357.45, 1519.64)],
    "onnxruntime": [(1, 23.45, 42.65, 23.45, 28.20), (8, 24.32, 41.11, 194.58, 218.25), (32, 22.70, 44.06, 726.32, 801.67)],
    "openvino-int8": [(1, 11.94, 83.76, 11.94, 16.47), (8, 10.31, 96.97, 82.50, 102.15), (32, 11.97, 83.56, 382.94, 472.07)],
    "onnxruntime-int8": [(1, 12.26, 81.56, 12.26, 15.82), (8, 12.51, 79.96, 100.05, 109.69), (32, 11.05, 90.49, 353.64, 405.43)],
    "torch-bf16": [],  # skipped on this CPU: header only
}
SUMMARY = """target,runtime,precision,batch,ms_per_image,images_per_s,speedup,top1_agreement,throughput_images_per_s,peak_rss_mb,pct_of_peak
torch-eager,torch,fp32,8,39.31,25.44,1.0,1.0,,812.4,
onnxruntime,onnxruntime,fp32,8,24.32,41.11,1.616,1.0,44.2,402.1,31.0
onnxruntime-int8,onnxruntime,int8,8,12.51,79.96,3.143,0.984,85.0,355.7,52.5
openvino-int8,openvino,int8,8,10.31,96.97,3.812,0.969,101.3,468.9,63.7
"""


SERVING = """target,offered_rate,p99_ms,within_slo
onnxruntime,2.0,30.1,True
onnxruntime,20.0,41.5,True
onnxruntime,35.0,180.2,True
onnxruntime,40.0,900.0,False
openvino-int8,4.0,12.0,True
openvino-int8,40.0,20.3,True
openvino-int8,80.0,95.0,True
openvino-int8,100.0,700.0,False
"""


def write_plot_csvs(folder: Path, latency: dict = LATENCY) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for target, rows in latency.items():
        lines = ["batch,ms_per_image,images_per_s,p50_ms,p99_ms"] + [",".join(map(str, r)) for r in rows]
        (folder / f"{target}.csv").write_text("\n".join(lines) + "\n")
        out[target] = folder / f"{target}.csv"
    return out


# --------------------------------------------------------------------------- template


def test_inline_script_is_safe_in_a_dvc_template():
    js = 'var a = "</script>", b = "<!-- x", c = "</SCRIPT >";\n//# sourceMappingURL=vega.min.js.map\n'
    out = plots_page.inline_script(js)
    assert "</script" not in out.lower() and "<!--" not in out and "sourceMappingURL" not in out
    assert r"<\/script>" in out and r"<\/SCRIPT >" in out
    for placeholder in plots_page.DVC_PLACEHOLDERS:  # DVC str.replace()s these over the whole page
        with pytest.raises(plots_page.PlotsSetupError, match="DVC replaces"):
            plots_page.inline_script(f"var s = '{placeholder}';")


def test_vl_convert_is_pinned_and_its_versions_are_the_documented_ones():
    import tomllib

    import vl_convert

    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [d for d in dependencies if d.startswith("vl-convert-python")]
    assert len(pins) == 1 and re.fullmatch(r"vl-convert-python==[\w.]+", pins[0]), f"pin one exact version: {pins}"
    installed = version("vl-convert-python")
    assert pins[0].endswith(f"=={installed}"), f"installed {installed}, pyproject pins {pins[0]}: run `pip install -e .`"
    versions = plots_page.library_versions()
    # DVC 3's specs are vega-lite v5: the page gets the newest 5.x in the wheel. (vega 6 and
    # vega-embed 7 changed packaging, to ES modules, not the specs they draw.)
    newest = max((v for v in vl_convert.get_vegalite_versions() if v.startswith("5.")), key=lambda v: int(v.split(".")[1]))
    assert versions["vega-lite"] == newest
    # What the page runs is written down where people read it: keep them in step with the pin.
    docs = (ROOT / "docs" / "plots.md").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()
    for name in ("vega", "vega-embed"):
        assert f"{name} {versions[name]}" in docs and f"{name} {versions[name]}" in pyproject, name
    assert f"vega-lite {versions['vega-lite']}." in docs and f"vega-lite {versions['vega-lite']}." in pyproject
    assert f"vl-convert-python {installed}" in docs or f"vl-convert-python=={installed}" in docs


@pytest.fixture(scope="module")
def html_template(tmp_path_factory) -> Path:
    return plots_page.write_html_template(tmp_path_factory.mktemp("template") / "offline.html")


def test_template_inlines_vega_vega_lite_and_vega_embed(html_template):
    import vl_convert

    page = html_template.read_text(encoding="utf-8")
    assert plots_page.script_sources(page) == [], "a <script src> would need the network"
    assert not re.search(r"<link\b[^>]*href=[\"']?https?:", page, re.IGNORECASE)
    assert "cdn.jsdelivr.net" not in page and "unpkg.com" not in page
    assert page.count("{plot_divs}") == 1 and "{scripts}" not in page  # DVC's CDN tags have nowhere to go
    v = plots_page.library_versions()
    assert f'data-package="vega@{v["vega"]} vega-lite@{v["vega-lite"]} vega-embed@{v["vega-embed"]}"' in page
    body = plots_page.inline_script(vl_convert.javascript_bundle(vl_version=v["vega-lite"]))
    assert len(body) > 500_000 and body.strip() in page, "the bundle is not inlined whole"
    assert f'<meta name="kiln-plots-page" content="{plots_page.page_stamp()}">' in page[:4096]


def test_template_cli_needs_no_npm(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no npm, no node: only the wheel
    out = tmp_path / "offline.html"
    assert cli_plots.main(["template", "--out", str(out)]) == 0
    assert out.stat().st_size > 500_000 and f"vega {plots_page.library_versions()['vega']}," in capsys.readouterr().out
    # Without vl-convert-python the command fails, writes nothing, and says what to run.
    monkeypatch.setitem(sys.modules, "vl_convert", None)
    assert cli_plots.main(["template", "--out", str(tmp_path / "x.html")]) == 1
    err = capsys.readouterr().err
    assert "pip install -e ." in err and "kiln plots template" in err, err
    assert not list(tmp_path.glob("x.html*")) and not list(tmp_path.glob(".x.html*"))


def test_ensure_builds_a_missing_or_stale_page_only(tmp_path, html_template):
    out = tmp_path / "plots" / "offline.html"
    assert plots_page.ensure_html_template(out) is True and out.read_text() == html_template.read_text()
    os.utime(out, (1, 1))
    assert plots_page.ensure_html_template(out) is False and out.stat().st_mtime == 1  # current: left alone
    # A page from an older set-up (npm's vega 5 build, another vl-convert) is replaced.
    out.write_text(html_template.read_text().replace("vl-convert-python 1.", "vl-convert-python 0."))
    assert plots_page.ensure_html_template(out) is True and out.read_text() == html_template.read_text()


def write_report_params(root: Path, params: dict) -> None:
    """params.yaml and the report stage's slice of it, as the configure stage writes it (kiln.config.slices)."""
    from kiln.config.slices import GLOBAL_DIR, global_slice, slice_text

    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / GLOBAL_DIR).mkdir(parents=True, exist_ok=True)
    (root / GLOBAL_DIR / "report.json").write_text(slice_text(global_slice(params, "report")))


def test_report_stage_warns_and_goes_on_without_vl_convert(in_tmp, monkeypatch, caplog):
    write_report_params(in_tmp, {"targets": {"torch-eager": {}}, "report": {}})
    monkeypatch.setitem(sys.modules, "vl_convert", None)
    runpy.run_path(str(ROOT / "stages" / "report.py"), run_name="__main__")
    assert (in_tmp / "reports" / "benchmark.md").is_file() and not (in_tmp / "plots" / "offline.html").exists()
    warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("`dvc plots show`" in w and "pip install -e ." in w and "kiln plots template" in w for w in warning), warning


# --------------------------------------------------------------------------- dvc plots show / diff in Chromium


def _plots_section() -> list:
    """dvc.yaml's top-level `plots:` when it has one (so the real config is what gets drawn), else the documented snippet."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text()) or {}
    return spec.get("plots") or PLOTS_SECTION


def _plot_names(section: list) -> list[str]:
    return [next(iter(p)) if isinstance(p, dict) else p for p in section]


def _run(cmd: list[str], cwd: Path, timeout: int = 180, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env or _pip_only_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@functools.cache
def _pip_only_bin() -> Path:
    tools = Path(tempfile.mkdtemp(prefix="kiln-no-npm-"))
    (tools / "git").symlink_to(shutil.which("git"))
    return tools


def _pip_only_env() -> dict[str, str]:
    """The venv's environment with nothing else on PATH but git: no npm, no node, as after a pip-only set-up."""
    env = venv_env()
    env["DVC_NO_ANALYTICS"] = "1"
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), str(_pip_only_bin())])
    assert shutil.which("npm", path=env["PATH"]) is None and shutil.which("node", path=env["PATH"]) is None
    return env


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory) -> Path:
    """A git + DVC repo with the plots section, the templates and two committed revisions of the data.

    Set up as a user who installed kiln with pip and never ran ./setup.sh: no plots/offline.html,
    no plots/node_modules, no npm. The report stage (what `dvc repro` runs last) builds the page.
    """
    repo = tmp_path_factory.mktemp("plots-repo")
    dvc = [sys.executable, "-m", "dvc"]
    _run(["git", "init", "-q"], repo)
    _run(["git", "config", "user.email", "kiln@example.com"], repo)
    _run(["git", "config", "user.name", "kiln tests"], repo)
    _run([*dvc, "init", "-q"], repo)
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")  # kiln's: plots.html_template = ../plots/offline.html
    shutil.copytree(VEGA_TEMPLATES, repo / "plots" / "templates")
    (repo / ".gitignore").write_text("/plots/offline.html\n/dvc_plots/\n/out-*/\n")
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": _plots_section()}, sort_keys=False))
    write_report_params(repo, {"targets": {t: {} for t in LATENCY}, "report": {}})
    report = _run([sys.executable, str(ROOT / "stages" / "report.py")], repo)  # the report stage's command
    assert "plots/offline.html: built" in report.stderr, report.stderr
    assert not (repo / "plots" / "node_modules").exists()
    reports = repo / "reports"
    plots.write_latency_csv(write_plot_csvs(repo / "reports" / "plots"), reports / "latency.csv")
    (reports / "summary.csv").write_text(SUMMARY)
    (reports / "serving.csv").write_text(SERVING)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "first run"], repo)
    # A second run: openvino-int8 got faster and more accurate, eager got faster at batch 32.
    faster = dict(LATENCY, **{"torch-eager": [*LATENCY["torch-eager"][:2], (32, 30.1, 33.2, 963.2, 1011.0)]})
    plots.write_latency_csv(write_plot_csvs(repo / "reports" / "plots", faster), reports / "latency.csv")
    (reports / "summary.csv").write_text(SUMMARY.replace("10.31,96.97,3.812,0.969", "9.1,109.9,4.3,0.975"))
    _run(["git", "commit", "-qam", "second run"], repo)
    # A second report run finds the page current and leaves it alone.
    again = _run([sys.executable, str(ROOT / "stages" / "report.py")], repo)
    assert "offline.html" not in again.stderr, again.stderr
    _run(["git", "checkout", "-q", "--", "reports"], repo)
    return repo


def _chromium(url: str, profile: Path, *mode: str) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        "--host-resolver-rules=MAP * ~NOTFOUND",  # no network even where CI has one: offline is the point
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
        "--window-size=1200,2400",
        *mode,
        url,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc


def _page_status(html: Path, tmp: Path) -> dict:
    dom = _chromium(html.as_uri(), tmp / "profile-dom", "--dump-dom").stdout
    m = re.search(r'<script id="kiln-plots-status" type="application/json">(.*?)</script>', dom, re.DOTALL)
    assert m, "the page has no kiln status element: was it rendered with the kiln template?"
    return json.loads(m.group(1))


def _screenshot(html: Path, tmp: Path):
    from PIL import Image

    png = tmp / f"{html.parent.name}.png"
    _chromium(html.as_uri(), tmp / "profile-shot", f"--screenshot={png}")
    return Image.open(png).convert("RGB")


def _ink(image, box) -> tuple[float, float, int]:
    """(share of non-white pixels, share of coloured (not grey) pixels, distinct colours) inside `box`.

    Axes, grid and text are grey: coloured pixels are the marks (lines, points, bars) themselves.
    """
    pixels = np.asarray(image.crop(box).convert("RGB"), dtype=np.uint8).reshape(-1, 3)
    if not len(pixels):
        return 0.0, 0.0, 0
    ink = float((pixels.min(axis=1) < 235).mean())
    coloured = float((pixels.max(axis=1).astype(int) - pixels.min(axis=1) > 48).mean())
    colours = len(np.unique(pixels // 16, axis=0))
    return ink, coloured, colours


def _assert_charts_drawn(html: Path, tmp: Path, names: list[str], revisions: list[str]) -> dict:
    page = html.read_text(encoding="utf-8")
    assert plots_page.script_sources(page) == [], "dvc put a <script src> into the page: it loads from the network"
    assert "cdn.jsdelivr.net" not in page
    for name in names:
        assert f'<div id = "{name}"' in page or f'<div id="{name}"' in page, f"dvc wrote no chart {name}"
    status = _page_status(html, tmp)
    assert all(status["libraries"].values()), f"vega did not load: {status['libraries']}"
    assert status["errors"] == [], status["errors"]
    charts = {c["id"]: c for c in status["charts"]}
    assert set(names) <= set(charts), f"charts in the page: {sorted(charts)}"
    image = _screenshot(html, tmp)
    for name in names:
        chart = charts[name]
        view = chart["view"]
        assert chart["drawn"] and view["width"] > 200 and view["height"] > 100, f"{name} did not draw: {chart}"
        if view["renderer"] == "svg":
            assert view["svg_elements"] > 30, f"{name}: an empty chart ({view['svg_elements']} svg elements)"
        box = (view["x"], view["y"], view["x"] + view["width"], view["y"] + view["height"])
        assert box[2] <= image.width and box[3] <= image.height, f"{name} lies outside the screenshot: {box}"
        ink, coloured, colours = _ink(image, box)
        print(f"{name}: ink {ink:.3f}, coloured {coloured:.4f}, {colours} colours")
        assert ink > 0.02 and coloured > 0.0005 and colours >= 6, (
            f"{name}: blank chart area in the screenshot (ink {ink:.3f}, marks {coloured:.4f}, {colours} colours)"
        )
    for rev in revisions:  # the legend names each revision drawn
        assert rev in page
    return status


@needs_chromium
def test_dvc_plots_show_draws_offline(dvc_repo, tmp_path):
    # No --html-template: .dvc/config's plots.html_template makes the offline page the default.
    _run([sys.executable, "-m", "dvc", "plots", "show", "-o", "out-show"], dvc_repo)
    status = _assert_charts_drawn(dvc_repo / "out-show" / "index.html", tmp_path, _plot_names(_plots_section()), ["workspace"])
    v = plots_page.library_versions()  # the page ran the bundle of the versions the wheel names
    assert status["libraries"] == {"vega": v["vega"], "vegaLite": v["vega-lite"], "vegaEmbed": v["vega-embed"]}


def test_without_the_page_dvc_fails_as_the_docs_say(dvc_repo, tmp_path):
    """Before `dvc repro` or ./setup.sh built it, DVC has no page: its message is the one docs/plots.md explains."""
    repo = tmp_path / "no-page"
    shutil.copytree(dvc_repo, repo)
    (repo / "plots" / "offline.html").unlink()
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "plots", "show"], cwd=repo, env=_pip_only_env(), capture_output=True, text=True, timeout=180
    )
    assert proc.returncode != 0 and "HTML template has to contain '{plot_divs}'" in proc.stderr, proc.stderr
    docs = (ROOT / "docs" / "plots.md").read_text()
    assert "HTML template has to contain '{plot_divs}'" in docs and "kiln plots template" in docs


@needs_chromium
def test_dvc_plots_diff_draws_offline(dvc_repo, tmp_path):
    template = dvc_repo / "plots" / "offline.html"
    _run([sys.executable, "-m", "dvc", "plots", "diff", "HEAD~1", "HEAD", "--html-template", str(template), "-o", "out-diff"], dvc_repo)
    html = dvc_repo / "out-diff" / "index.html"
    _assert_charts_drawn(html, tmp_path, _plot_names(_plots_section()), ["HEAD~1", "HEAD"])
    assert "109.9" in html.read_text()  # the second revision's data is in the page


@needs_chromium
def test_the_check_fails_when_vega_does_not_load(dvc_repo, tmp_path):
    """The same page without the inlined libraries (as DVC's CDN page is, offline) must fail the checks."""
    broken = tmp_path / "broken" / "offline.html"
    broken.parent.mkdir()
    page = (dvc_repo / "plots" / "offline.html").read_text(encoding="utf-8")
    broken.write_text(re.sub(r"<script data-package=.*?</script>", "", page, flags=re.DOTALL), encoding="utf-8")
    _run([sys.executable, "-m", "dvc", "plots", "show", "--html-template", str(broken), "-o", "out-broken"], dvc_repo)
    status = _page_status(dvc_repo / "out-broken" / "index.html", tmp_path)
    assert status["libraries"] == {"vega": None, "vegaLite": None, "vegaEmbed": None}
    assert not any(c["drawn"] for c in status["charts"])
    with pytest.raises(AssertionError, match="vega did not load"):
        _assert_charts_drawn(dvc_repo / "out-broken" / "index.html", tmp_path, _plot_names(_plots_section()), [])


# --------------------------------------------------------------------------- data and the static PNG


def test_latency_csv_is_the_long_table_of_every_measured_target(tmp_path):
    csvs = write_plot_csvs(tmp_path / "plots")
    out = plots.write_latency_csv(tmp_path / "plots", tmp_path / "latency.csv")
    lines = out.read_text().splitlines()
    assert lines[0] == "target,batch,ms_per_image,images_per_s,p50_ms,p99_ms"
    assert len(lines) == 1 + sum(len(r) for r in LATENCY.values())
    assert "openvino-int8,8,10.31,96.97,82.5,102.15" in lines
    assert not any(line.startswith("torch-bf16,") for line in lines)  # header-only CSV: skipped target
    rows, empty = plots.latency_table(csvs)  # a {target: csv} mapping works the same
    assert empty == ["torch-bf16"] and {r["target"] for r in rows} == set(LATENCY) - {"torch-bf16"}


def test_render_latency_png(tmp_path):
    import matplotlib  # noqa: F401  (a dependency of kiln: no skip, a missing one is a failure)
    from PIL import Image

    write_plot_csvs(tmp_path / "plots")
    out = plots.render_latency_png(tmp_path / "plots", tmp_path / "reports" / "latency.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    image = Image.open(out).convert("RGB")
    assert image.width >= 1000 and image.height >= 600
    ink, coloured, colours = _ink(image, (0, 0, image.width, image.height))
    assert 0.02 < ink < 0.5 and coloured > 0.005 and colours > 20, (ink, coloured, colours)  # lines in several colours, mostly white
    assert not list((tmp_path / "reports").glob("*.tmp-*"))
    again = plots.render_latency_png(tmp_path / "plots", tmp_path / "again.png")
    assert again.read_bytes() == out.read_bytes(), "same data, different PNG: a spurious diff in git"
    # No target measured (all skipped): still a PNG, since the report stage declares it as an output.
    empty = plots.render_latency_png({"torch-bf16": tmp_path / "plots" / "torch-bf16.csv"}, tmp_path / "empty.png")
    assert empty.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
