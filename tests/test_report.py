"""The explanation report: content, escaping, self-containment, `imr explain`, and a headless Chromium render."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import pytest

from imr_model.demo import write_demo_letters
from imr_model.letters import parse_file
from imr_model.report import render_report

from inference_helpers import tiny_model

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def _item(index: int = 1, request: str = "Physical therapy x6", scores=(0.8, -0.4, 0.0)) -> dict:
    text = "therapy is indicated"
    starts = [0, 8, 11]
    words = [{"word": w, "start": s, "end": s + len(w), "score": sc} for w, s, sc in zip(text.split(), starts, scores)]
    return {
        "letter_id": "L1", "item_index": index, "request": request, "outcome": "Overturned", "p_overturned": 0.83,
        "guidelines": {"odg_pain": 0.91, "acoem": 0.12}, "guideline_labels": ["odg_pain"], "letter_decision": "Upheld",
        "attributions": {"target": "outcome", "text_view": "rationale", "delta": 1e-3, "n_steps": 32, "words": words, "text": text},
    }  # fmt: skip


def test_render_content_and_shading():
    html = render_report([_item(1), _item(2)], letter_id="L1", source="/x/L1.pdf", model_info={"uri": "models/m"}, top_k=2)
    assert html.count('<section class="item"') == 2
    assert "P(Overturned) = <b>0.830</b>" in html and "letter states: <b>Upheld</b>" in html
    assert 'class="chip on">odg_pain 0.91' in html and 'class="chip">acoem 0.12' in html
    spans = re.findall(r'<span class="w" data-score="([^"]+)"[^>]*style="background:rgba\((\d+),(\d+),(\d+),([\d.]+)\)"', html)
    assert len(spans) == 6
    (s1, *rgb1, a1), (s2, *rgb2, a2), (s3, *_, a3) = spans[:3]
    assert rgb1 == ["200", "30", "30"] and rgb2 == ["30", "90", "210"]  # positive red, negative blue
    assert float(a1) == pytest.approx(0.85) and float(a2) == pytest.approx(0.425) and float(a3) == 0.0
    tables = re.findall(r"<tbody>(.*?)</tbody>", html)
    assert [t.count("<tr>") for t in tables] == [2, 2]  # top_k rows per item
    assert ">therapy</td>" in tables[0].split("</tr>")[0]  # largest |score| first


def test_escaping_and_self_contained():
    evil = '<script>alert("x")</script>'
    html = render_report([_item(request=evil)], letter_id="<b>id</b>", model_info={})
    assert evil not in html and "&lt;script&gt;" in html and "&lt;b&gt;id&lt;/b&gt;" in html
    assert "<script" not in html and "<link" not in html and "http://" not in html and "https://" not in html
    assert "@import" not in html and "url(" not in html


def test_items_without_attributions_and_bad_top_k():
    item = _item()
    item["attributions"] = None
    assert "No attributions were computed" in render_report([item], letter_id="L")
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        render_report([item], letter_id="L", top_k=0)


@pytest.fixture(scope="module")
def explained(tmp_path_factory) -> tuple[Path, Path]:
    """`imr explain` on a synthetic letter (PDF) with a tiny model; returns (letter, report)."""
    from imr_model.cli import main

    d = tmp_path_factory.mktemp("explain")
    letter = write_demo_letters(d, 3, seed=41, fmt="pdf")[2]
    out = d / "report.html"
    try:
        main(["explain", str(letter), "-o", str(out), "--model", str(tiny_model(d / "model", seed=12)), "--n-steps", "8"])
    except SystemExit as exc:
        assert exc.code in (0, None)
    return letter, out


def test_explain_cli_writes_report(explained):
    letter, out = explained
    html = out.read_text(encoding="utf-8")
    parsed = parse_file(letter)
    assert html.count('<section class="item"') == len(parsed.items)
    for item in parsed.items:
        assert item.request.replace("&", "&amp;") in html
    assert html.count('class="w"') > 20 and "convergence delta" in html


def test_explain_missing_file(tmp_path):
    from imr_model.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["explain", str(tmp_path / "nope.pdf"), "-o", str(tmp_path / "r.html")])
    assert exc.value.code == 2


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def test_report_renders_in_headless_chromium(explained):
    found = _chromium()
    if found is None:
        pytest.skip("chromium and chromedriver are not installed (apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    letter, report = explained
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    profile = tempfile.mkdtemp(prefix="imr-chromium-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                 "--window-size=1200,1600"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(found[1]), options=options)
    try:
        driver.get(report.as_uri())
        assert driver.title == f"IMR report {letter.stem}"
        sections = driver.find_elements(By.CSS_SELECTOR, "section.item")
        assert len(sections) == len(parse_file(letter).items)
        assert all(s.is_displayed() and s.size["height"] > 100 for s in sections)
        shaded = driver.execute_script(
            "return Array.from(document.querySelectorAll('span.w')).filter("
            "e => getComputedStyle(e).backgroundColor !== 'rgba(0, 0, 0, 0)').length"
        )
        assert shaded > 20  # the inline styles were applied by the browser, not just present in the file
        assert driver.execute_script("return document.fonts.status") == "loaded"
        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "explain_report.png"
        assert driver.save_screenshot(str(shot))
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    import matplotlib.image as mpimg

    pixels = mpimg.imread(str(shot))
    assert pixels.shape[0] > 500 and pixels[..., :3].std() > 0.05  # not a blank page


def test_input_warnings_are_shown_escaped():
    item = _item()
    item["warnings"] = ["structure: not a parsed IMR letter <b>", "length: 3 words"]
    html = render_report([item, _item(2)], letter_id="L")
    assert html.count('<p class="warning">') == 2
    assert "structure: not a parsed IMR letter &lt;b&gt;" in html and "length: 3 words" in html


def test_report_says_which_windows_were_attributed():
    item = _item()
    item["attributions"]["windows"] = [
        {"start": 0, "end": 7, "weight": 0.0, "attributed": False, "contribution": 0.0},
        {"start": 8, "end": 20, "weight": 1.0, "attributed": True, "contribution": 0.4},
    ]
    html = render_report([item], letter_id="L")
    assert "attributed windows: 1 of 2 (chars 8–20)" in html and "1 not pooled into this target" in html
    item["attributions"]["windows"][0].update(weight=0.5, contribution=-0.25)
    html = render_report([item], letter_id="L")
    assert "1 pooled but not attributed (coverage below 1): they carry -0.2500 logits" in html
