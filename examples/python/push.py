"""Push a message to a user through imgate's gRPC API.

    python3 examples/python/push.py --user bob --text "hello from the backend"
"""
import argparse
import json

import grpc

from imgate_stubs import pb, rpc


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--target", default="127.0.0.1:50051", help="imgate's gRPC listener")
    p.add_argument("--key", default="dev-key", help="an api key from grpc.api_keys")
    p.add_argument("--user", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--transient", action="store_true", help="only to devices connected now")
    args = p.parse_args()

    with grpc.insecure_channel(args.target) as channel:
        gateway = rpc.GatewayStub(channel)
        result = gateway.PushToUser(
            pb.PushToUserRequest(
                user_id=args.user,
                message=pb.Message(kind="text", body=json.dumps({"text": args.text}).encode(), **{"from": "backend"}),
                delivery=pb.DELIVERY_TRANSIENT if args.transient else pb.DELIVERY_DURABLE,
            ),
            metadata=[("authorization", "Bearer " + args.key)],
            timeout=5,
        )
        print(f"online={result.online} delivered={result.delivered} seq={result.seq} epoch={result.epoch} id={result.message_id}")


if __name__ == "__main__":
    main()
