"""`python -m captioning serve`: a model behind HTTP (FastAPI + uvicorn, the `[serve]` extra).

load.py      the one place the served model is loaded (`load`)
settings.py  the server's options (`ServeSettings`), the ones `serve`'s flags set
options.py   a request's decoding options, checked (422 naming the option) -> Captioner keywords
inputs.py    a request's image: raw bytes, multipart or JSON (base64 or a URL), under the size cap
batcher.py   micro-batching: one worker thread owns the model; a bounded queue; compatible options
service.py   a request -> an opened image -> the batcher -> the answer's JSON
metrics.py   Prometheus counters and histograms, and the middleware that counts requests
app.py       the FastAPI app: POST / (Hugging Face image-to-text), POST /v1/caption, the page,
             /health, /ready, /metrics, /v1/info
server.py    uvicorn around the app; SIGTERM answers what is in flight, then exits 0
static/      the web page: index.html, page.css, page.js (no build step, nothing from other hosts)

Nothing here imports fastapi at package import time: `captioning` and its CLI start without it.
"""
