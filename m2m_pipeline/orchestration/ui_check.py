"""Check that the Dagster UI renders the assets' metadata (CI: after `make smoke`), and take its screenshots.

    python -m m2m_pipeline.orchestration.ui_check --profile smoke --out runs/ui-check
    python -m m2m_pipeline.orchestration.ui_check --profile demo --out docs/img   # the docs' screenshots

Starts `dagster-webserver` on 127.0.0.1 over $DAGSTER_HOME and this repo's workspace, opens every asset page of
the profile's latest job run in headless Chromium (Playwright driving the system's `chromium`, Debian's
package: Playwright's own browser download needs the internet) and fails unless each page shows every
metadata key the instance recorded for that asset's latest materialization (what the UI reads is what the
run wrote), with the run's MLflow link. One PNG per page lands in --out; `--screenshot ASSET` names the pages
whose dialogs (the sample grid) are opened for the docs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from dagster import DagsterInstance

from m2m_pipeline.orchestration.resources import repo_root

KEY_TIMEOUT_MS = 60_000  # a cold webserver loads the code location first (tens of seconds on two cores)


def latest_metadata(instance: DagsterInstance, profile: str) -> dict[str, list[str] | None]:
    """asset path ("demo/m2m_self_checkpoint") of every asset the profile defines -> the metadata keys of its
    latest materialization in the instance (None: never materialized)."""
    from m2m_pipeline.definitions import defs

    keys = [k for k in defs.resolve_asset_graph().get_all_asset_keys() if k.path[0] == profile]
    if not keys:
        raise SystemExit(f"ui_check: no asset of profile {profile!r} in m2m_pipeline.definitions")
    out: dict[str, list[str] | None] = {}
    for key in keys:
        event = instance.get_latest_materialization_event(key)
        out["/".join(key.path)] = None if event is None else sorted(event.asset_materialization.metadata)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def webserver(root: Path, log: Path) -> Iterator[str]:
    """dagster-webserver on 127.0.0.1 (never 0.0.0.0), stopped on exit; yields its base URL once it answers."""
    port = _free_port()
    exe = Path(sys.executable).with_name("dagster-webserver")
    with open(log, "w") as out:
        proc = subprocess.Popen([str(exe), "-w", str(root / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)],
                                cwd=root, stdout=out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"ui_check: dagster-webserver exited {proc.returncode}; see {log}")
                with contextlib.suppress(OSError):
                    urllib.request.urlopen(f"{url}/server_info", timeout=5)
                    break
                if time.monotonic() > deadline:
                    raise SystemExit(f"ui_check: dagster-webserver did not answer in 180 s; see {log}")
                time.sleep(1)
            yield url
        finally:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(20)
            if proc.poll() is None:
                proc.kill()


def chromium() -> str:
    exe = os.environ.get("M2M_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        raise SystemExit("ui_check: no chromium on PATH (Debian: apt-get install chromium; or set M2M_CHROMIUM)")
    return exe


def _skip_community_dialog(page) -> None:
    """A fresh browser profile gets Dagster's "Join the Dagster community" modal once; Skip it."""
    skip = page.get_by_role("button", name="Skip")
    with contextlib.suppress(Exception):  # Playwright's TimeoutError: no modal on this page
        skip.wait_for(timeout=3_000)
        skip.click()


def check_page(page, url: str, asset: str, keys: list[str], png: Path, open_dialog: str | None) -> list[str]:
    """Open one asset page; the metadata keys it does not show (empty: all rendered)."""
    page.goto(f"{url}/assets/{asset}", wait_until="domcontentloaded")
    _skip_community_dialog(page)
    table = page.get_by_role("table").filter(has_text=keys[0]) if keys else page.locator("body")
    try:
        table.first.wait_for(timeout=KEY_TIMEOUT_MS)
    except Exception:  # noqa: BLE001 - Playwright's TimeoutError; reported below as the missing keys
        page.screenshot(path=str(png))
        return keys
    text = table.first.inner_text()
    missing = [k for k in keys if k not in text]
    if open_dialog and not missing:
        key_cell = page.locator("td").get_by_text(open_dialog, exact=True)  # the metadata row named open_dialog
        page.locator("tr").filter(has=key_cell).get_by_text("[Show Markdown]").first.click()
        page.locator("img[src^='data:image']").first.wait_for(timeout=KEY_TIMEOUT_MS)
        page.wait_for_timeout(1_500)  # the dialog fades in
    page.screenshot(path=str(png))
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--out", type=Path, default=Path("runs/ui-check"))
    parser.add_argument("--screenshot", action="append", default=[],
                        help="ASSET[:KEY]: asset name (no prefix) whose page is shot with its Markdown metadata KEY "
                             "open (default: grid, the samples)")
    parser.add_argument("--only", action="append", default=[], help="asset name (no prefix) to check; repeat")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    root = repo_root()
    expected = latest_metadata(DagsterInstance.get(), args.profile)
    args.out.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    checked = 0
    with webserver(root, args.out / "webserver.log") as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1600, "height": 1100})
        for asset, keys in sorted(expected.items()):
            name = asset.split("/")[-1]
            if args.only and name not in args.only:
                continue
            if keys is None:
                problems.append(f"{asset} was never materialized in {DagsterInstance.get().root_directory}")
                continue
            checked += 1
            png = args.out / f"dagster-ui-{name}.png"
            shots = dict(s.partition(":")[::2] for s in args.screenshot)  # ASSET[:KEY] -> KEY
            dialog = (shots[name] or "grid") if name in shots else None  # a Markdown image (default: the samples)
            missing = check_page(page, url, asset, keys, png, dialog)
            print(f"{asset}: {len(keys) - len(missing)}/{len(keys)} metadata keys rendered -> {png}")
            if missing:
                problems.append(f"{url}/assets/{asset} does not show metadata {missing} (screenshot {png})")
        browser.close()
    for p in problems:
        print("FAIL", p)
    print("ui_check:", "FAILED" if problems else f"OK: {checked} asset pages render their metadata")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
