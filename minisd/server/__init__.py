"""`minisd serve`: an AUTOMATIC1111-compatible HTTP API, an OpenAI images endpoint and a web page.

`jobs` (the generation worker and its queue) and `models` (the checkpoint catalog) need no web framework, so
another host (Ray Serve, a batch runner) can drive them; `app.create_app` puts FastAPI in front of them."""
