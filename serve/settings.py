"""All settings of the server, in one class, read once at start-up and injected.

Every field maps to an environment variable of the same name in upper case
(``MODEL_STORE``, ``OUTPUT``, ...); the README's configuration table lists them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Server configuration (environment variables, then defaults)."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    port: int = Field(8080, validation_alias=AliasChoices("SAGEMAKER_BIND_TO_PORT", "PORT"), description="HTTP port (SageMaker sets SAGEMAKER_BIND_TO_PORT).")
    host: str = Field("0.0.0.0", description="Address to bind.")
    model_store: str = Field("./models", description="A1111-style models folder: local path or s3://bucket/prefix/.")
    output: str = Field("./outputs", description="Where job folders go: local path or s3://bucket/prefix/.")
    cache_dir: Path = Field(Path("./.cache/sd-endpoint"), description="Disk cache for models fetched from S3 and file hashes.")
    default_checkpoint: str | None = Field(None, description="Checkpoint used when a request names none (default: the first one in the store).")
    s3_endpoint_url: str | None = Field(None, description="Custom S3 endpoint (MinIO, SeaweedFS); unset for AWS.")
    aws_region: str | None = Field(None, validation_alias=AliasChoices("AWS_REGION", "AWS_DEFAULT_REGION"), description="AWS region for S3.")
    device: str = Field("auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field("auto", description="'auto' = float16 on GPU, float32 on CPU.")
    queue_size: int = Field(4, ge=1, le=1000, description="Jobs waiting for the worker before /invocations answers 503.")
    max_pixels: int = Field(2048 * 2048, ge=64 * 64, description="Upper bound of width*height per image.")
    max_side: int = Field(2048, ge=64, description="Upper bound of width and height.")
    max_steps: int = Field(150, ge=1, description="Upper bound of steps.")
    max_batch_size: int = Field(8, ge=1, description="Upper bound of batch_size.")
    max_n_iter: int = Field(16, ge=1, description="Upper bound of n_iter.")
    max_controlnet_units: int = Field(10, ge=1, le=100, description="Most enabled ControlNet units in one request (alwayson_scripts.controlnet.args).")
    request_timeout: float = Field(600.0, gt=0, description="Seconds a real-time request waits for its job before 504.")
    shutdown_grace: float = Field(25.0, gt=0, description="Seconds after SIGTERM for the running job to finish before it is failed.")
    worker_start_timeout: float = Field(300.0, gt=0, description="Seconds the worker may take to become ready before /ping reports it defunct.")
    endpoint_name: str | None = Field(None, validation_alias=AliasChoices("ENDPOINT_NAME", "SAGEMAKER_ENDPOINT_NAME"), description="Endpoint name written into job records (for filtering job lists).")
    log_level: str = Field("info", description="Python log level.")
    cache_ram_budget: str = Field("auto", description="Bytes of loaded checkpoints kept in RAM (LRU): 'auto' = 50% of total RAM, '12GiB', '40%'. On a CPU-only machine this also covers the checkpoint in use.")
    cache_vram_budget: str = Field("auto", description="Bytes of checkpoints kept on the GPU (LRU; older ones move to RAM): 'auto' = free memory at start minus max(2 GiB, 20%), '10GiB', '60%'. Ignored without CUDA.")
    cache_disk_budget: int | None = Field(None, ge=0, description="Bytes of models kept in CACHE_DIR from S3 (LRU), e.g. '40GiB'; unset = 80% of (free space + cached bytes) at start.")
    cache_min_free: int | None = Field(None, ge=0, description="Free space the disk cache always leaves on its filesystem, e.g. '5GiB'; unset = min(5 GiB, 10% of the filesystem).")
    s3_concurrency: int | None = Field(None, ge=1, le=64, description="Parallel ranged GETs per model download; unset = 4 per CPU core, 8 to 16.")
    s3_readers: int | None = Field(None, ge=1, le=32, description="Threads moving downloaded bytes to disk (each drains many streams); unset = 1 per 4 CPU cores, 1 to 8.")
    s3_part_size: int = Field(64 * 1024 * 1024, ge=1024 * 1024, description="Largest ranged GET, e.g. '64MiB' (smaller objects are split so every stream gets a range).")
    s3_retries: int = Field(5, ge=0, le=20, description="Retries per part on transient S3 errors (connection drops, 5xx, throttling), with exponential backoff.")
    model_list_ttl: float = Field(30.0, ge=0, le=3600, description="Seconds an S3 store's listings and name lookups are reused (0 = ask S3 every job); a name not found is always asked again.")
    allowed_s3_prefixes: str = Field("", description="Comma-separated s3://bucket/prefix/ locations models may be read from, besides MODEL_STORE's own prefix.")

    @field_validator("cache_ram_budget", "cache_vram_budget")
    @classmethod
    def _budget(cls, value: str) -> str:
        from model_cache.residency import check_budget

        return check_budget(value)

    @field_validator("cache_disk_budget", "cache_min_free", "s3_part_size", mode="before")
    @classmethod
    def _byte_size(cls, value):
        from model_cache.sizes import parse_size

        return None if value is None or value == "" else parse_size(value)

    def worker_view(self) -> dict:
        """The plain dict handed to the worker process (pickled across the spawn boundary)."""
        return self.model_dump(mode="json")
