"""Figures as Prefect artifacts that the UI shows: a markdown artifact carrying the PNG inline (a
``data:`` URI, downscaled until it fits `MAX_BYTES`), with the file's path and ``file://`` link
kept beneath it. A link artifact to a local file shows the UI user nothing: the browser will not
open a path on the machine that ran the flow."""
from __future__ import annotations

import base64
import io
import os
import re
from pathlib import Path

from PIL import Image
from prefect.artifacts import create_markdown_artifact

MAX_BYTES = 1_500_000  # of the PNG before base64: the UI stays quick, the API's database small


def data_uri(data: bytes, mime: str) -> str:
    """`data` as a data: URI of type `mime`, for a picture inlined in markdown or HTML."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def png_bytes(path: str, max_bytes: int = MAX_BYTES) -> bytes:
    """The figure at `path` as PNG bytes, halved in size until at most `max_bytes` (the file as it is
    when it fits already)."""
    if os.path.getsize(path) <= max_bytes:
        with open(path, "rb") as f:
            return f.read()
    picture = Image.open(path)
    picture.load()
    while True:
        buf = io.BytesIO()
        picture.save(buf, format="PNG", optimize=True)
        if buf.tell() <= max_bytes or min(picture.size) < 64:
            return buf.getvalue()
        picture = picture.resize((picture.width // 2, picture.height // 2), Image.LANCZOS)


def figure_markdown(path: str, title: str, max_bytes: int = MAX_BYTES) -> str:
    """Markdown that shows the figure inline and names its file."""

    where = os.path.abspath(path)
    if os.path.splitext(path)[1].lower() != ".png":
        return f"### {title}\n\nFile: `{where}` ({Path(where).as_uri()}); the UI shows PNG figures inline, not this format.\n"
    return (f"### {title}\n\n![{title}]({data_uri(png_bytes(path, max_bytes), 'image/png')})\n\n"
            f"File: `{where}` ({Path(where).as_uri()})\n")


def artifact_key(text: str) -> str:
    """A valid artifact key (lowercase letters, digits and dashes) made from `text`."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-")


def publish_figure(path: str, key: str, title: str) -> str:
    """Create the markdown artifact of the figure at `path` under `key`; returns the artifact's id."""
    return str(create_markdown_artifact(markdown=figure_markdown(path, title), key=artifact_key(key),
                                        description=f"{title} ({os.path.abspath(path)})"))
