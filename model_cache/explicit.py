"""Models given by explicit S3 location: the envelope's ``models`` field.

``{"models": {"Stable-diffusion": ["s3://team/ckpt/x.safetensors"], "Lora": ["s3://team/loras/ink.safetensors"]}}``
makes those objects visible to one job under their file names, as if they sat in the
store's folder of that kind: the payload still names them the A1111 way
(``override_settings.sd_model_checkpoint: "x"``, ``<lora:ink:0.7>``), and a job that names
no checkpoint uses the first ``Stable-diffusion`` location. Each location is checked
against the allow-list (:mod:`model_cache.access`) when the request arrives — a URI outside
it is a 403 and nothing is read — and again by the store when it resolves one.

Pure string work; the stores apply the overlay (``S3Store.explicit``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from model_cache import names
from model_cache.access import S3AllowList
from pipelines.errors import Forbidden, InvalidParameter

MAX_PER_KIND = 32  # a request naming more files than this is not a generation request


@dataclass(frozen=True)
class ExplicitModel:
    kind: str
    uri: str
    field: str  # "models.Lora[0]": where the request gave it, for errors

    @property
    def file_name(self) -> str:
        return self.uri.rsplit("/", 1)[-1]

    def matches(self, name: str) -> bool:
        """True when the A1111 name (cleaned: no hash suffix) means this file: its file name, or its stem."""
        wanted = name.rsplit("/", 1)[-1].lower()
        return wanted in (self.file_name.lower(), names.stem(self.file_name).lower())


@dataclass(frozen=True)
class ExplicitModels:
    """The validated ``models`` field of one request (empty when absent)."""

    items: tuple[ExplicitModel, ...] = field(default_factory=tuple)

    def __bool__(self) -> bool:
        return bool(self.items)

    def of_kind(self, kind: str) -> list[ExplicitModel]:
        return [item for item in self.items if item.kind == kind]

    def match(self, kind: str, name: str) -> ExplicitModel | None:
        """The explicit location ``name`` (a cleaned A1111 name) means for ``kind``, if any."""
        return next((item for item in self.of_kind(kind) if item.matches(name)), None)

    def default_checkpoint(self) -> str | None:
        """The name a job without ``sd_model_checkpoint`` uses: the first explicit checkpoint's file name."""
        first = self.of_kind("Stable-diffusion")
        return first[0].file_name if first else None

    def as_dict(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for item in self.items:
            out.setdefault(item.kind, []).append(item.uri)
        return out


def parse_models(value, *, allow: S3AllowList | None, prefix: str = "") -> ExplicitModels:
    """Validate ``{kind: [s3 uri, ...]}`` before any I/O.

    ``allow`` is ``None`` when the model store is a local folder: explicit S3 locations
    then have nothing to be read through (403). Syntax problems are 422, locations
    outside the allow-list 403, each naming ``models.<kind>[i]``.
    """
    where = f"{prefix}models"
    if not value:
        return ExplicitModels()
    if not isinstance(value, dict):
        raise InvalidParameter(f"{where}: must be an object of model kind → list of s3:// URIs", field=where)
    items: list[ExplicitModel] = []
    for kind, uris in value.items():
        names.check_kind(kind, field=f"{where}.{kind}")
        if isinstance(uris, str):
            uris = [uris]
        if not isinstance(uris, list) or not all(isinstance(u, str) for u in uris):
            raise InvalidParameter(f"{where}.{kind}: must be a list of s3:// URIs", field=f"{where}.{kind}")
        if len(uris) > MAX_PER_KIND:
            raise InvalidParameter(f"{where}.{kind}: at most {MAX_PER_KIND} locations (got {len(uris)})", field=f"{where}.{kind}")
        for i, uri in enumerate(uris):
            here = f"{where}.{kind}[{i}]"
            if allow is None:
                raise Forbidden(f"{here}: explicit S3 model locations need MODEL_STORE on S3 (got {uri})", field=here)
            _bucket, key = allow.check(uri, field=here)
            if not names.has_extension(kind, key):
                raise InvalidParameter(f"{here}: {uri} is not a {kind} file ({', '.join(names.EXTENSIONS[kind])})", field=here)
            names.clean_name(key.rsplit("/", 1)[-1], field=here)  # the name the payload will use must be a usable name
            items.append(ExplicitModel(kind, uri, here))
    return ExplicitModels(tuple(items))
