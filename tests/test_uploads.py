"""uploads.UploadRequest reads multipart bodies as Werkzeug's parser does, with python-multipart's."""

import io

import pytest
import requests
from flask import Request
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import FormDataParser
from werkzeug.test import EnvironBuilder

from imgserve.web.uploads import UploadRequest

pytestmark = pytest.mark.unit

JPEG_LIKE = bytes(range(256)) * 300 + b"\r\n--not-the-boundary\r\n" + b"\xff\xd9"


def client_body(files: dict, data: dict | None = None) -> tuple[bytes, str]:
    """The body and Content-Type that `requests` (and so simple_request.py) sends."""
    prepared = requests.Request("POST", "http://x/predict", files=files, data=data).prepare()
    return prepared.body, prepared.headers["Content-Type"]


def environ(body: bytes, content_type: str) -> dict:
    return EnvironBuilder(method="POST", input_stream=io.BytesIO(body), content_type=content_type,
                          content_length=len(body)).get_environ()  # fmt: skip


def parsed(request_class: type[Request], body: bytes, content_type: str, **limits: int) -> tuple[dict, dict]:
    request = request_class(environ(body, content_type))
    for name, value in limits.items():
        setattr(request, name, value)
    files = {name: (f.filename, f.mimetype, f.read()) for name, f in request.files.items(multi=True)}
    return files, dict(request.form.items(multi=True))


BODIES = {
    "one image": client_body({"image": ("castle.jpg", JPEG_LIKE, "image/jpeg")}),
    "empty image": client_body({"image": ("empty.jpg", b"", "image/jpeg")}),
    "image and fields": client_body({"image": ("a.png", JPEG_LIKE, "image/png")}, {"top_k": "3", "note": "é"}),
    "two files": client_body([("image", ("1.jpg", b"one", "image/jpeg")), ("image", ("2.jpg", b"two", "image/jpeg"))]),
    "utf-8 filename": client_body({"image": ("château.jpg", b"x", "image/jpeg")}),
}


@pytest.mark.parametrize("body, content_type", BODIES.values(), ids=BODIES.keys())
def test_client_bodies_parse_as_werkzeug_parses_them_without_werkzeug(monkeypatch, body, content_type):
    expected = parsed(Request, body, content_type)

    def werkzeug_parser(*_args):
        raise AssertionError("Werkzeug's multipart parser ran")

    monkeypatch.setattr(FormDataParser, "_parse_multipart", werkzeug_parser)
    assert parsed(UploadRequest, body, content_type) == expected


def test_a_body_python_multipart_cannot_read_goes_to_werkzeug():
    built = EnvironBuilder(method="POST", data={"image": (io.BytesIO(b""), "x.jpg")}).get_environ()
    body, content_type = built["wsgi.input"].read(), built["CONTENT_TYPE"]
    assert body.startswith(b"\r\n")  # Werkzeug's test client writes an empty part so
    assert parsed(UploadRequest, body, content_type) == parsed(Request, body, content_type)
    assert parsed(UploadRequest, body, content_type)[0]["image"] == ("x.jpg", "image/jpeg", b"")


def test_too_many_parts_is_413_as_with_werkzeug():
    body, content_type = client_body([("image", (f"{i}.jpg", b"x", "image/jpeg")) for i in range(5)])
    for request_class in (Request, UploadRequest):
        with pytest.raises(RequestEntityTooLarge):
            parsed(request_class, body, content_type, max_form_parts=3)


def test_form_fields_over_the_memory_limit_are_413_as_with_werkzeug():
    body, content_type = client_body({"image": ("a.jpg", b"x", "image/jpeg")}, {"big": "y" * 5000})
    for request_class in (Request, UploadRequest):
        with pytest.raises(RequestEntityTooLarge):
            parsed(request_class, body, content_type, max_form_memory_size=1000)


@pytest.mark.parametrize("body", [b"", b"garbage", b"--wrong\r\n\r\n", b"--b\r\nContent-Disposition: form-data"])
def test_malformed_bodies_give_what_werkzeug_gives(body):
    content_type = "multipart/form-data; boundary=b"
    assert parsed(UploadRequest, body, content_type) == parsed(Request, body, content_type)
