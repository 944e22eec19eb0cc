"""The ceiling for bench/ingest.py: the same Flask stack doing nothing."""

from flask import Flask, Response

app = Flask(__name__)


@app.post("/track")
def track() -> Response:
    return Response(status=202)
