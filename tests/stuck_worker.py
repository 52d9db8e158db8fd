"""A stand-in worker that offers slots but never finishes priming a session: for the gateway's
answer-timeout and CANCEL-before-answer paths. Run: python -m tests.stuck_worker PORT"""

import asyncio
import sys

import uvicorn
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

app = FastAPI()


@app.get("/readyz")
async def readyz() -> dict:
    return {"ready": True, "free_slots": 2}


@app.get("/v1/info")
async def info() -> dict:
    return {"ready": True, "draining": False, "slots": 2, "worker_id": "stuck", "active_sessions": [],
            "cached_personas": []}


@app.websocket("/v1/sessions")
async def sessions(ws: WebSocket) -> None:
    await ws.accept()
    try:
        while True:  # reads the start message and audio, never answers "ready"
            await ws.receive()
    except (WebSocketDisconnect, RuntimeError, asyncio.CancelledError):
        pass


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
