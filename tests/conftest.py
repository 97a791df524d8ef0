"""Test-wide setup: offline always, fixtures come from tests/support/ plugins."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = [
    "tests.support.s3_fixtures",
    "tests.support.model_fixtures",
    "tests.support.annotator_files",
]
