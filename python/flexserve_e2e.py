"""FlexServe encrypted sessions, the client side (docs/encrypted-sessions.md).

A Noise NK initiator (Noise_NK_25519_ChaChaPoly_SHA256, written here on the
`cryptography` package per revision 34 of the Noise specification), the
request and record layouts, and a small HTTP client over urllib. The daemon
carries the messages but cannot read them.

    client = Client("http://127.0.0.1:8080", api_key=KEY, expect_ed25519=PINNED_HEX)
    session = client.open_session("smollm2")
    for piece in client.chat(session, [{"role": "user", "content": "Hello"}]):
        print(piece, end="")
    client.close(session)
"""

import base64
import hashlib
import hmac
import json
import struct
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple, Union

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

NOISE_PARAMS = "Noise_NK_25519_ChaChaPoly_SHA256"
PROLOGUE = b"flexserve-e2e-v1"
HANDSHAKE_LEN = 48
TAG_LEN = 16
MAX_NOISE_MESSAGE = 65535
MAX_NOISE_PAYLOAD = MAX_NOISE_MESSAGE - TAG_LEN
MAX_REQUEST_PLAINTEXT = 2 << 20
REQUEST_PADDING = 256
RECORD_PADDING = 64
MAX_RECORD_PLAINTEXT = MAX_NOISE_PAYLOAD // RECORD_PADDING * RECORD_PADDING
DEFAULT_MAX_TOKENS = 256
REQUEST_VERSION = 1
KIND_TEXT, KIND_DONE, KIND_ERROR = 1, 2, 3
STOP_REASONS = ("end_of_generation", "max_tokens", "stop_string", "context_full")
# The world protocol's ErrorCode numbering (error records carry it).
ERROR_CODES = ("malformed", "out_of_order", "version", "no_such_model", "verification", "no_memory",
               "not_resident", "bad_argument", "engine", "internal", "policy", "cancelled", "encrypted_session")


class E2eError(Exception):
    """An encrypted session failed."""


class HandshakeError(E2eError):
    """The Noise handshake failed (a wrong server key, a tampered message)."""


class DecryptError(E2eError):
    """A message did not decrypt at the expected nonce."""


class TruncatedError(E2eError):
    """A message or plaintext of a length the protocol cannot produce."""


class MalformedError(E2eError):
    """A plaintext that does not follow the layout."""


class TooLargeError(E2eError):
    """A request over MAX_REQUEST_PLAINTEXT."""


class BrokenSessionError(E2eError):
    """An earlier failure ended the session; open a new one."""


class IdentityError(E2eError):
    """The identity report did not verify or is not the expected one."""


class RecordError(E2eError):
    """The secure world answered with an error record."""

    def __init__(self, code: int, message: str):
        name = ERROR_CODES[code] if code < len(ERROR_CODES) else f"code {code}"
        super().__init__(f"the secure world refused: {message} ({name})")
        self.code, self.message = code, message


class TruncatedStreamError(E2eError):
    """The answer's stream ended without a done or error record."""


