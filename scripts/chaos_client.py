#!/usr/bin/env python3
"""Load for scripts/chaos-api: posts N messages to the API from 16 threads,
each with its own Idempotency-Key, retrying as a client should (503, 429,
connection errors) until it gets 202. Prints `index job_id tries` a line."""
import http.client
import json
import sys
import threading
import time

port, key, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
lock = threading.Lock()
accepted = {}
next_index = [0]


def post_all():
    conn = None
    while True:
        with lock:
            i = next_index[0]
            next_index[0] += 1
        if i >= n:
            return
        body = json.dumps({"message": {
            "from": "shop@example.com", "to": [f"user{i}@example.org"],
            "subject": f"chaos {i}", "text": "hello " * 300}})
        tries = 0
        while True:
            tries += 1
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                conn.request("POST", "/v1/messages", body, {
                    "Authorization": f"Bearer {key}",
                    "Content-Type": "application/json",
                    "Idempotency-Key": f"chaos-{i}"})
                response = conn.getresponse()
                data = response.read()
                if response.status == 202:
                    with lock:
                        accepted[i] = (json.loads(data)["id"], tries)
                    break
                if response.status not in (409, 429, 503):
                    print("unexpected", response.status, data[:200], file=sys.stderr)
                    break
            except (OSError, http.client.HTTPException):
                conn = None
            time.sleep(0.2)


threads = [threading.Thread(target=post_all) for _ in range(16)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
for i in sorted(accepted):
    print(i, *accepted[i])
