"""Drives python/flexserve_e2e.py for crates/flexserve-e2e/tests/python_interop.rs.

    e2e_interop_driver.py stdio
        JSON lines on stdin, one answer line each on stdout:
        {"op": "start", "server_public": HEX}  -> {"message1": HEX}
        {"op": "finish", "message2": HEX}      -> {"ok": true}
        {"op": "seal", "request": REQUEST}     -> {"message": HEX}
        {"op": "open", "message": HEX}         -> {"record": RECORD}
        {"op": "fuzz", "seed": N, "rounds": N, "valid": [HEX]}
            -> {"decoded": N}: random and mutated plaintexts into the decoders,
               which may only raise E2eError
        {"op": "quit"}
        A failure answers {"error": TEXT, "type": EXCEPTION CLASS}.
    e2e_interop_driver.py http BASE_URL X25519_HEX API_KEY
        Prints {"report": ..., "signature": ...} (an identity report it signs for the
        fake daemon to serve), reads one line (the daemon is ready), runs the HTTP
        client against it and prints {"ok": CHECKS}.
"""

import json
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
try:
    import flexserve_e2e as e2e
except ImportError as e:
    print(json.dumps({"fatal": f"{e}: run scripts/test.sh (it installs the cryptography package)"}), flush=True)
    sys.exit(3)


def record_json(r):
    if isinstance(r, e2e.Text):
        return {"kind": "text", "text": r.text}
    if isinstance(r, e2e.Done):
        return {"kind": "done", "stop": r.stop, "prompt_tokens": r.prompt_tokens,
                "generated_tokens": r.generated_tokens, "prefill_micros": r.prefill_micros,
                "decode_micros": r.decode_micros}
    return {"kind": "error", "code": r.code, "message": r.message}


def request_from_json(d):
    s = d["sampling"]
    sampling = e2e.Sampling(s["temperature"], s["top_k"], s["top_p"], s["min_p"], s["repeat_penalty"],
                            s["repeat_last_n"], s["seed"])
    return e2e.ChatRequest(d["model"], [tuple(m) for m in d["messages"]], d["max_tokens"], sampling, d["stop"])


def fuzz(seed, rounds, valid):
    rng = random.Random(seed)
    decoded = 0
    for i in range(rounds):
        if i % 4 == 0:
            data = bytearray(rng.randbytes(rng.randrange(600)))
        else:
            data = bytearray(rng.choice(valid))
            for _ in range(rng.randint(1, 3)):
                op = rng.randrange(4)
                if op == 0 and data:
                    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
                elif op == 1 and len(data) >= 4:
                    at = rng.randrange(len(data) - 3)
                    value = rng.choice([0, 1, 2**32 - 1, rng.getrandbits(32), len(data) - at])
                    data[at:at + 4] = value.to_bytes(4, "little")
                elif op == 2:
                    del data[rng.randrange(len(data) + 1):]
                else:
                    data.extend(bytes(rng.choice([1, 64, 256])))
        for decode, encode in ((e2e.decode_request, e2e.encode_request), (e2e.decode_record, e2e.encode_record)):
            try:
                value = decode(bytes(data))
            except e2e.E2eError:
                continue
            decoded += 1
            # What decodes re-encodes to the same bytes (a NaN's payload may not survive Python's floats).
            if not (isinstance(value, e2e.ChatRequest) and any(x != x for x in vars(value.sampling).values())):
                assert bytes(encode(value)) == bytes(data), (decode.__name__, data.hex())
    return decoded


def stdio():
    handshake = session = None
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "quit":
                return
            if op == "start":
                handshake, m1 = e2e.ClientHandshake.start(bytes.fromhex(cmd["server_public"]))
                out = {"message1": m1.hex()}
            elif op == "finish":
                session = handshake.finish(bytes.fromhex(cmd["message2"]))
                out = {"ok": True}
            elif op == "seal":
                # This harness checks each request's encoding alone; the rule that an answer
                # ends before the next request is sealed is checked in http() below.
                session.answer_pending = False
                out = {"message": session.seal_request(request_from_json(cmd["request"])).hex()}
            elif op == "fuzz":
                out = {"decoded": fuzz(cmd["seed"], cmd["rounds"], [bytes.fromhex(v) for v in cmd["valid"]])}
            elif op == "open":
                out = {"record": record_json(session.open_record(bytes.fromhex(cmd["message"])))}
            else:
                out = {"error": f"unknown op {op}", "type": "driver"}
        except e2e.E2eError as e:
            out = {"error": str(e), "type": type(e).__name__}
        print(json.dumps(out), flush=True)