class HTTPError(E2eError):
    """The daemon answered with an error outside the encrypted layer."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


# ---- Noise NK (initiator) -------------------------------------------------------------------

def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _hkdf(chaining_key: bytes, ikm: bytes) -> Tuple[bytes, bytes]:
    temp = _hmac(chaining_key, ikm)
    out1 = _hmac(temp, b"\x01")
    return out1, _hmac(temp, out1 + b"\x02")


def _nonce(n: int) -> bytes:
    return b"\x00" * 4 + n.to_bytes(8, "little")


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as e:
        raise HandshakeError(f"the Diffie-Hellman agreement failed: {e}") from None


class _SymmetricState:
    def __init__(self):
        name = NOISE_PARAMS.encode()
        self.h = name.ljust(32, b"\x00") if len(name) <= 32 else hashlib.sha256(name).digest()
        self.ck = self.h
        self.k: Optional[bytes] = None
        self.n = 0

    def mix_hash(self, data: bytes) -> None:
        self.h = hashlib.sha256(self.h + data).digest()

    def mix_key(self, ikm: bytes) -> None:
        self.ck, self.k = _hkdf(self.ck, ikm)
        self.n = 0

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = ChaCha20Poly1305(self.k).encrypt(_nonce(self.n), plaintext, self.h)
        self.n += 1
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = ChaCha20Poly1305(self.k).decrypt(_nonce(self.n), ciphertext, self.h)
        self.n += 1
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> Tuple[bytes, bytes]:
        return _hkdf(self.ck, b"")


class ClientHandshake:
    """The initiator between its two handshake messages."""

    def __init__(self, server_x25519_public: bytes):
        if len(server_x25519_public) != 32:
            raise HandshakeError("the server's X25519 key must be 32 bytes")
        self._rs = bytes(server_x25519_public)
        self._s = _SymmetricState()
        self._e = X25519PrivateKey.generate()

    @classmethod
    def start(cls, server_x25519_public: bytes) -> Tuple["ClientHandshake", bytes]:
        """Returns the handshake and message 1 (-> e, es)."""
        hs = cls(server_x25519_public)
        s = hs._s
        s.mix_hash(PROLOGUE)
        s.mix_hash(hs._rs)
        e_pub = hs._e.public_key().public_bytes_raw()
        s.mix_hash(e_pub)
        s.mix_key(_dh(hs._e, hs._rs))
        return hs, e_pub + s.encrypt_and_hash(b"")

    def finish(self, message2: bytes) -> "ClientSession":
        """Reads message 2 (<- e, ee) and returns the session."""
        if len(message2) != HANDSHAKE_LEN:
            raise HandshakeError(f"message 2 is {len(message2)} bytes, not {HANDSHAKE_LEN}")
        s = self._s
        re = bytes(message2[:32])
        s.mix_hash(re)
        s.mix_key(_dh(self._e, re))
        try:
            s.decrypt_and_hash(bytes(message2[32:]))
        except InvalidTag:
            raise HandshakeError("message 2 does not authenticate: it was tampered with or does not answer "
                                 "message 1") from None
        send, recv = s.split()
        return ClientSession(send, recv)


class ClientSession:
    """Seals requests and opens records; any failure to open ends it."""

    def __init__(self, send_key: bytes, recv_key: bytes):
        self._send = ChaCha20Poly1305(send_key)
        self._recv = ChaCha20Poly1305(recv_key)
        self.send_nonce = 0
        self.recv_nonce = 0
        self.broken: Optional[str] = None
        # A sealed request whose answer has not ended (no done or error record opened yet): records
        # are numbered per session, so a daemon that withheld one answer could pass it off as the next.
        self.answer_pending = False

    def seal_request(self, request: "ChatRequest") -> bytes:
        """The request as concatenated Noise transport messages."""
        if self.broken:
            raise BrokenSessionError(f"the session is broken by an earlier failure: {self.broken}")
        if self.answer_pending:
            raise BrokenSessionError("the previous request's answer was not read to its end (done or error "
                                     "record); open a new session")
        plain = encode_request(request)
        pieces = [plain[i:i + MAX_NOISE_PAYLOAD] for i in range(0, len(plain), MAX_NOISE_PAYLOAD)]
        if self.send_nonce + len(pieces) >= 2**64:
            raise E2eError("the session's nonces are exhausted; open a new session")
        out = b"".join(self._send.encrypt(_nonce(self.send_nonce + i), bytes(p), None) for i, p in enumerate(pieces))
        self.send_nonce += len(pieces)
        self.answer_pending = True
        return out

    def open_record(self, message: bytes) -> "Record":
        """Opens the next record."""
        if self.broken:
            raise BrokenSessionError(f"the session is broken by an earlier failure: {self.broken}")
        try:
            record = self._open(bytes(message))
        except E2eError as e:
            self.broken = str(e)
            raise
        if not isinstance(record, Text):
            self.answer_pending = False
        return record

    def _open(self, message: bytes) -> "Record":
        if len(message) > MAX_NOISE_MESSAGE:
            raise TooLargeError(f"a record message of {len(message)} bytes is over {MAX_NOISE_MESSAGE} bytes")
        if len(message) < TAG_LEN + RECORD_PADDING or (len(message) - TAG_LEN) % RECORD_PADDING:
            raise TruncatedError(f"a record message of {len(message)} bytes is truncated or extended: its length "
                                 "is not a padded record's plus the 16-byte tag")
        if self.recv_nonce >= 2**64 - 1:
            raise E2eError("the session's nonces are exhausted; open a new session")
        try:
            plain = self._recv.decrypt(_nonce(self.recv_nonce), message, None)
        except InvalidTag:
            raise DecryptError(f"a record does not decrypt at the expected nonce {self.recv_nonce}: it was "
                               "tampered with, replayed, reordered or dropped (the session is ended; open a new "
                               "one)") from None
        self.recv_nonce += 1
        return decode_record(plain)


# ---- Plaintext layouts ----------------------------------------------------------------------

@dataclass
class Sampling:
    """The daemon's defaults (temperature 0 is greedy)."""
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int = 0


