"""The page `dvc plots show` / `dvc plots diff` write, with vega, vega-lite and vega-embed inlined.

DVC's default page loads the three libraries from a CDN (dvc-render's `VegaRenderer.SCRIPTS`,
filled into the template's `{scripts}` placeholder): with no network it is blank. The page built
here inlines them instead, from the bundle the vl-convert-python wheel carries
(`vl_convert.javascript_bundle`), so `pip install` is all it takes: no npm, no download at build
time. It has no `{scripts}` placeholder, so DVC's CDN tags never enter the page. DVC requires only
`{plot_divs}` (and fills `{refresh_tag}` when present).

`.dvc/config` points DVC at plots/offline.html. It is generated, never committed, and written by
`./setup.sh` / `kiln plots template`, and by the report stage when it is missing or was
built by other code or another vl-convert (`ensure_html_template`), so a user who only ran
`pip install -e .` has it after `dvc repro`.

The page also carries a small script that, once the charts have drawn, writes what it found into
`<script id="kiln-plots-status" type="application/json">` (one entry per chart: whether it drew,
its size and its position) and shows a visible message when vega failed to load. The tests read it
from headless Chromium's DOM.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Union

from kiln.core.atomic import write_text

PathLike = Union[str, "os.PathLike[str]"]

# Relative to the project root, where the stages run (as kiln.core.paths); .dvc/config names the same file.
HTML_TEMPLATE = Path("plots") / "offline.html"
DISTRIBUTION = "vl-convert-python"
# DVC 3's chart specs are vega-lite v5 (`$schema .../vega-lite/v5.json`): the page gets the newest
# vega-lite 5 the wheel bundles, so they compile with the line they were written for (vega-embed
# still notes in the console that the compiled vega v5 spec runs on vega 6, which reads it as is).
VEGA_LITE_MAJOR = 5
# What DVC replaces in an HTML template (dvc_render.html.HTML.embed): with str.replace, over the
# whole page, inlined libraries included. `{scripts}` is left out of our page on purpose.
DVC_PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")
# Where the page says what built it; read back by `ensure_html_template` (it sits before the libraries).
_STAMP = re.compile(r'<meta name="kiln-plots-page" content="([^"]*)">')
_FIX = "run `pip install -e .` in the kiln checkout (kiln depends on vl-convert-python), then `kiln plots template`"


class PlotsSetupError(RuntimeError):
    """The offline page cannot be built here (vl-convert-python missing, or not what the page can inline)."""


def _vl_convert():
    try:
        import vl_convert
    except ImportError as exc:
        raise PlotsSetupError(f"{HTML_TEMPLATE} (the page `dvc plots show` uses) cannot be built: {exc}; {_FIX}") from None
    return vl_convert


def library_versions() -> dict[str, str]:
    """What the page inlines: {vl-convert-python, vega, vega-lite, vega-embed: version}."""
    from importlib.metadata import version

    vlc = _vl_convert()
    lite = [v for v in vlc.get_vegalite_versions() if v.split(".")[0] == str(VEGA_LITE_MAJOR)]
    if not lite:
        raise PlotsSetupError(
            f"{DISTRIBUTION} {version(DISTRIBUTION)} bundles no vega-lite {VEGA_LITE_MAJOR} "
            f"({', '.join(vlc.get_vegalite_versions())}); {_FIX}"
        )
    return {
        DISTRIBUTION: version(DISTRIBUTION),
        "vega": vlc.get_vega_version(),
        "vega-lite": max(lite, key=lambda v: tuple(int(p) for p in v.split("."))),
        "vega-embed": vlc.get_vega_embed_version(),
    }


def inline_script(js: str, name: str = "script") -> str:
    """`js` made safe to sit inside an inline <script> element of a DVC HTML template."""
    js = re.sub(r"\n?//# sourceMappingURL=\S*\s*$", "\n", js)  # the .map is not shipped in the page
    for placeholder in DVC_PLACEHOLDERS:
        if placeholder in js:  # DVC's str.replace would splice plots (or CDN tags) into the library
            raise PlotsSetupError(f"{name} contains {placeholder!r}, which DVC replaces in HTML templates")
    # The HTML parser ends a script at `</script` whatever the JS means by it; `<!--` can switch it
    # into the "escaped" state. `<\/` and `<\!` mean the same inside JS strings and regexes.
    js = re.sub(r"</(script)", r"<\\/\1", js, flags=re.IGNORECASE)
    return js.replace("<!--", "<\\!--")


# The bundle is an ES module flattened to one script: its top-level names (`n`, `t`, ...) would
# become page globals, where DVC's `var spec` and other scripts live. A strict-mode function keeps
# them private (module code is strict too); it still runs at parse time, before DVC's plot divs
# call vegaEmbed, the one global they use. The bundle sets `window.vega` and `window.vegaLite` to
# null (it imports them as default exports, which these ES modules lack; vegaEmbed imports its
# own copies and draws) and vegaEmbed carries no version, so the versions the status script
# reports are the ones the wheel names, set only once the bundle ran through.
_WRAP = """(function () {{
"use strict";
{bundle}
window.kilnPlotsLibraries = {libraries};
}}());"""

# Runs after DVC's plot divs (each calls vegaEmbed at parse time). Reports per chart whether vega
# drew into it; a page whose libraries did not load says so on screen instead of staying blank.
_STATUS_SCRIPT = r"""
(function () {
  var errors = [];
  window.addEventListener("error", function (e) { errors.push(String(e.message || e)); });
  function charts() {
    return Array.prototype.filter.call(document.querySelectorAll("body > div[id]"), function (d) {
      return d.id !== "kiln-plots-message";
    });
  }
  function drawn(div) {
    var view = div.querySelector("svg.marks, canvas.marks");
    if (!view) return null;
    var r = view.getBoundingClientRect();
    var marks = view.tagName.toLowerCase() === "svg"
      ? view.querySelectorAll("path, line, rect, circle, text, symbol").length : null;
    return {renderer: view.tagName.toLowerCase(), width: Math.round(r.width), height: Math.round(r.height),
            x: Math.round(r.left + window.scrollX), y: Math.round(r.top + window.scrollY), svg_elements: marks};
  }
  function report(final) {
    var list = charts(), out = [], done = true;
    list.forEach(function (div) {
      var d = drawn(div);
      if (!d || !d.width || !d.height) done = false;
      out.push({id: div.id, drawn: !!(d && d.width && d.height), view: d});
    });
    if (!done && !final) return false;
    var libs = typeof vegaEmbed === "function" && window.kilnPlotsLibraries || {};
    var status = {libraries: {vega: libs.vega || null, vegaLite: libs.vegaLite || null, vegaEmbed: libs.vegaEmbed || null},
                  charts: out, errors: errors, complete: done};
    document.getElementById("kiln-plots-status").textContent = JSON.stringify(status);
    if (!status.libraries.vega || !status.libraries.vegaLite || !status.libraries.vegaEmbed) {
      var m = document.getElementById("kiln-plots-message");
      m.textContent = "kiln: vega did not load in this page, so the plots cannot draw. Rebuild the template: "
        + "kiln plots template";
      m.style.display = "block";
    }
    return true;
  }
  var tries = 0;
  function poll() { if (!report(++tries >= 50)) setTimeout(poll, 100); }
  window.addEventListener("load", function () { setTimeout(poll, 50); });
})();
"""

_PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <meta name="kiln-plots-page" content="{stamp}">
    <title>DVC Plot</title>
    <!-- Generated by `kiln plots template` from the vl-convert-python wheel.
         Offline: the libraries are inlined, and DVC's CDN <script> tags have no placeholder here.
         Do not edit or commit; re-generate instead. -->
{scripts}
    <style>
        body {{ font-family: sans-serif; }}
        table {{ border-spacing: 15px; }}
        body > div[id] {{ margin: 12px 0 28px 0; }}
        #kiln-plots-message {{ display: none; padding: 12px; border: 2px solid #c00; color: #c00; }}
    </style>
</head>
<body>
    <div id="kiln-plots-message"></div>
    {{plot_divs}}
    <script id="kiln-plots-status" type="application/json">{{}}</script>
    <script>{status_script}</script>
</body>
</html>
"""


