"""imgserve: an image-classification service over Redis.

Layers, each importing only those below it:

    client/     simple_request and stress_test: talk HTTP to the web API (import nothing else here)
    launch/     serve (`make run`), stack (starting workers and gunicorn), proxy (nginx), local_redis
    web/        the Flask app: app factory, views, uploads, security, metrics, the page and openapi.yaml
    worker/     the model worker: cli, pipeline (claim, decode, infer, publish), model
    protocol/   the Redis protocol between web and worker: keys, jobs, scripts, queue, claim, listener
    imaging/    pixels: preparing uploads (Pillow), packing them into jobs (codecs)
    settings, logger    read by every layer

The mission's entry points stay at the top of the project: run_web_server.py, run_model_server.py,
simple_request.py, stress_test.py (and settings.py, helpers.py, logger.py re-export their modules).
"""