@dataclass
class ChatRequest:
    model: str
    messages: List[Tuple[str, str]]  # (role, content)
    max_tokens: int = 0  # 0: DEFAULT_MAX_TOKENS
    sampling: Sampling = field(default_factory=Sampling)
    stop: List[str] = field(default_factory=list)


@dataclass
class Text:
    text: str


@dataclass
class Done:
    stop: str  # one of STOP_REASONS
    prompt_tokens: int
    generated_tokens: int
    prefill_micros: int
    decode_micros: int


@dataclass
class ErrorRecord:
    code: int
    message: str


Record = Union[Text, Done, ErrorRecord]


def _int(value: int, bits: int, name: str) -> int:
    if not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise ValueError(f"{name} must be an integer in [0, 2^{bits})")
    return value


def _f32(value: float, name: str) -> bytes:
    try:
        return struct.pack("<f", float(value))
    except (OverflowError, ValueError, TypeError):
        raise ValueError(f"{name} must be a 32-bit float") from None


def _str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<I", len(b)) + b


def _frame(body: bytes, bucket: int) -> bytearray:
    plain = bytearray(struct.pack("<I", len(body)) + body)
    plain.extend(b"\x00" * (-len(plain) % bucket))
    return plain


def encode_request(r: ChatRequest) -> bytearray:
    """The padded plaintext of a request."""
    s = r.sampling
    parts = [bytes([REQUEST_VERSION]), _str(r.model), struct.pack("<I", _int(r.max_tokens, 32, "max_tokens")),
             _f32(s.temperature, "temperature"), struct.pack("<I", _int(s.top_k, 32, "top_k")),
             _f32(s.top_p, "top_p"), _f32(s.min_p, "min_p"), _f32(s.repeat_penalty, "repeat_penalty"),
             struct.pack("<IQ", _int(s.repeat_last_n, 32, "repeat_last_n"), _int(s.seed, 64, "seed")),
             struct.pack("<I", len(r.stop))]
    parts += [_str(x) for x in r.stop]
    parts.append(struct.pack("<I", len(r.messages)))
    for role, content in r.messages:
        parts += [_str(role), _str(content)]
    body = b"".join(parts)
    padded = -(-(len(body) + 4) // REQUEST_PADDING) * REQUEST_PADDING
    if padded > MAX_REQUEST_PLAINTEXT:
        raise TooLargeError(f"a request of {len(body) + 4} bytes is over MAX_REQUEST_PLAINTEXT "
                            f"({MAX_REQUEST_PLAINTEXT} bytes)")
    return _frame(body, REQUEST_PADDING)


def encode_record(record: Record) -> bytearray:
    """The padded plaintext of a record (the secure world's side; for tests)."""
    if isinstance(record, Text):
        body = bytes([KIND_TEXT]) + _str(record.text)
    elif isinstance(record, Done):
        body = bytes([KIND_DONE, STOP_REASONS.index(record.stop)]) + struct.pack(
            "<IIQQ", record.prompt_tokens, record.generated_tokens, record.prefill_micros, record.decode_micros)
    else:
        body = bytes([KIND_ERROR]) + struct.pack("<H", record.code) + _str(record.message)
    return _frame(body, RECORD_PADDING)


def _unframe(plain: bytes, bucket: int, what: str) -> memoryview:
    def truncated(reason):
        return TruncatedError(f"{what} of {len(plain)} bytes is truncated or extended: {reason}")
    if len(plain) < 4:
        raise truncated("it is shorter than its body length field")
    (body_len,) = struct.unpack_from("<I", plain)
    if body_len > len(plain) - 4:
        raise truncated("it ends before the body length it gives")
    if -(-(body_len + 4) // bucket) * bucket != len(plain):
        raise truncated("its padded length is not the one its body length gives")
    if any(plain[4 + body_len:]):
        raise MalformedError("malformed padding: a padding byte is not zero")
    return memoryview(plain)[4:4 + body_len]


class _Reader:
    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def take(self, n: int, name: str) -> bytes:
        left = len(self.buf) - self.pos
        if n > left:
            raise MalformedError(f"malformed {name}: needs {n} bytes, the body has {left} left")
        self.pos += n
        return bytes(self.buf[self.pos - n:self.pos])

    def unpack(self, fmt: str, name: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), name))

    def string(self, name: str) -> str:
        (n,) = self.unpack("<I", name)
        try:
            return self.take(n, name).decode("utf-8")
        except UnicodeDecodeError as e:
            raise MalformedError(f"malformed {name}: not UTF-8 at byte {e.start}") from None

    def count(self, item_bytes: int, name: str) -> int:
        (n,) = self.unpack("<I", name)
        if n * item_bytes > len(self.buf) - self.pos:
            raise MalformedError(f"malformed {name}: {n} items cannot fit in the bytes left")
        return n

    def end(self, what: str) -> None:
        if self.pos != len(self.buf):
            raise MalformedError(f"malformed {what}: {len(self.buf) - self.pos} bytes follow its last field")


