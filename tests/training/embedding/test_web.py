"""The web demo in a real browser: barlow-search --serve, driven by Debian's headless chromium
through selenium (nothing downloaded). `make test` installs the demo extra and, as root, chromium."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.training.embedding.conftest import BIN, run_cli
from tests.ports import free_port

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver"),
]



def _wait_for(url: str, server: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"barlow-search --serve exited: {server.stderr.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def _dark_fraction(screenshot: Path, rect: dict) -> float:
    """Share of dark pixels in the gallery's area of a screenshot: the digits are white on black."""
    with Image.open(screenshot) as image:
        box = (rect["x"], rect["y"], rect["x"] + rect["width"], rect["y"] + rect["height"])
        pixels = np.asarray(image.convert("L").crop(tuple(int(v) for v in box)))
    return float((pixels < 40).mean())


def test_upload_an_image_and_see_its_neighbours(barlow_model, tmp_path):
    pytest.importorskip("gradio")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from training.shared.data import load_image_dataset

    index_dir = tmp_path / "emb"
    made = run_cli("barlow-embed", "--model_name_or_path", str(barlow_model), "--max_train_samples", "100",
                   "--output_dir", str(index_dir))
    assert made.returncode == 0, made.stderr[-3000:]
    query = tmp_path / "query.png"
    load_image_dataset(None, split="train", streaming=False)[7]["image"].save(query)

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen([str(BIN / "barlow-search"), "--index_dir", str(index_dir), "--serve", "--k", "5",
                               "--server_port", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    driver = None
    try:
        _wait_for(f"http://127.0.0.1:{port}/", server)
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     f"--user-data-dir={tmp_path / 'chromium'}", "--window-size=1280,900"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        driver.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#query input[type=file]"))
        gallery = driver.find_element(By.ID, "neighbours")
        driver.save_screenshot(str(tmp_path / "before.png"))
        before = _dark_fraction(tmp_path / "before.png", gallery.rect)

        driver.find_element(By.CSS_SELECTOR, "#query input[type=file]").send_keys(str(query))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#neighbours img")) >= 5)
        wait.until(lambda d: "5 nearest of 100 images" in d.find_element(By.ID, "status").text)
        time.sleep(1)  # let the thumbnails paint
        driver.save_screenshot(str(tmp_path / "after.png"))
        thumbnails = [_dark_fraction(tmp_path / "after.png", image.rect)
                      for image in driver.find_elements(By.CSS_SELECTOR, "#neighbours img")]
        captions = driver.find_element(By.ID, "neighbours").text
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=30)
    shutil.copy(tmp_path / "after.png", Path(os.environ.get("BARLOW_SCREENSHOT_DIR", tmp_path)) / "web_demo.png")
    # Before the upload the gallery is empty (light); after it, its five thumbnails show digits: white
    # strokes on black, so mostly dark pixels where each thumbnail is drawn on the screenshot.
    assert before < 0.02, before
    assert len(thumbnails) >= 5 and all(0.3 < share < 0.98 for share in thumbnails[:5]), thumbnails
    assert "1.000 · id 7" in captions  # the query is image 7 of the index: its own best match
