"""Streams through the gate, restarts spotguard.service mid-stream, and records what the stream saw."""

import http.client
import json
import subprocess
import time


def event(text: str) -> None:
    with open("/e2e/events.log", "a") as log:
        log.write(f"{time.monotonic():.3f} {text}\n")


def main_pid(unit: str) -> str:
    return subprocess.run(["systemctl", "show", "-p", "MainPID", "--value", unit], capture_output=True,
                          text=True, check=False).stdout.strip()


deadline = time.monotonic() + 30
while True:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", 8000, timeout=30)
        conn.request("POST", "/v1/chat/completions", body=json.dumps({"model": "m", "stream": True, "messages": []}),
                      headers={"content-type": "application/json"})
        response = conn.getresponse()
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)  # the gate is still starting; bounded by the deadline
first = response.readline()
gate_before, daemon_before = main_pid("spotguard-gate.service"), main_pid("spotguard.service")
event(f"stream-started status={response.status} first={first.startswith(b'data: ')}")
subprocess.run(["systemctl", "restart", "spotguard.service"], check=False, timeout=60)
event(f"restarted daemon-new-pid={main_pid('spotguard.service') != daemon_before} "
      f"gate-same-pid={main_pid('spotguard-gate.service') == gate_before} "
      f"active={subprocess.run(['systemctl', 'is-active', 'spotguard.service'], capture_output=True, text=True, check=False).stdout.strip()}")
lines = (first + response.read()).split(b"\n")
data = [line for line in lines if line.startswith(b"data: ")]
event(f"stream-ended events={len(data)} done={data[-1] == b'data: [DONE]' if data else False}")
subprocess.run(["systemctl", "poweroff", "--no-block"], check=False)
