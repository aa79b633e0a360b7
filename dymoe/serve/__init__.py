"""``dymoe serve``: an OpenAI-compatible HTTP server for one bundle on the device.

The pieces, one concept each: ``options`` (defaults, declared once), ``errors`` (the OpenAI
error shape), ``protocol`` (request fields in, response objects out), ``prepare`` (a request
to prompt token ids: chat template, tokenizer, limits), ``worker`` (the one thread that owns
the model and its bounded queue), ``metrics`` (Prometheus text), ``app`` (the ASGI app:
routes, auth, body limits, streaming, disconnects) and ``server`` (socket, uvicorn, signals).
uvicorn and jinja2 come with the ``serve`` extra and are imported only when a server starts.
"""
