"""Async predictions through the real server: a receiver for Cog's webhooks, and helpers."""

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

TQDM_LINE = re.compile(r"(\d+)%\|[^|]*\| (\d+)/(\d+) \[")


class WebhookReceiver:
    """An HTTP server on 127.0.0.1 that records each webhook Cog sends, with its arrival time."""

    def __init__(self):
        self.events: list[tuple[float, dict]] = []
        self.arrived = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with receiver.arrived:
                    receiver.events.append((time.monotonic(), body))
                    receiver.arrived.notify_all()
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/webhook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, condition, timeout=120):
        """The first (time, body) that satisfies `condition`, waiting up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with self.arrived:
            while True:
                for event in self.events:
                    if condition(event[1]):
                        return event
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no such webhook in {timeout} s; got {[e[1] for e in self.events]}")
                self.arrived.wait(remaining)

    def close(self):
        self.server.shutdown()


def progress_steps(logs):
    return [(int(done), int(total)) for _, done, total in TQDM_LINE.findall(logs or "")]


def start_async(server, prediction_id, inputs, webhook_url, endpoint="predictions"):
    """Start a prediction (or, with endpoint="trainings", a training) that answers by webhook."""
    response = httpx.post(
        f"{server.url}/{endpoint}",
        json={
            "id": prediction_id,
            "input": inputs,
            "webhook": webhook_url,
            "webhook_events_filter": ["start", "logs", "completed"],
        },
        headers={"Prefer": "respond-async"},
        timeout=30,
    )
    assert response.status_code == 202, response.text