def expect_raises(kind, fn, contains=""):
    try:
        fn()
    except kind as e:
        assert contains in str(e), f"{kind.__name__} without {contains!r}: {e}"
        return e
    raise AssertionError(f"no {kind.__name__} raised")


def http(base_url, x25519_hex, api_key):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    signing = Ed25519PrivateKey.generate()
    ed_hex = signing.public_key().public_bytes_raw().hex()
    report = json.dumps({"format": "flexserve-identity-report-1", "identity_ed25519": ed_hex,
                         "identity_x25519": x25519_hex, "deployment": "development"}, separators=(",", ":"))
    print(json.dumps({"report": report, "signature": signing.sign(report.encode()).hex()}), flush=True)
    sys.stdin.readline()
    checks = 0

    # The identity: verified, pinned, a wrong pin refused, a bad API key refused.
    expect_raises(e2e.IdentityError, e2e.Client(base_url, api_key, expect_ed25519="00" * 32).identity,
                  "not the expected")
    expect_raises(e2e.HTTPError, e2e.Client(base_url, "wrong").identity, "invalid API key")
    tampered = report.replace('"deployment":"development"', '"deployment":"service"')
    expect_raises(e2e.IdentityError, lambda: e2e.verify_identity(tampered, signing.sign(report.encode()).hex()),
                  "does not verify")
    client = e2e.Client(base_url, api_key)
    assert client.identity()["identity_x25519"] == x25519_hex
    assert client.expect_ed25519 == ed_hex
    checks += 3

    # An answer streams back: the fake daemon echoes the last message in pieces.
    session = client.open_session("interop-model")
    words = "Grüße aus Python, 世界 🦀 " * 3
    pieces = list(client.chat(session, [{"role": "system", "content": "be brief"}, ("user", words)],
                              max_tokens=7, temperature=0.25, top_k=3, top_p=0.5, min_p=0.125, repeat_penalty=1.5,
                              repeat_last_n=9, seed=2**64 - 1, stop=["\n", "Ende"]))
    assert "".join(pieces) == words and len(pieces) > 1, pieces
    done = session.last_done
    assert done.stop == "max_tokens" and done.generated_tokens == len(pieces) and done.prompt_tokens == 2, done
    # A second request on the same session, large enough for several Noise messages.
    big = "x" * 200_000
    assert "".join(client.chat(session, [("user", big)])) == big
    assert session.noise.send_nonce == 1 + 4, session.noise.send_nonce
    checks += 2

    # An error record, a daemon error after records, a truncated stream, a tampered record.
    e = expect_raises(e2e.RecordError, lambda: list(client.chat(session, [("user", "please fail")])), "engine")
    assert e.code == 8
    expect_raises(e2e.E2eError, lambda: list(client.chat(session, [("user", "please daemon-error")])),
                  "the daemon ended the answer: the secure world crashed")
    # That answer never ended: the session takes no other request (the daemon could otherwise hand the
    # withheld answer over as the next one's).
    expect_raises(e2e.BrokenSessionError, lambda: list(client.chat(session, [("user", "hi")])),
                  "not read to its end")
    session = client.open_session("interop-model")
    expect_raises(e2e.TruncatedStreamError, lambda: list(client.chat(session, [("user", "please truncate")])),
                  "truncated")
    expect_raises(e2e.BrokenSessionError, lambda: list(client.chat(session, [("user", "hi")])),
                  "not read to its end")
    session = client.open_session("interop-model")
    expect_raises(e2e.DecryptError, lambda: list(client.chat(session, [("user", "please tamper")])),
                  "tampered with, replayed, reordered or dropped")
    expect_raises(e2e.BrokenSessionError, lambda: list(client.chat(session, [("user", "hi")])))
    checks += 7

    # A closed session is gone.
    client.close(session)
    other = client.open_session("interop-model")
    assert "".join(client.chat(other, [("user", "again")])) == "again"
    client.close(other)
    expect_raises(e2e.HTTPError, lambda: list(client.chat(other, [("user", "hi")])), "no such session")
    checks += 2
    print(json.dumps({"ok": checks}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "stdio":
        stdio()
    else:
        http(*sys.argv[2:5])