def decode_request(plain: bytes) -> ChatRequest:
    """A request from its padded plaintext (the secure world's side; for tests)."""
    r = _Reader(_unframe(plain, REQUEST_PADDING, "a request's plaintext"))
    (version,) = r.unpack("<B", "request.version")
    if version != REQUEST_VERSION:
        raise E2eError(f"unknown request version {version} (this side speaks version 1)")
    model = r.string("request.model")
    (max_tokens, t, k, p, m, rp, rn, seed) = r.unpack("<IfIfffIQ", "request.sampling")
    stop = [r.string("request.stop") for _ in range(r.count(4, "request.stop"))]
    messages = [(r.string("request.messages.role"), r.string("request.messages.content"))
                for _ in range(r.count(8, "request.messages"))]
    r.end("request")
    return ChatRequest(model, messages, max_tokens, Sampling(t, k, p, m, rp, rn, seed), stop)


def decode_record(plain: bytes) -> Record:
    """A record from its padded plaintext."""
    r = _Reader(_unframe(plain, RECORD_PADDING, "a record's plaintext"))
    (kind,) = r.unpack("<B", "record.kind")
    if kind == KIND_TEXT:
        record: Record = Text(r.string("record.text"))
    elif kind == KIND_DONE:
        (reason,) = r.unpack("<B", "done.stop_reason")
        if reason >= len(STOP_REASONS):
            raise MalformedError(f"malformed done.stop_reason: unknown stop reason {reason} (known: 0 to 3)")
        record = Done(STOP_REASONS[reason], *r.unpack("<IIQQ", "done"))
    elif kind == KIND_ERROR:
        (code,) = r.unpack("<H", "error.code")
        record = ErrorRecord(code, r.string("error.message"))
    else:
        raise E2eError(f"unknown record kind {kind} (known: 1 text, 2 done, 3 error)")
    r.end("record")
    return record


# ---- Identity and HTTP ----------------------------------------------------------------------

def verify_identity(report_json: str, signature_hex: str, expect_ed25519_hex: Optional[str] = None) -> dict:
    """Checks the report's Ed25519 signature with its own identity_ed25519 key (which must be
    expect_ed25519_hex when given) and returns the parsed report (identity_x25519 is hex)."""
    try:
        report = json.loads(report_json)
        key_hex = report["identity_ed25519"]
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(key_hex))
        signature = bytes.fromhex(signature_hex)
        if len(bytes.fromhex(report["identity_x25519"])) != 32:
            raise ValueError("identity_x25519 is not 32 bytes")
    except (ValueError, KeyError, TypeError) as e:
        raise IdentityError(f"the identity report is malformed: {e}") from None
    if expect_ed25519_hex is not None and key_hex.lower() != expect_ed25519_hex.lower():
        raise IdentityError(f"the secure world's identity key {key_hex} is not the expected {expect_ed25519_hex}")
    try:
        key.verify(signature, report_json.encode("utf-8"))
    except InvalidSignature:
        raise IdentityError("the identity report's signature does not verify") from None
    return report


