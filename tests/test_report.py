"""The run report: one page with the summary, the verdict, plots by iteration, samples and the manifest,
opened in headless Chromium with every image decoded."""

import re
import shutil
import subprocess

import pytest
from fake_run import make_run

from sedir_utils.share.report import write_report
from sedir_utils.share.summary import write_summary

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Written into a copy of the page: after the load event, the title says how many images decoded.
CHECK = """<script>window.addEventListener("load", () => {
  const images = [...document.images];
  const drawn = images.filter((i) => i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 0);
  document.title = `images ${drawn.length}/${images.length}`;
});</script>"""


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    make_run(run_dir)
    write_summary(run_dir, 100, 0)
    return write_report(run_dir)


def test_the_report_holds_the_summary_verdict_plots_samples_and_manifest(report):
    page = report.read_text(encoding="utf-8")
    assert page.count('src="data:image/png;base64,') == 3  # summary, question diversity, reward by iteration
    for heading in ("GPQA by iteration", "The verdict", "Question diversity", "Reward monitoring", "Manifest"):
        assert f"<h2>{heading}" in page, heading
    assert "gain within noise" in page or "gain outside noise" in page  # the verdict table's readings
    assert page.count('<div class="qa">') == 6  # three samples of each of the two iterations
    assert "Iteration 2, question 0: why does ice float on water?" in page
    assert "<summary>params</summary>" in page and "run_name: embedded" in page
    assert "<script" not in page  # a page to send: nothing runs


def _open_in_chromium(page_path, tmp_path) -> str:
    copy = tmp_path / "checked.html"
    copy.write_text(page_path.read_text(encoding="utf-8").replace("</body>", CHECK + "</body>"), encoding="utf-8")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
    flags += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
    out = subprocess.run(
        [CHROMIUM, *flags, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom"]
        + [copy.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    title = re.search(r"<title>([^<]*)</title>", out.stdout)
    assert title, out.stderr[-2000:]
    return title.group(1)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (make test installs Debian's where it runs as root)")
def test_the_report_renders_every_image_in_headless_chromium(report, tmp_path, processes):
    assert _open_in_chromium(report, tmp_path) == "images 3/3"


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (make test installs Debian's where it runs as root)")
def test_the_browser_check_sees_a_broken_image(report, tmp_path, processes):
    broken = tmp_path / "broken.html"
    broken.write_text(report.read_text(encoding="utf-8").replace("base64,iVBOR", "base64,AAAA", 1), encoding="utf-8")
    assert _open_in_chromium(broken, tmp_path) == "images 2/3"


def test_the_report_command_writes_it_for_a_run_folder(report, tmp_path, capsys):
    from sedir_utils.run.cli import main

    report.unlink()
    assert main(["report", str(report.parent)]) == 0 and report.is_file()
    assert str(report) in capsys.readouterr().out
    assert main(["report", str(tmp_path / "none")]) == 1
    assert "no manifest.json" in capsys.readouterr().err
