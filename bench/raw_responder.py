"""The raw limit of this design: a bare nats-py responder doing one JetStream publish per request."""

from __future__ import annotations

import argparse
import asyncio
import json

import nats


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    args = parser.parse_args()
    nc = await nats.connect(args.url)
    js = nc.jetstream()
    await js.add_stream(name="RAW_WORK", subjects=["raw.work.>"], retention="workqueue", storage="file")
    tasks: set[asyncio.Task[None]] = set()

    async def handle(msg: nats.aio.msg.Msg) -> None:
        ack = await js.publish("raw.work.job", msg.data)
        await msg.respond(json.dumps({"seq": ack.seq}).encode())

    async def on_request(msg: nats.aio.msg.Msg) -> None:
        task = asyncio.create_task(handle(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    await nc.subscribe("raw.submit", queue="raw", cb=on_request)
    print("ready", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
