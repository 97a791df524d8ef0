"""Images by location in the envelope: ``s3://…`` or ``file://…`` where A1111 takes base64.

In an envelope's ``payload`` (not in bare A1111 bodies), ``init_images[i]``, ``mask`` and a
ControlNet unit's ``image`` / ``mask`` / ``input_image`` (also inside ``{"image", "mask"}``)
may name an image instead of carrying it — what a real-time endpoint needs past its 6 MB
body limit, and how a client hands a previous job's image (or detected map) to the next one.
Before the job is validated, each location is checked against a fence (no I/O), read
(size-capped), and put in place as base64, so the rest of the request path sees a plain
A1111 payload; ``params.json`` records which field came from where.

The fence: on S3, under ``MODEL_STORE``, ``OUTPUT`` (earlier jobs' images) or
``ALLOWED_S3_PREFIXES``; on local disk (``file://``), under a local ``OUTPUT`` folder only.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

from model_cache.access import S3AllowList, parse_prefixes
from pipelines.errors import Forbidden, InvalidParameter, SourceUnavailable
from serve.img2img import image_pixel_limit
from serve.settings import Settings

_SCHEMES = ("s3://", "file://")
_UNIT_KEYS = ("image", "mask", "input_image")


def _is_uri(value: Any) -> bool:
    return isinstance(value, str) and value.startswith(_SCHEMES)


def image_slots(payload: dict) -> list[tuple[Any, Any, str]]:
    """``(container, key, field)`` of every image-bearing slot of ``payload`` that holds a URI."""
    slots: list[tuple[Any, Any, str]] = []
    images = payload.get("init_images")
    if isinstance(images, list):
        slots += [(images, i, f"init_images[{i}]") for i in range(len(images))]
    slots.append((payload, "mask", "mask"))
    scripts = payload.get("alwayson_scripts")
    if isinstance(scripts, dict):
        for name, script in scripts.items():
            if name.lower() != "controlnet":
                continue
            args = script.get("args") if isinstance(script, dict) else script
            for i, unit in enumerate(args if isinstance(args, list) else []):
                if not isinstance(unit, dict):
                    continue
                where = f"alwayson_scripts.controlnet.args[{i}]"
                for key in _UNIT_KEYS:
                    slots.append((unit, key, f"{where}.{key}"))
                    inner = unit.get(key)
                    if isinstance(inner, dict):
                        slots += [(inner, k, f"{where}.{key}.{k}") for k in ("image", "mask")]
    return [(c, k, f) for c, k, f in slots if _is_uri(c[k] if isinstance(c, list) else c.get(k))]


def byte_limit(settings: Settings) -> int:
    """The largest image file we read: 4 bytes a pixel at the pixel limit, plus headroom for headers."""
    return image_pixel_limit(settings) * 4 + (1 << 20)


def s3_fence(settings: Settings) -> S3AllowList:
    own = [uri for uri in (settings.model_store, settings.output) if uri.startswith("s3://")]
    return S3AllowList([*own, *parse_prefixes(settings.allowed_s3_prefixes)])


def _local_root(settings: Settings) -> Path | None:
    out = settings.output
    if out.startswith("s3://"):
        return None
    return Path(os.path.realpath(out[len("file://"):] if out.startswith("file://") else out))


def _check_file(uri: str, settings: Settings, field: str) -> Path:
    """The real path of a ``file://`` image, when it lies inside a local OUTPUT folder (no read)."""
    root = _local_root(settings)
    if root is None:
        raise Forbidden(f"{field}: file:// images need a local OUTPUT folder to read from (got {uri})", field=field)
    path = Path(os.path.realpath(uri[len("file://"):]))  # symlinks resolved: the real file must be inside
    if not uri[len("file://"):].startswith("/") or not path.is_relative_to(root):
        raise Forbidden(f"{field}: {uri} is outside the OUTPUT folder {root}", field=field)
    return path


def _read_file(uri: str, settings: Settings, field: str, limit: int) -> bytes:
    path = _check_file(uri, settings, field)
    try:
        size = path.stat().st_size
        if size > limit:
            raise InvalidParameter(f"{field}: {uri} has {size} bytes, more than the {limit} an image may have", field=field)
        return path.read_bytes()
    except FileNotFoundError:
        raise InvalidParameter(f"{field}: {uri} does not exist", field=field) from None
    except IsADirectoryError:
        raise InvalidParameter(f"{field}: {uri} is a folder, not an image", field=field) from None


def _read_s3(uri: str, settings: Settings, field: str, limit: int, client_factory) -> bytes:
    from botocore.exceptions import BotoCoreError, ClientError

    from model_cache.s3 import is_not_found

    bucket, key = s3_fence(settings).check(uri, field=field)
    try:
        response = client_factory().get_object(Bucket=bucket, Key=key)
        if response["ContentLength"] > limit:
            response["Body"].close()
            raise InvalidParameter(f"{field}: {uri} has {response['ContentLength']} bytes, more than the {limit} an image may have", field=field)
        return response["Body"].read()
    except ClientError as exc:
        if is_not_found(exc):
            raise InvalidParameter(f"{field}: {uri} does not exist", field=field) from None
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("AccessDenied", "403"):
            raise Forbidden(f"{field}: the endpoint's role may not read {uri}", field=field) from None
        raise SourceUnavailable(f"{field}: could not read {uri}: {code or exc}", field=field) from None
    except BotoCoreError as exc:
        raise SourceUnavailable(f"{field}: could not read {uri}: {exc}", field=field) from None


def inline_image_uris(body: dict, settings: Settings, client_factory) -> dict[str, str]:
    """Replace image locations in an envelope's payload by their base64; returns ``{field: uri}``.

    Every location is fenced before the first read. Errors name ``payload.<field>``.
    """
    payload = body.get("payload") if "payload" in body else None
    if not isinstance(payload, dict):
        return {}
    slots = image_slots(payload)
    fence = s3_fence(settings)
    for container, key, where in slots:  # every location checked before the first read
        uri = container[key]
        if uri.startswith("s3://"):
            fence.check(uri, field=f"payload.{where}")
        else:
            _check_file(uri, settings, f"payload.{where}")
    limit, sources = byte_limit(settings), {}
    for container, key, where in slots:
        uri, field = container[key], f"payload.{where}"
        if uri.startswith("s3://"):
            data = _read_s3(uri, settings, field, limit, client_factory)
        else:
            data = _read_file(uri, settings, field, limit)
        container[key] = base64.b64encode(data).decode("ascii")
        sources[field] = uri
    return sources
