"""Reading multipart uploads with python-multipart's parser, behind Flask's usual `request.files`.

Werkzeug's own multipart parser is Python that searches the body for the boundary in steps; the
state machine of python-multipart (the parser FastAPI and Starlette use) reads an upload in a fraction
of the CPU time (measured in deliverables/TEST_RESULTS.md, the front door). The views do not change: this parser
fills the same `request.form` and `request.files`, and keeps Werkzeug's limits on the number of parts
and on the memory of non-file fields.
"""

from __future__ import annotations

import io
from typing import IO, Any

from flask import Request
from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header
from werkzeug.datastructures import FileStorage, Headers
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.formparser import FormDataParser


class FormTooLarge(RequestEntityTooLarge):
    """A 413 for a limit on the form's make-up rather than on its size in bytes; the description names it."""


def _too_many_parts(limit: int) -> FormTooLarge:
    return FormTooLarge(
        f"the form has more than {limit:,} parts (fields and files); the limit is {limit:,} (Flask's MAX_FORM_PARTS)"
    )


def _fields_too_large(limit: int) -> FormTooLarge:
    return FormTooLarge(
        f"the form's non-file fields hold more than {limit:,} bytes; the limit is {limit:,} "
        f"(Flask's MAX_FORM_MEMORY_SIZE)"
    )


class _Parts:
    """Collects the parts of one multipart body as python-multipart's callbacks report them."""

    def __init__(self, max_parts: int | None, max_memory: int | None) -> None:
        self.max_parts, self.max_memory = max_parts, max_memory
        self.form: list[tuple[str, str]] = []
        self.files: list[tuple[str, FileStorage]] = []
        self.form_bytes = 0
        self.complete = False  # True once the closing boundary was read
        self._headers: Headers = Headers()
        self._field, self._value = b"", b""
        self._data = io.BytesIO()

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda data, start, end: self._add(data, start, end, "_field"),
            "on_header_value": lambda data, start, end: self._add(data, start, end, "_value"),
            "on_header_end": self._header_end,
            "on_part_data": lambda data, start, end: self._data.write(data[start:end]),
            "on_part_end": self._end,
            "on_end": lambda: setattr(self, "complete", True),
        }

    def _begin(self) -> None:
        if self.max_parts is not None and len(self.form) + len(self.files) >= self.max_parts:
            raise _too_many_parts(self.max_parts)
        self._headers, self._data = Headers(), io.BytesIO()

    def _add(self, data: bytes, start: int, end: int, which: str) -> None:
        setattr(self, which, getattr(self, which) + data[start:end])

    def _header_end(self) -> None:
        self._headers.add(self._field.decode("latin-1"), self._value.decode("latin-1"))
        self._field, self._value = b"", b""

    def _end(self) -> None:
        _, options = parse_options_header(self._headers.get("Content-Disposition", ""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in options:
            filename = options[b"filename"].decode("utf-8", "replace")
            self._data.seek(0)
            content_type = self._headers.get("Content-Type")
            self.files.append((name, FileStorage(self._data, filename, name, content_type, headers=self._headers)))
            return
        value = self._data.getvalue()
        self.form_bytes += len(value)
        if self.max_memory is not None and self.form_bytes > self.max_memory:
            raise _fields_too_large(self.max_memory)
        self.form.append((name, value.decode("utf-8", "replace")))


class _FormDataParser(FormDataParser):
    def _parse_multipart(self, stream: IO[bytes], mimetype: str, content_length: int | None, options: dict):
        boundary = options.get("boundary", "")
        if not boundary:
            raise ValueError("Missing boundary")
        body = stream.read()  # at most MAX_CONTENT_LENGTH (MAX_UPLOAD_BYTES): Flask refuses larger bodies first
        parts = _Parts(self.max_form_parts, self.max_form_memory_size)
        try:
            parser = MultipartParser(boundary, parts.callbacks())
            parser.write(body)
            parser.finalize()
        except MultipartParseError:
            parts.complete = False
        if not parts.complete:
            # Werkzeug's parser forgives what python-multipart's does not, e.g. a body that starts with a
            # line break (Werkzeug's own test client sends one): let it have a go, so nothing that
            # Werkzeug read before is refused now.
            return super()._parse_multipart(io.BytesIO(body), mimetype, content_length, options)
        return stream, self.cls(parts.form), self.cls(parts.files)


class UploadRequest(Request):
    """Flask's Request, with multipart bodies read by python-multipart."""

    form_data_parser_class = _FormDataParser
