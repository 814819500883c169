"""A long-lived ``mergekit-yaml``: runs its console-script entry point per request.

``mergekit-yaml`` is the click command ``mergekit.scripts.run_yaml:main``. Each
fresh process spends ~10 s of CPU importing torch, transformers, peft and
mergekit before a merge of these small models that takes well under a second, so
the benchmark starts this worker once and calls the very same click command,
with the same argv, once per recipe. Registration of ``merge_method: circuit``
happens here exactly as in a fresh ``mergekit-yaml`` (the installed start-up
hook, on mergekit's import; nothing imports the plugin by hand).

Protocol: one JSON object per line on stdin ``{"argv": [...]}``, one JSON reply
per line on the original stdout ``{"ok": bool, "seconds": float, "error": str}``.
Everything mergekit prints goes to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything printed to stdout by mergekit lands on stderr
    sys.stdout = sys.stderr
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    reply.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        started = time.perf_counter()
        try:
            mergekit_yaml.main(args=list(request["argv"]), standalone_mode=False)
            result = {"ok": True}
        except SystemExit as exc:  # click's usage errors
            result = {"ok": exc.code in (0, None), "error": f"exit {exc.code}"}
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            result = {
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(limit=6),
            }
        result["seconds"] = round(time.perf_counter() - started, 3)
        reply.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
