"""examples/app.py, the Gradio web app: in a real browser (Debian's headless Chromium, driven by Selenium) and
through gradio_client, against the shipped model served on 127.0.0.1.

The browser tests need `chromium` and `chromium-driver` (apt-get install chromium chromium-driver); without them
they are skipped, unless NANOI2V_REQUIRE_BROWSER=1 (as .ci/run sets), which makes a missing browser a failure.
The page's screenshot is saved to outputs/test_artifacts/app.png.
"""

import os
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

gradio = pytest.importorskip("gradio", reason="the app's extra: pip install -e '.[app]'")
import app  # noqa: E402
from gradio_client import Client, handle_file  # noqa: E402

from nanoi2v_diffusers.cli import load_pipeline  # noqa: E402
from nanoi2v_diffusers.data import read_video_frames  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
ARTIFACTS = REPO / "outputs" / "test_artifacts"
TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app with the shipped model, on a free local port: (its address, the folder its videos go to)."""
    output_dir = tmp_path_factory.mktemp("app-videos")
    page = app.build_app(load_pipeline(str(app.DEFAULT_MODEL)), output_dir=output_dir)
    port = _free_port()
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", output_dir
    page.close()


@pytest.fixture(scope="module")
def first_frame(tmp_path_factory):
    frame, caption = next(iter(app.built_in_scenes(1).values()))
    path = tmp_path_factory.mktemp("frames") / "first.png"
    Image.fromarray(frame).save(path)
    return path, caption


def test_the_api_endpoint_takes_image_prompt_steps_guidance_seed_and_returns_the_video(served, first_frame):
    address, _ = served
    path, caption = first_frame
    client = Client(address, verbose=False)
    result = client.predict(handle_file(str(path)), caption, 4, 5.0, 3, api_name="/generate")
    video = read_video_frames(result["video"] if isinstance(result, dict) else result)
    assert video.shape == (17, 64, 64, 3)
    expected = app.make_generate(load_pipeline(str(app.DEFAULT_MODEL)), Path(served[1]), 64)(
        Image.open(path).convert("RGB"), caption, 4, 5.0, 3)  # the same call in-process: the same video,
    # up to float sums that the server's worker thread orders differently (a few pixels on a moving edge)
    difference = np.abs(video.astype(float) - read_video_frames(expected).astype(float))
    assert difference.mean() < 0.05 and (difference > 2).mean() < 1e-3, (difference.mean(), (difference > 2).mean())
    with pytest.raises(Exception, match="Give a first frame"):  # gradio_client's AppError: the page's message
        client.predict(None, "  ", 4, 5.0, 0, api_name="/generate")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("NANOI2V_REQUIRE_BROWSER") == "1":
            pytest.fail("NANOI2V_REQUIRE_BROWSER=1 but chromium / chromedriver are not installed")
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000",
                     "--autoplay-policy=no-user-gesture-required"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _open(browser, address):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(address)
    wait = WebDriverWait(browser, TIMEOUT_S)
    wait.until(ready.element_to_be_clickable((By.CSS_SELECTOR, "#generate")))
    return wait


def test_in_a_browser_an_uploaded_frame_and_a_prompt_give_a_playable_video(served, first_frame, browser):
    from selenium.webdriver.common.by import By

    address, _ = served
    path, caption = first_frame
    wait = _open(browser, address)
    browser.find_element(By.CSS_SELECTOR, "#first-frame input[type=file]").send_keys(str(path))
    wait.until(lambda driver: driver.find_elements(By.CSS_SELECTOR, "#first-frame img"))  # the upload shows
    browser.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys(caption)
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    video = wait.until(lambda driver: next(iter(driver.find_elements(By.CSS_SELECTOR, "#video video")), None))
    # Playable: the browser decoded it (metadata and a first frame), at the clip's 17 frames / 8 fps.
    wait.until(lambda driver: driver.execute_script("return arguments[0].readyState >= 2", video))
    duration = browser.execute_script("return arguments[0].duration", video)
    assert duration == pytest.approx(17 / 8, abs=0.2)
    size = browser.execute_script("return [arguments[0].videoWidth, arguments[0].videoHeight]", video)
    assert size == [64, 64]
    wait.until(lambda driver: driver.find_elements(By.CSS_SELECTOR, "#gif a"))  # the GIF to download
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "app.png"))


def test_in_a_browser_bad_input_shows_a_message_not_a_trace(served, browser):
    from selenium.webdriver.common.by import By

    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait

    _open(browser, served[0])
    browser.find_element(By.CSS_SELECTOR, "#generate").click()  # no frame, no prompt
    # The page re-renders while the message arrives: elements found a moment before may be gone.
    wait = WebDriverWait(browser, TIMEOUT_S, ignored_exceptions=(StaleElementReferenceException,))
    message = wait.until(ready.visibility_of_element_located((By.XPATH, "//*[contains(text(), 'Give a first frame')]")))
    assert message.is_displayed()
    assert "Traceback" not in browser.find_element(By.TAG_NAME, "body").text
