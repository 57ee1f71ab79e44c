#!/usr/bin/env python3
"""An independent HBONE peer for ringtun's interop tests: HTTP/2 CONNECT over mutual TLS 1.3
(ALPN h2) with the Python `h2` package (Debian: python3-h2) and the standard `ssl` module.

client mode
    Connects to --connect, checks the server's certificate chains to --ca and carries exactly
    one URI SAN equal to --expect-identity (mesh servers are named by SPIFFE identity, not by
    host name, so the ssl module's host-name check is off), sends a classic CONNECT
    (`:method CONNECT`, `:authority --authority`, no :scheme/:path), prints the response. On 200
    it sends --bytes pattern bytes (the same xorshift64* stream as ringtun::testbed::Pattern),
    ends its stream, reads the peer's stream to END_STREAM, and prints one JSON line:
        {"status": 200, "sent": N, "sent_sha256": hex, "received": N, "received_sha256": hex,
         "end": "end_stream"|"reset:<code>", "alpn": "h2", "tls": "TLSv1.3",
         "server_identity": uri}
    Any other status prints {"status": S, ...} and exits 0: the calling test judges.
    A failed TCP connect prints {"error": "connect", ...}, a TLS failure (including a server
    identity other than --expect-identity) {"error": "tls", ...}; both exit 2.

server mode
    Listens on --listen with --cert/--key, requires a client certificate chaining to --ca,
    answers every CONNECT with 200 and echoes each DATA byte back on the same stream; when the
    peer ends its stream, ends ours once the echo is flushed. Prints {"listening": addr} once
    ready, then one JSON line per stream:
        {"authority": a, "method": m, "pseudo": [names], "forwarded": f|null,
         "bytes": N, "sha256": hex, "end": "end_stream"|"reset:<code>",
         "client_identity": uri}
    Several streams per connection and several connections (one thread each).

Flow control is honoured both ways: received data is acknowledged so windows reopen, and data
is sent only within the peer's windows and frame size. Every wait has a deadline (--timeout).
"""

import argparse
import array
import hashlib
import json
import select
import socket
import ssl
import sys
import threading
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

MASK = (1 << 64) - 1
WINDOW = 1 << 20  # stream window we advertise
CONN_WINDOW = 4 << 20  # connection window we advertise
print_lock = threading.Lock()


def emit(obj):
    with print_lock:
        sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
        sys.stdout.flush()


def log(msg):
    with print_lock:
        sys.stderr.write("h2_connect: %s\n" % msg)
        sys.stderr.flush()


class Pattern:
    """ringtun::testbed::Pattern: xorshift64*, 8 little-endian bytes per step."""

    def __init__(self, seed):
        self.state = ((seed * 0x9E3779B97F4A7C15) & MASK) | 1

    def take(self, n):
        """The next n bytes (n a multiple of 8 except for the last call)."""
        words = (n + 7) // 8
        s = self.state
        out = [0] * words
        for i in range(words):
            s ^= s >> 12
            s ^= (s << 25) & MASK
            s ^= s >> 27
            out[i] = (s * 0x2545F4914F6CDD1D) & MASK
        self.state = s
        a = array.array("Q", out)
        if sys.byteorder != "little":
            a.byteswap()
        return a.tobytes()[:n]


def hostport(text):
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError("expected ip:port, got %r" % text)
    return host, int(port)


def uri_sans(cert):
    return [v for (k, v) in (cert or {}).get("subjectAltName", ()) if k == "URI"]


class TlsH2:
    """One TLS connection driven by a non-blocking select loop, with an h2 state machine.
    The ssl module is not safe for concurrent reads and writes from two threads, so one loop
    does both; bytes h2 wants sent wait in `out` until the socket takes them."""

    def __init__(self, sock, conn, deadline):
        self.sock = sock
        self.conn = conn
        self.deadline = deadline
        self.out = bytearray()
        self.chunk = None  # a write the ssl layer asked us to retry unchanged
        self.eof = False
        sock.setblocking(False)

    def flush_h2(self):
        data = self.conn.data_to_send()
        if data:
            self.out += data

    def _write(self):
        while self.out or self.chunk:
            if self.chunk is None:
                self.chunk = bytes(self.out[:65536])
                del self.out[:len(self.chunk)]
            try:
                n = self.sock.send(self.chunk)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                return
            self.chunk = self.chunk[n:] if n < len(self.chunk) else None

    def _read(self):
        events = []
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                return events
            except ssl.SSLZeroReturnError:
                data = b""
            if not data:
                self.eof = True
                return events
            events.extend(self.conn.receive_data(data))
            self.flush_h2()

    def step(self, max_wait=1.0):
        """Writes what it can, waits for the socket, returns the h2 events read."""
        self.flush_h2()
        self._write()
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        if self.sock.pending():
            r = [self.sock]
        else:
            want_w = [self.sock] if (self.out or self.chunk) else []
            r, _, _ = select.select([self.sock], want_w, [], min(left, max_wait))
        events = self._read() if r else []
        self.flush_h2()
        self._write()
        return events


