"""Load an HTML page in headless Chromium and report which chart images decoded.

The page is copied with a small script appended that, on the load event,
marks every ``img.chart`` that decoded (``complete`` and ``naturalWidth > 0``)
with ``data-decoded="<width>"`` and sets ``data-charts="<total>/<decoded>"`` on
the body; ``chromium --dump-dom`` prints the DOM after the load event. A
deliberately broken image is added as a control: it must not decode.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, Optional

_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")

_PROBE = """
<img class="probe-broken" alt="control" src="data:image/png;base64,bm90IGEgcG5n">
<script>
window.addEventListener('load', function () {
  var charts = document.querySelectorAll('img.chart');
  var decoded = 0;
  charts.forEach(function (img) {
    if (img.complete && img.naturalWidth > 0) {
      decoded++;
      img.setAttribute('data-decoded', String(img.naturalWidth));
    }
  });
  var broken = document.querySelector('img.probe-broken');
  broken.setAttribute('data-decoded', String(broken.naturalWidth));
  document.body.setAttribute('data-charts', charts.length + '/' + decoded);
});
</script>
"""


def find_chromium() -> Optional[str]:
    """$CHROMIUM, else the first Chromium/Chrome binary on PATH."""
    explicit = os.environ.get("CHROMIUM")
    if explicit and Path(explicit).is_file():
        return explicit
    for name in _CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def probe_charts(chromium: str, page: Path, workdir: Path) -> Dict[str, object]:
    """{"charts": "<total>/<decoded>", "decoded": {chart name: width}, "control": width}."""
    text = Path(page).read_text(encoding="utf-8")
    assert "</body>" in text
    probe = Path(workdir) / "probe.html"
    probe.write_text(text.replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    result = subprocess.run(
        [
            chromium, "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-dev-shm-usage", "--no-first-run",
            f"--user-data-dir={Path(workdir) / 'chromium-profile'}",
            "--dump-dom", probe.resolve().as_uri(),
        ],
        capture_output=True, text=True, timeout=120,
    )
    dom = result.stdout
    assert result.returncode == 0 and "<body" in dom, (
        f"chromium failed ({result.returncode}): {result.stderr[-2000:]}"
    )
    charts = re.search(r'<body[^>]*data-charts="([^"]*)"', dom)
    decoded = {}
    for tag in re.findall(r"<img[^>]*>", dom):
        name = re.search(r'data-chart="([^"]*)"', tag)
        width = re.search(r'data-decoded="(\d+)"', tag)
        if name:
            decoded[name.group(1)] = int(width.group(1)) if width else 0
        elif "probe-broken" in tag:
            control = int(width.group(1)) if width else -1
    return {
        "charts": charts.group(1) if charts else None,
        "decoded": decoded,
        "control": control,
    }
