"""The drain timeline as SVG: from a status document, and from a real drain of a real daemon."""

from __future__ import annotations

import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from spotguard.control.svg import COLOURS, render_svg
from tests.control.test_render import NOW, doc
from tests.support.moto import free_port

NS = {"svg": "http://www.w3.org/2000/svg"}
SPOTGUARD = str(Path(sys.executable).with_name("spotguard"))


def titles(root: ET.Element, tag: str) -> list[str]:
    return [(el.findtext("svg:title", default="", namespaces=NS)) for el in root.iter(f"{{{NS['svg']}}}{tag}")]


def bars(root: ET.Element) -> dict[str, ET.Element]:
    """Step bars by step name (each bar's tooltip starts with the step's name)."""
    found = {}
    for rect in root.iter(f"{{{NS['svg']}}}rect"):
        tip = rect.findtext("svg:title", default="", namespaces=NS)
        if ": " in tip and rect.get("fill") in COLOURS.values():
            found[tip.split(":")[0]] = rect
    return found


def test_each_started_step_is_a_bar_against_the_window_and_its_deadlines() -> None:
    root = ET.fromstring(render_svg(doc(), safety_margin=5.0, now=NOW))
    found = bars(root)
    assert sorted(found) == ["deregister", "readiness", "wait_inflight"]  # snapshot is pending: no bar
    assert found["deregister"].get("fill") == COLOURS["timed_out"]
    assert found["wait_inflight"].get("fill") == COLOURS["running"]  # drawn up to now
    assert float(found["readiness"].get("width", "0")) >= 2  # a millisecond still shows
    # deregister ran 15 s of the 120 s window (from 0.12 s after detection): an eighth of the chart.
    chart = float(found["wait_inflight"].get("width", "0")) / 20.0 * 119.88
    assert abs(float(found["deregister"].get("width", "0")) - chart * 15 / 119.88) < 1
    assert {"drain deadline", "notice deadline", "now"} <= set(titles(root, "line"))
    assert "safety margin 5.0s" in titles(root, "rect") and "notice window" in titles(root, "rect")
    text = " ".join(t.text or "" for t in root.iter(f"{{{NS['svg']}}}text"))
    assert "aws spot-interruption (event i-0abc)" in text and "pending" in text and "timed_out" in text


def test_the_drain_deadline_comes_from_the_document_else_from_the_configured_margin() -> None:
    plain = doc()  # the daemon's /status has the notice's deadline, not the drain's
    assert "drain deadline" not in titles(ET.fromstring(render_svg(plain, now=NOW)), "line")
    root = ET.fromstring(render_svg(plain, safety_margin=5.0, now=NOW))
    assert "drain deadline" in titles(root, "line") and "safety margin 5.0s" in titles(root, "rect")
    explicit = {**plain, "drain_deadline": "2026-11-23T06:01:50.000Z"}
    assert "safety margin 10.0s" in titles(ET.fromstring(render_svg(explicit, safety_margin=5.0, now=NOW)), "rect")


def test_no_drain_and_hostile_text_still_make_valid_svg() -> None:
    ET.fromstring(render_svg({"state": "serving", "notice": None, "steps": []}, now=NOW))
    evil = doc()
    evil["steps"][0]["detail"] = '<script>alert("x")</script> & "quotes"'  # type: ignore[index]
    evil["notice"]["event_id"] = "</svg>&"  # type: ignore[index]
    root = ET.fromstring(render_svg(evil, now=NOW))
    assert root.find(".//svg:script", NS) is None


def test_a_real_drain_prints_its_steps_and_draws_them(tmp_path: Path) -> None:
    """`spotguard drain` against a running daemon shows the drain it started; `status --svg` draws it."""
    stopped = tmp_path / "stopped"
    config = tmp_path / "spotguard.toml"
    config.write_text(f"""
[agent]
cloud = "none"
state_dir = "{tmp_path}/state"
log_format = "json"
[http]
listen = "127.0.0.1:{free_port()}"
[control]
socket = "{tmp_path}/control.sock"
[drain]
safety_margin = 2.0
[server]
kind = "command"
stop_command = ["sh", "-c", "date +%s.%N > {stopped}; sleep 0.2"]
inflight_command = ["{sys.executable}", "-c", "import time; t = float(open('{stopped}').read()); print(max(0, round(2.5 - (time.time() - t))))"]
[snapshot]
url = "file://{tmp_path}/snapshots"
""")
    with open(tmp_path / "daemon.log", "ab") as log:
        daemon = subprocess.Popen([SPOTGUARD, "run", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "control.sock").exists():
            assert daemon.poll() is None and time.monotonic() < deadline, (tmp_path / "daemon.log").read_text()
            time.sleep(0.05)
        started = subprocess.run([SPOTGUARD, "drain", "--config", str(config), "--deadline", "12", "--reason", "svg"],
                                 capture_output=True, text=True, timeout=30, check=False)
        assert started.returncode == 0, started.stderr
        assert "no drain has run" not in started.stdout
        assert "drain started" in started.stdout and "state:    draining" in started.stdout
        assert "readiness" in started.stdout or "no step has reported yet" in started.stdout
        picture = tmp_path / "timeline.svg"
        while True:
            shown = subprocess.run([SPOTGUARD, "status", "--config", str(config), "--svg", str(picture)],
                                   capture_output=True, text=True, timeout=30, check=False)
            assert shown.returncode == 0, shown.stderr
            if "state:    drained" in shown.stdout:
                break
            assert time.monotonic() < deadline, shown.stdout
            time.sleep(0.1)
    finally:
        daemon.kill()
        daemon.wait(timeout=10)
    assert f"timeline picture: {picture}" in shown.stdout
    root = ET.fromstring(picture.read_text())
    found = bars(root)
    assert {"readiness", "stop_accepting", "wait_inflight", "snapshot", "deregister"} <= set(found)
    # wait_inflight starts once stop_accepting has ended, and took the ~2 s the engine reported work for.
    stop, wait = found["stop_accepting"], found["wait_inflight"]
    assert float(wait.get("x", "0")) >= float(stop.get("x", "0")) + float(stop.get("width", "0")) - 1
    assert float(wait.get("width", "0")) > float(stop.get("width", "0"))
    assert {"drain deadline", "notice deadline"} <= set(titles(root, "line"))
    assert "safety margin 2.0s" in titles(root, "rect")