class Sender:
    """Queued bytes for one stream, sent only within the peer's windows and frame size."""

    def __init__(self, conn, stream_id):
        self.conn = conn
        self.stream_id = stream_id
        self.buf = bytearray()
        self.end_wanted = False
        self.ended = False

    def pump(self):
        while self.buf:
            try:
                room = min(
                    self.conn.local_flow_control_window(self.stream_id),
                    self.conn.max_outbound_frame_size,
                    len(self.buf),
                )
            except Exception:  # stream closed (reset) meanwhile
                self.buf.clear()
                return
            if room <= 0:
                return
            self.conn.send_data(self.stream_id, bytes(self.buf[:room]))
            del self.buf[:room]
        if self.end_wanted and not self.ended:
            self.ended = True
            try:
                self.conn.end_stream(self.stream_id)
            except h2.exceptions.StreamClosedError:
                pass  # reset by the peer meanwhile


def check_tls(tls, expect_identity):
    """Returns the peer's single URI SAN; raises if the session is not HBONE-shaped."""
    if tls.version() != "TLSv1.3":
        raise ssl.SSLError("negotiated %s, not TLSv1.3" % tls.version())
    if tls.selected_alpn_protocol() != "h2":
        raise ssl.SSLError("ALPN %r, not h2" % tls.selected_alpn_protocol())
    uris = uri_sans(tls.getpeercert())
    if len(uris) != 1:
        raise ssl.SSLError("peer certificate has %d URI SANs: %r" % (len(uris), uris))
    if expect_identity is not None and uris[0] != expect_identity:
        raise ssl.SSLError("peer is %s, expected %s" % (uris[0], expect_identity))
    return uris[0]


def open_windows(conn):
    conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW})
    conn.increment_flow_control_window(CONN_WINDOW - 65535)


# ---------------------------------------------------------------- client


def run_client(args):
    deadline = time.monotonic() + args.timeout
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # identities are SPIFFE URIs, checked below
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=args.ca)
    ctx.load_cert_chain(args.cert, args.key)
    ctx.set_alpn_protocols(["h2"])

    try:
        raw = socket.create_connection(hostport(args.connect), timeout=min(args.timeout, 10))
    except OSError as e:
        emit({"error": "connect", "detail": str(e)})
        return 2
    raw.settimeout(max(deadline - time.monotonic(), 1))
    try:
        tls = ctx.wrap_socket(raw)
        identity = check_tls(tls, args.expect_identity)
    except (ssl.SSLError, OSError) as e:
        emit({"error": "tls", "detail": str(e)})
        return 2

    # A classic CONNECT has no :scheme or :path (RFC 9113 §8.5); h2 4.x's outbound header
    # validation insists on them for every request, so it is off for our own headers.
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, validate_outbound_headers=False)
    )
    conn.initiate_connection()
    open_windows(conn)
    io = TlsH2(tls, conn, deadline)
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(":method", "CONNECT"), (":authority", args.authority)])

    status = None
    headers = {}
    sender = Sender(conn, sid)
    pattern = Pattern(args.seed)
    to_make = args.bytes
    sent = 0
    sent_h = hashlib.sha256()
    received = 0
    recv_h = hashlib.sha256()
    end = None
    try:
        while end is None:
            if status == 200:
                # Keep at most a window's worth queued; make more as it drains.
                while to_make > 0 and len(sender.buf) < WINDOW:
                    n = min(to_make, 256 * 1024)
                    chunk = pattern.take(n)
                    sent_h.update(chunk)
                    sender.buf += chunk
                    sent += n
                    to_make -= n
                if to_make == 0:
                    sender.end_wanted = True
                sender.pump()
            for ev in io.step():
                if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                    headers = {k.decode(): v.decode() for k, v in ev.headers}
                    status = int(headers.get(":status", "0"))
                    if status != 200:
                        end = "status"
                elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                    received += len(ev.data)
                    recv_h.update(ev.data)
                    conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                    if status is not None:
                        end = "end_stream"
                elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                    end = "reset:%d" % int(ev.error_code)
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    end = "goaway:%d" % int(ev.error_code)
            if io.eof and end is None:
                end = "eof"
        # Let a final WINDOW_UPDATE or RST go out, then close politely.
        conn.close_connection()
        io.flush_h2()
        io._write()
    except TimeoutError:
        end = "timeout"
    except Exception as e:  # a protocol error is a result the test judges
        end = "error:%s: %s" % (type(e).__name__, e)

    result = {
        "status": status,
        "end": end,
        "alpn": tls.selected_alpn_protocol(),
        "tls": tls.version(),
        "server_identity": identity,
    }
    if status == 200:
        result.update(
            sent=sent,
            sent_sha256=sent_h.hexdigest(),
            received=received,
            received_sha256=recv_h.hexdigest(),
        )
    emit(result)
    try:
        tls.close()
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------- server