def page_stamp(versions: dict[str, str] | None = None) -> str:
    """What the page records about what built it: the library versions and a digest of this module's page."""
    versions = versions or library_versions()
    code = hashlib.sha256((_PAGE + _WRAP + _STATUS_SCRIPT).encode()).hexdigest()[:12]
    return ", ".join(f"{k} {v}" for k, v in versions.items()) + f", page {code}"


def build_html_template() -> str:
    """The offline HTML template: vega, vega-lite and vega-embed inlined from vl-convert-python's bundle."""
    versions = library_versions()
    packages = " ".join(f"{k}@{versions[k]}" for k in ("vega", "vega-lite", "vega-embed"))
    bundle = _vl_convert().javascript_bundle(vl_version=versions["vega-lite"])
    libraries = json.dumps({"vega": versions["vega"], "vegaLite": versions["vega-lite"], "vegaEmbed": versions["vega-embed"]})
    js = _WRAP.format(bundle=inline_script(bundle, f"{DISTRIBUTION} {versions[DISTRIBUTION]}"), libraries=libraries)
    tag = f'    <script data-package="{packages}" data-source="{DISTRIBUTION}@{versions[DISTRIBUTION]}">\n{js}\n    </script>'
    page = _PAGE.format(stamp=page_stamp(versions), scripts=tag, status_script=_STATUS_SCRIPT)
    # The page must hold each DVC placeholder exactly where we put it, and nothing that loads from the web.
    if page.count("{plot_divs}") != 1 or "{scripts}" in page or script_sources(page):
        raise PlotsSetupError("the template must hold `{plot_divs}` once, no `{scripts}` and no <script src>")
    return page


def write_html_template(out: PathLike = HTML_TEMPLATE) -> Path:
    """Write the offline template to `out` (atomically); return its path."""
    write_text(out, build_html_template())
    return Path(out)


def ensure_html_template(out: PathLike = HTML_TEMPLATE) -> bool:
    """Build `out` unless it is already the page this code and this vl-convert build; True when it wrote it.

    The report stage calls it: a user who never ran ./setup.sh gets the page from `dvc repro`, and a
    page left by an older set-up (the npm-built one, another vl-convert) is replaced.
    """
    path = Path(out)
    stamp = page_stamp()
    if path.is_file():
        with path.open(encoding="utf-8", errors="replace") as f:
            m = _STAMP.search(f.read(4096))
        if m and m.group(1) == stamp:
            return False
    write_html_template(path)
    return True


def script_sources(html: str) -> list[str]:
    """The `src` of every <script> element in `html` (an offline page has none)."""
    return re.findall(r"<script\b[^>]*\bsrc\s*=\s*[\"']?([^\"'\s>]+)", html, flags=re.IGNORECASE)
