"""Drives encrypted sessions against a real `flexserve serve` with python/flexserve_e2e.py, for
crates/flexserve-cli/tests/encrypted.rs and encrypted_leaks.rs.

    python3 encrypted_driver.py COMMAND BASE_URL API_KEY MODEL [ARGS...]

Commands (each prints JSON lines on stdout; the last line is the result):
    chat PROMPT MAX_TOKENS      one greedy chat in a new session; a {"piece": ...} line per piece as it
                                arrives, then {"text", "pieces", "done", "identity"}
    attacks                     tampered, replayed, reordered and cut requests sent straight to the
                                daemon's HTTP API: what it answered each, and what came after
    truncated PROMPT MAX_TOKENS a chat whose answer stream loses events on the way: what the module raised
    wrong_identity KEY_HEX      a client that expects another identity key: what the module raised
    open                        opens a session for MODEL: the daemon's status and error code
    delete                      opens a session, chats, deletes it, then uses and deletes it again
"""

import base64
import json
import os
import sys
import urllib.error
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "..", "python"))

import flexserve_e2e as e2e  # noqa: E402

TIMEOUT = 120


def out(value):
    print(json.dumps(value), flush=True)


class Api:
    """The daemon's HTTP API, raw: every answer as (status, JSON body or the SSE events)."""

    def __init__(self, base, key):
        self.base, self.key = base.rstrip("/"), key

    def call(self, method, path, body=None):
        headers = {"Authorization": f"Bearer {self.key}", "Accept": "application/json, text/event-stream"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.base + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
                if resp.headers.get("Content-Type", "").startswith("text/event-stream"):
                    return resp.status, {"events": list(e2e._sse_events(resp))}
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as e:
            text = e.read()
            try:
                return e.code, json.loads(text)
            except ValueError:
                return e.code, {"raw": text.decode("utf-8", "replace")}

    def send(self, session, message):
        """Posts a sealed request on the session."""
        return self.call("POST", f"/v1/secure/sessions/{session.id}/chat",
                         {"message": base64.b64encode(message).decode()})


def request(model, prompt, max_tokens):
    return e2e.ChatRequest(model, [("user", prompt)], max_tokens, e2e.Sampling(temperature=0.0))


def refusal(status, body):
    """What a refused request got: its status and the error's code and message."""
    error = body.get("error") or {}
    return {"status": status, "code": error.get("code"), "message": error.get("message"), "body": body}


def answer(session, status, body):
    """Opens the records of an answered request: its text and how it ended."""
    if status != 200 or "events" not in body:
        raise SystemExit(f"expected an answer, got HTTP {status}: {body}")
    text, done = "", None
    for event, data in body["events"]:
        if event == "error":
            raise SystemExit(f"the daemon ended the answer: {data}")
        record = session.noise.open_record(base64.b64decode(data, validate=True))
        if isinstance(record, e2e.Text):
            text += record.text
        elif isinstance(record, e2e.Done):
            done = record.stop
        else:
            raise SystemExit(f"an error record: {record}")
    return {"text": text, "done": done}


def fresh_session_works(client, model):
    """After a refused message, a new session on the same daemon is served."""
    session = client.open_session(model)
    text = "".join(client.chat(session, [("user", "Say hello.")], max_tokens=4, temperature=0))
    client.close(session)
    return {"text": text, "done": session.last_done.stop if session.last_done else None}


def seal_any(session, req):
    """Seals a request whether or not the previous answer ended, as a careless or hostile sender
    would: the module refuses that to its users, and the secure world must refuse what comes
    out of order whoever sends it."""
    session.noise.answer_pending = False
    return session.noise.seal_request(req)


def attacks(base, key, model):
    api, client = Api(base, key), e2e.Client(base, key)
    result = {}

    # A flipped byte: the request does not decrypt; the session is over.
    session = client.open_session(model)
    message = bytearray(seal_any(session, request(model, "What is two plus two?", 8)))
    message[len(message) // 2] ^= 0x01
    result["tampered"] = refusal(*api.send(session, bytes(message)))
    result["tampered_then"] = refusal(*api.send(session, seal_any(session, request(model, "Hi", 4))))
    result["tampered_fresh"] = fresh_session_works(client, model)

    # A replay of a request already answered.
    session = client.open_session(model)
    message = seal_any(session, request(model, "What is two plus two?", 8))
    result["replay_first"] = answer(session, *api.send(session, message))
    result["replayed"] = refusal(*api.send(session, message))
    result["replayed_then"] = refusal(*api.send(session, seal_any(session, request(model, "Hi", 4))))
    result["replayed_fresh"] = fresh_session_works(client, model)

    # Two requests sealed in order, sent in reverse.
    session = client.open_session(model)
    first = seal_any(session, request(model, "What is two plus two?", 8))
    second = seal_any(session, request(model, "What is three plus three?", 8))
    result["reordered"] = refusal(*api.send(session, second))
    result["reordered_then"] = refusal(*api.send(session, first))
    result["reordered_fresh"] = fresh_session_works(client, model)

    # A request cut short by one byte.
    session = client.open_session(model)
    message = seal_any(session, request(model, "What is two plus two?", 8))
    result["cut"] = refusal(*api.send(session, message[:-1]))
    result["cut_then"] = refusal(*api.send(session, seal_any(session, request(model, "Hi", 4))))
    result["cut_fresh"] = fresh_session_works(client, model)
    out(result)


def raised(fn):
    try:
        value = fn()
    except e2e.E2eError as e:
        return {"error": type(e).__name__, "message": str(e)}
    return {"error": None, "value": value}


def main():
    command, base, key, model, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
    if command == "chat":
        client = e2e.Client(base, key, timeout=TIMEOUT)
        session = client.open_session(model)
        pieces = []
        for piece in client.chat(session, [("user", args[0])], max_tokens=int(args[1]), temperature=0):
            pieces.append(piece)
            out({"piece": piece})
        client.close(session)
        done = session.last_done
        out({"text": "".join(pieces), "pieces": len(pieces), "identity": client.expect_ed25519,
             "done": {"stop": done.stop, "prompt_tokens": done.prompt_tokens,
                      "generated_tokens": done.generated_tokens}})
    elif command == "attacks":
        attacks(base, key, model)
    elif command == "truncated":
        client = e2e.Client(base, key, timeout=TIMEOUT)
        session = client.open_session(model)
        pieces = []
        r = raised(lambda: pieces.extend(client.chat(session, [("user", args[0])], max_tokens=int(args[1]),
                                                      temperature=0)))
        r["pieces"] = len(pieces)
        out(r)
    elif command == "wrong_identity":
        client = e2e.Client(base, key, expect_ed25519=args[0], timeout=TIMEOUT)
        out(raised(lambda: client.open_session(model).id))
    elif command == "open":
        x25519 = bytes.fromhex(e2e.Client(base, key, timeout=TIMEOUT).identity()["identity_x25519"])
        _, message1 = e2e.ClientHandshake.start(x25519)
        status, body = Api(base, key).call("POST", "/v1/secure/sessions",
                                           {"model": model, "handshake": base64.b64encode(message1).decode()})
        out(refusal(status, body))
    elif command == "delete":
        api, client = Api(base, key), e2e.Client(base, key, timeout=TIMEOUT)
        session = client.open_session(model)
        text = "".join(client.chat(session, [("user", "Say hello.")], max_tokens=4, temperature=0))
        deleted = api.call("DELETE", f"/v1/secure/sessions/{session.id}")
        after = refusal(*api.send(session, seal_any(session, request(model, "Hi", 4))))
        again = refusal(*api.call("DELETE", f"/v1/secure/sessions/{session.id}"))
        out({"text": text, "deleted": {"status": deleted[0], "body": deleted[1]}, "after": after, "again": again})
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main()
