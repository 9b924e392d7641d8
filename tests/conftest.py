import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest  # noqa: E402
import torch  # noqa: E402

# The test models are tiny: one thread is faster than two fighting over them (and than the server
# subprocesses that browser and API tests start beside the test process).
torch.set_num_threads(1)

from tests.tiny_sd import build_tiny_sd  # noqa: E402


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium through Playwright, one per test module (each module starts its own server)."""
    from playwright.sync_api import sync_playwright

    from tests.browser import CHROMIUM, CHROMIUM_ARGS

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from modules import sd_models

    return sd_models.load_model(tiny_model_dir, device="cpu")