class EchoStream:
    def __init__(self, conn, stream_id, headers, identity):
        self.sender = Sender(conn, stream_id)
        self.headers = headers
        self.identity = identity
        self.bytes = 0
        self.hash = hashlib.sha256()
        self.reported = False

    def report(self, end):
        if self.reported:
            return
        self.reported = True
        pseudo = [k for k, _ in self.headers if k.startswith(":")]
        h = dict(self.headers)
        emit(
            {
                "authority": h.get(":authority"),
                "method": h.get(":method"),
                "pseudo": pseudo,
                "forwarded": h.get("forwarded"),
                "bytes": self.bytes,
                "sha256": self.hash.hexdigest(),
                "end": end,
                "client_identity": self.identity,
            }
        )


def serve_connection(tls, args):
    try:
        identity = check_tls(tls, None)
    except ssl.SSLError as e:
        log("refused connection: %s" % e)
        tls.close()
        return
    # Inbound validation would demand :scheme and :path, which a classic CONNECT must not
    # carry; the headers are reported instead, for the test to judge.
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, validate_inbound_headers=False)
    )
    conn.initiate_connection()
    open_windows(conn)
    io = TlsH2(tls, conn, time.monotonic() + args.timeout)
    streams = {}
    try:
        while not io.eof:
            for s in streams.values():
                s.sender.pump()
            for ev in io.step():
                if isinstance(ev, h2.events.RequestReceived):
                    hdrs = [(k.decode(), v.decode()) for k, v in ev.headers]
                    s = EchoStream(conn, ev.stream_id, hdrs, identity)
                    streams[ev.stream_id] = s
                    if dict(hdrs).get(":method") == "CONNECT":
                        conn.send_headers(ev.stream_id, [(":status", "200")])
                    else:
                        conn.send_headers(ev.stream_id, [(":status", "400")], end_stream=True)
                        s.report("rejected")
                    if ev.stream_ended:
                        s.sender.end_wanted = True
                elif isinstance(ev, h2.events.DataReceived):
                    s = streams.get(ev.stream_id)
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    if s is not None and not s.reported:
                        s.bytes += len(ev.data)
                        s.hash.update(ev.data)
                        s.sender.buf += ev.data
                elif isinstance(ev, h2.events.StreamEnded):
                    s = streams.get(ev.stream_id)
                    if s is not None:
                        s.sender.end_wanted = True
                elif isinstance(ev, h2.events.StreamReset):
                    s = streams.get(ev.stream_id)
                    if s is not None:
                        s.sender.buf.clear()
                        s.report("reset:%d" % int(ev.error_code))
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    io.eof = True
            for s in streams.values():
                s.sender.pump()
                if s.sender.ended and not s.sender.buf:
                    s.report("end_stream")
    except TimeoutError:
        log("connection timed out")
    except Exception as e:
        log("connection error: %s: %s" % (type(e).__name__, e))
    finally:
        for s in streams.values():
            s.report("connection_closed")
        try:
            tls.close()
        except OSError:
            pass


def run_server(args):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=args.ca)
    ctx.load_cert_chain(args.cert, args.key)
    ctx.set_alpn_protocols(["h2"])

    host, port = hostport(args.listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    lsock = socket.socket(family, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((host, port))
    lsock.listen(64)
    lsock.settimeout(1.0)
    emit({"listening": "%s:%d" % (host, port)})
    stop = time.monotonic() + args.timeout
    while time.monotonic() < stop:
        try:
            raw, peer = lsock.accept()
        except socket.timeout:
            continue
        raw.settimeout(10)
        try:
            tls = ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as e:
            log("handshake with %s failed: %s" % (peer, e))
            raw.close()
            continue
        threading.Thread(target=serve_connection, args=(tls, args), daemon=True).start()
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("mode", choices=["client", "server"])
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--connect", help="client: ip:port to connect to")
    p.add_argument("--authority", help="client: the CONNECT :authority")
    p.add_argument("--expect-identity", help="client: the server's SPIFFE URI SAN")
    p.add_argument("--bytes", type=int, default=1 << 20)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--listen", help="server: ip:port")
    p.add_argument("--timeout", type=float, default=60.0, help="overall deadline, seconds")
    args = p.parse_args()
    if args.mode == "client":
        if not (args.connect and args.authority and args.expect_identity):
            p.error("client needs --connect, --authority and --expect-identity")
        return run_client(args)
    if not args.listen:
        p.error("server needs --listen")
    return run_server(args)


if __name__ == "__main__":
    sys.exit(main())
