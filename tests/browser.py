"""The real headless Chromium for tests, driven by Selenium through Debian's chromedriver,
collecting console errors, failed loads and uncaught exceptions from the browser log."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


class Browser:
    """``with Browser() as b: b.navigate(url); b.evaluate("1 + 1")``; ``b.problems`` lists the
    console errors, failed loads and exceptions seen since the last navigation."""

    def __init__(
        self, executable: Path = CHROMIUM, driver: Path = CHROMEDRIVER, timeout: float = 30.0
    ) -> None:
        missing = [str(p) for p in (executable, driver) if not p.exists()]
        if missing:
            raise FileNotFoundError(
                f"{' and '.join(missing)} missing: the browser tests need Chromium and its "
                "chromedriver; `make test` installs them (apt-get install chromium chromium-driver)"
            )
        self.executable, self.driver, self.timeout = executable, driver, timeout
        self._problems: list[str] = []

    def __enter__(self) -> Browser:
        os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never try to download
        self._profile = tempfile.mkdtemp(prefix="crp-chromium-")
        options = webdriver.ChromeOptions()
        options.binary_location = str(self.executable)
        for flag in (*FLAGS, f"--user-data-dir={self._profile}"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        try:
            self._driver = webdriver.Chrome(
                options=options, service=Service(executable_path=str(self.driver))
            )
        except BaseException:
            shutil.rmtree(self._profile, ignore_errors=True)
            raise
        self._driver.set_page_load_timeout(self.timeout)
        self._driver.set_script_timeout(self.timeout)
        return self

    def __exit__(self, *exc: object) -> None:
        self._driver.quit()
        shutil.rmtree(self._profile, ignore_errors=True)

    @property
    def problems(self) -> list[str]:
        """The SEVERE browser-log entries (console errors and assertions, failed loads,
        uncaught exceptions) since the last navigation."""
        self._problems += [
            e["message"] for e in self._driver.get_log("browser") if e["level"] == "SEVERE"
        ]
        return self._problems

    def navigate(self, url: str) -> None:
        """Open ``url`` and wait until it has loaded (images included); clears ``problems``."""
        self._driver.get_log("browser")  # drop what the previous page logged
        self._problems = []
        self._driver.get(url)
        if self.evaluate("document.URL").startswith("chrome-error:"):
            raise RuntimeError(f"cannot open {url}")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-serialisable values; a
        promise is awaited)."""
        return self._driver.execute_script(f"return (\n{expression}\n);")

    def screenshot(self, path: Path) -> Path:
        """A PNG of the page as shown."""
        path.write_bytes(self._driver.get_screenshot_as_png())
        return path


def check_site(browser: Browser, index: Path) -> list[Path]:
    """Open every page of the static site beside ``index``: each renders without console
    errors or exceptions, every image loaded, and every link (and #anchor) resolves to a file
    of the site. Returns the pages checked."""
    folder = index.parent
    pages = sorted(folder.glob("*.html"))
    for page in pages:
        browser.navigate(page.as_uri())
        links = browser.evaluate(
            "Array.from(document.querySelectorAll('a[href]'), a => a.getAttribute('href'))"
        )
        images = browser.evaluate(
            "Array.from(document.images, i => [i.getAttribute('src'), i.naturalWidth])"
        )
        assert browser.problems == [], (page.name, browser.problems)
        assert images and all(width > 0 for _, width in images), (page.name, images)
        for href in links:
            target, _, anchor = href.partition("#")
            assert "//" not in target and (folder / (target or page.name)).is_file(), href
            if anchor:
                assert f'id="{anchor}"' in (folder / (target or page.name)).read_text()
    return pages
