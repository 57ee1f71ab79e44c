#!/usr/bin/env python3
"""An independent fake istiod for ringtun's delta ADS client: Debian's grpcio and protobuf,
messages built at run time from the schema (a FileDescriptorSet file, no generated code).

Usage: fake_istiod.py DESCRIPTORS

Prints "port N" once it listens on 127.0.0.1, then plays one script over two streams and
prints "PASS <summary>" or "FAIL <why>" and exits 0 or 1:

stream 1: the two opening requests (wildcard, a ztunnel Node, bearer token and clusterid
headers); an Address push of w1, w2 and an unreadable w-bad -> a NACK naming w-bad only; an
Authorization push of ns/allow-a -> an ACK; w2 removed -> an ACK; then the stream is ended
(as istiod ends streams every ~30 minutes).
stream 2: the opening requests declare w1 at its version (not w-bad, not w2); w1 removed
while "disconnected" -> an ACK. Then PASS.
"""

import queue
import sys
import threading
from concurrent import futures

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

ADDRESS = "type.googleapis.com/istio.workload.Address"
AUTHZ = "type.googleapis.com/istio.security.Authorization"
SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
TIMEOUT = 10


def load_messages(path):
    fds = descriptor_pb2.FileDescriptorSet.FromString(open(path, "rb").read())
    pool = descriptor_pool.DescriptorPool()
    for f in fds.file:  # imports come first
        pool.Add(f)
    factory = message_factory.MessageFactory(pool)

    def cls(name):
        return factory.GetPrototype(pool.FindMessageTypeByName(name))

    return {
        "req": cls("envoy.service.discovery.v3.DeltaDiscoveryRequest"),
        "resp": cls("envoy.service.discovery.v3.DeltaDiscoveryResponse"),
        "address": cls("istio.workload.Address"),
        "authz": cls("istio.security.Authorization"),
    }


class Failed(Exception):
    pass


def check(cond, why):
    if not cond:
        raise Failed(why)


class Script:
    def __init__(self, m):
        self.m = m
        self.streams = 0
        self.done = threading.Event()
        self.result = "FAIL no stream opened"
        self.summary = []

    def workload(self, uid, address, version):
        a = self.m["address"]()
        w = a.workload
        w.uid = uid
        w.name = uid
        w.namespace = "ns"
        w.addresses.append(address)
        w.node = "node-a"
        w.tunnel_protocol = 1  # HBONE
        r = self.m["resp"]().resources.add()
        r.name = uid
        r.version = version
        r.resource.type_url = ADDRESS
        r.resource.value = a.SerializeToString()
        return r

    def push(self, type_url, nonce, resources=(), removed=()):
        p = self.m["resp"]()
        p.type_url = type_url
        p.nonce = nonce
        for r in resources:
            p.resources.add().CopyFrom(r)
        p.removed_resources.extend(removed)
        return p

    def handle(self, requests, context):
        """One stream: yields the pushes, reads the answers from `requests` on a thread."""
        self.streams += 1
        n = self.streams
        got = queue.Queue()

        def read():
            try:
                for r in requests:
                    got.put(r)
            except Exception:  # the stream ended
                pass

        threading.Thread(target=read, daemon=True).start()

        def answer(what):
            try:
                return got.get(timeout=TIMEOUT)
            except queue.Empty:
                raise Failed(f"stream {n}: no {what} within {TIMEOUT} s")

        try:
            headers = dict(context.invocation_metadata())
            opening = [answer("opening request") for _ in range(2)]
            check(
                sorted(r.type_url for r in opening) == sorted([ADDRESS, AUTHZ]),
                f"stream {n}: opening types {[r.type_url for r in opening]}",
            )
            for r in opening:
                check(len(r.resource_names_subscribe) == 0, "a wildcard subscription")
                check(r.node.id.startswith("ztunnel~"), f"node id {r.node.id!r}")
                check(r.node.metadata.fields["NODE_NAME"].string_value == "node-a", "NODE_NAME")
            check(headers.get("authorization") == "Bearer py-token", f"token header {headers.get('authorization')!r}")
            check(headers.get("clusterid") == "Kubernetes", f"clusterid header {headers.get('clusterid')!r}")
            addr = [r for r in opening if r.type_url == ADDRESS][0]
            versions = dict(addr.initial_resource_versions)
            if n == 1:
                check(versions == {}, f"stream 1 declares {versions}")
                yield self.push(
                    ADDRESS,
                    "a1",
                    [
                        self.workload("w1", bytes([10, 0, 0, 1]), "v1"),
                        self.workload("w-bad", bytes([10, 0, 0]), "v1"),
                        self.workload("w2", bytes([10, 0, 0, 2]), "v1"),
                    ],
                )
                nack = answer("NACK")
                check(nack.response_nonce == "a1", f"NACK nonce {nack.response_nonce!r}")
                check(nack.HasField("error_detail"), "a NACK for the unreadable workload")
                msg = nack.error_detail.message
                check(msg.startswith("w-bad: ") and "w1" not in msg and "w2" not in msg, f"NACK message {msg!r}")
                self.summary.append(f"NACK {msg!r}")

                p = self.m["authz"]()
                p.name = "allow-a"
                p.namespace = "ns"
                p.scope = 1  # NAMESPACE
                p.action = 0  # ALLOW
                p.groups.add().rules.add().matches.add().destination_ports.append(8080)
                res = self.m["resp"]().resources.add()
                res.name = "ns/allow-a"
                res.resource.type_url = AUTHZ
                res.resource.value = p.SerializeToString()
                yield self.push(AUTHZ, "p1", [res])
                ack = answer("policy ACK")
                check(ack.response_nonce == "p1" and not ack.HasField("error_detail"), f"policy ACK {ack}")

                yield self.push(ADDRESS, "a2", removed=["w2"])
                ack = answer("removal ACK")
                check(ack.response_nonce == "a2" and not ack.HasField("error_detail"), f"removal ACK {ack}")
                self.summary.append("stream 1 ended by the server")
                return  # ends the stream cleanly
            check(versions == {"w1": "v1"}, f"stream {n} declares {versions}, want w1 at v1 only")
            self.summary.append(f"stream {n} declared {versions}")
            yield self.push(ADDRESS, "a3", removed=["w1"])
            ack = answer("removal ACK")
            check(ack.response_nonce == "a3" and not ack.HasField("error_detail"), f"removal ACK {ack}")
            self.result = "PASS " + "; ".join(self.summary)
            self.done.set()
        except Failed as e:
            self.result = f"FAIL {e}"
            self.done.set()


def main():
    m = load_messages(sys.argv[1])
    script = Script(m)
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                script.handle,
                request_deserializer=m["req"].FromString,
                response_serializer=m["resp"].SerializeToString,
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"port {port}", flush=True)
    if not script.done.wait(30):
        script.result = f"FAIL timed out after {script.streams} stream(s): {script.summary}"
    print(script.result, flush=True)
    server.stop(0)
    sys.exit(0 if script.result.startswith("PASS") else 1)


if __name__ == "__main__":
    main()
