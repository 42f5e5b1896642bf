"""A minimal chat backend for imgate (upstream.mode = "grpc").

imgate calls HandleMessage for every client `send`; this backend checks it, delivers it to
the addressee with the Gateway API (a durable PushToUser, so offline users get it later) and
answers the sender with the message's seq. OnStatusChange tells it who comes and goes.

    python3 examples/python/backend.py --port 7000 --gateway 127.0.0.1:50051
    IMGATE__UPSTREAM__MODE=grpc IMGATE__UPSTREAM__ENDPOINT=http://127.0.0.1:7000 imgate serve

With --port 0 it prints the port it bound and, with no --gateway, reads the gateway address
from its standard input (the tests start it that way).
"""
import argparse
import json
import sys
from concurrent import futures

import grpc

from imgate_stubs import pb, rpc


class Backend(rpc.BusinessServicer):
    def __init__(self, gateway, key):
        self.gateway = gateway
        self.auth = [("authorization", "Bearer " + key)]

    def HandleMessage(self, request, context):
        if not request.to_user_id:
            return pb.ClientReply(ok=False, code="unsupported", message="this backend only does direct messages")
        body = json.loads(request.body or b"null")
        if isinstance(body, dict) and len(body.get("text", "")) > 1000:
            return pb.ClientReply(ok=False, code="too_long", message="at most 1000 characters")
        result = self.gateway.PushToUser(
            pb.PushToUserRequest(
                user_id=request.to_user_id,
                # The client's request id makes the push idempotent if the client retries.
                message=pb.Message(id=f"{request.user_id}:{request.session_id}:{request.request_id}",
                                   kind=request.kind, body=request.body, **{"from": request.user_id}),
            ),
            metadata=self.auth,
            timeout=3,
        )
        return pb.ClientReply(ok=True, body=json.dumps({"seq": result.seq, "online": result.online}).encode())

    def OnStatusChange(self, request, context):
        for c in request.changes:
            print(f"status {c.user_id} {c.device_id} {'online' if c.online else 'offline'} via {c.transport}", flush=True)
        return pb.StatusChangeAck()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=7000)
    p.add_argument("--gateway", help="imgate's gRPC listener (default: read from stdin)")
    p.add_argument("--key", default="dev-key")
    args = p.parse_args()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    print(f"listening {port}", flush=True)
    gateway_addr = args.gateway or sys.stdin.readline().strip()
    gateway = rpc.GatewayStub(grpc.insecure_channel(gateway_addr))
    rpc.add_BusinessServicer_to_server(Backend(gateway, args.key), server)
    server.start()
    server.wait_for_termination()


if __name__ == "__main__":
    main()