class Session:
    """An open encrypted session: its id, model and keys."""

    def __init__(self, session_id: str, model: str, noise: ClientSession):
        self.id, self.model, self.noise = session_id, model, noise
        self.last_done: Optional[Done] = None


class Client:
    """An HTTP client of the daemon's /v1/secure endpoints."""

    def __init__(self, base_url: str, api_key: Optional[str] = None, expect_ed25519: Optional[str] = None,
                 timeout: float = 600.0):
        self.base_url = base_url.rstrip("/")
        self.api_key, self.expect_ed25519, self.timeout = api_key, expect_ed25519, timeout
        self._x25519: Optional[bytes] = None

    def _request(self, method: str, path: str, body: Optional[dict] = None):
        headers = {"Accept": "application/json, text/event-stream"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            text = e.read().decode("utf-8", "replace")
            try:
                text = json.loads(text)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            raise HTTPError(e.code, text) from None

    def _json(self, method: str, path: str, body: Optional[dict] = None) -> dict:
        with self._request(method, path, body) as resp:
            return json.loads(resp.read() or b"{}")

    def identity(self) -> dict:
        """The verified identity report; pins its Ed25519 key on first use."""
        d = self._json("GET", "/v1/secure/identity")
        report = verify_identity(d["report"], d["signature"], self.expect_ed25519)
        self.expect_ed25519 = report["identity_ed25519"]
        self._x25519 = bytes.fromhex(report["identity_x25519"])
        return report

    def open_session(self, model: str) -> Session:
        """Handshakes with the secure world through the daemon."""
        if self._x25519 is None:
            self.identity()
        hs, message1 = ClientHandshake.start(self._x25519)
        d = self._json("POST", "/v1/secure/sessions",
                       {"model": model, "handshake": base64.b64encode(message1).decode()})
        noise = hs.finish(base64.b64decode(d["handshake"], validate=True))
        return Session(d["session"], d.get("model", model), noise)

    def chat(self, session: Session, messages, max_tokens: int = 0, temperature: float = 0.8, top_k: int = 40,
             top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0, repeat_last_n: int = 64,
             seed: int = 0, stop: Optional[List[str]] = None) -> Iterator[str]:
        """Yields the answer's text pieces; ends after the done record (kept in session.last_done).
        messages: dicts with "role" and "content", or (role, content) pairs. Read the answer to its
        end: records left unread put the session out of step (open a new one)."""
        pairs = [(m["role"], m["content"]) if isinstance(m, dict) else (m[0], m[1]) for m in messages]
        request = ChatRequest(session.model, pairs, max_tokens,
                              Sampling(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed),
                              list(stop or []))
        message = session.noise.seal_request(request)
        session.last_done = None
        with self._request("POST", f"/v1/secure/sessions/{session.id}/chat",
                           {"message": base64.b64encode(message).decode()}) as resp:
            for event, data in _sse_events(resp):
                if event == "error":
                    try:
                        text = json.loads(data)["error"]["message"]
                    except (ValueError, KeyError, TypeError):
                        text = data
                    raise E2eError(f"the daemon ended the answer: {text}")
                record = session.noise.open_record(base64.b64decode(data, validate=True))
                if isinstance(record, Text):
                    yield record.text
                elif isinstance(record, Done):
                    session.last_done = record
                    return
                else:
                    raise RecordError(record.code, record.message)
        raise TruncatedStreamError("the answer's stream ended without a done or error record: it was truncated")

    def close(self, session: Session) -> None:
        """Ends the session."""
        with self._request("DELETE", f"/v1/secure/sessions/{session.id}") as resp:
            resp.read()


def _sse_events(resp) -> Iterator[Tuple[str, str]]:
    """(event, data) for each server-sent event; an event cut off at the end is dropped."""
    event, data = "message", []
    for raw in resp:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
