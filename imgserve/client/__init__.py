"""HTTP clients of the web API: simple_request.py (one image) and stress_test.py (many threads)."""
