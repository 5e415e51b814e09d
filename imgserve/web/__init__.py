"""The web API: app.py (app factory and views), uploads.py, security.py, metrics.py, static/, openapi.yaml."""
