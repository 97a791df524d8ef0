"""Extra networks for one job, on the worker side: LoRA, hypernetworks, embeddings, VAE.

Turns the names a request uses (prompt tags, embedding words, ``sd_vae``) into
local files through the model store, hands them to the pipeline-side managers,
and returns what the infotext and ``params.json`` record. One instance lives as
long as the resident pipeline it decorates. Imported only in the worker.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.errors import ModelNotFound
from pipelines.params import Txt2ImgParams
from pipelines.prompt import extract_networks, hypernet_specs, lora_specs

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """What a job's extra networks resolved to."""

    prompt: str  # tags removed: what the text encoder sees
    negative_prompt: str
    infotext: dict[str, Any] = field(default_factory=dict)
    vae_infotext: dict[str, Any] = field(default_factory=dict)
    records: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class ExtraNetworks:
    """The LoRA / hypernetwork / embedding / VAE managers of one loaded pipeline."""

    def __init__(self, loaded, store, hashes, checkpoint_stem: str):
        from pipelines.hypernetwork import HypernetworkManager
        from pipelines.lora import LoraManager
        from pipelines.textual_inversion import EmbeddingManager
        from pipelines.vae import VaeManager

        self.store = store
        self.hashes = hashes
        self.checkpoint_stem = checkpoint_stem
        self.loras = LoraManager(loaded.pipe, loaded.family)
        self.hypernets = HypernetworkManager(loaded.pipe)
        self.embeddings = EmbeddingManager(loaded.pipe, loaded.family)
        self.vae = VaeManager(loaded.pipe, loaded.family, config_dir=loaded.config_dir)

    def _file(self, kind: str, name: str, field_name: str) -> tuple[Any, Path, str]:
        ref = self.store.resolve(kind, name, field=field_name)
        path = self.store.fetch(ref)
        sha256, _short = self.hashes.file_hashes(path)
        return ref, path, sha256

    def prepare(self, params: Txt2ImgParams) -> Prepared:
        """Resolve and activate everything ``params`` names; deactivate what it does not."""
        from pipelines import hypernetwork, textual_inversion
        from pipelines.hypernetwork import HypernetSpec
        from pipelines.lora import LoraFile
        from pipelines.textual_inversion import EmbeddingSpec, find_embedding_names
        from pipelines.vae import choose_vae

        prompt, tags = extract_networks(params.prompt)
        negative, _ = extract_networks(params.negative_prompt)  # the HTTP side refused tags there
        out = Prepared(prompt=prompt, negative_prompt=negative)

        lora_files = []
        for spec in lora_specs(tags, field="prompt"):
            ref, path, sha = self._file("Lora", spec.name, "prompt")
            lora_files.append(LoraFile(path=path, sha256=sha, name=spec.name, te_weight=spec.te_weight, unet_weight=spec.unet_weight))
        self.loras.apply(lora_files)
        if lora_files:
            out.infotext["Lora hashes"] = self.loras.infotext_value(lora_files)
        out.records["loras"] = [
            {"name": f.name, "te_weight": f.te_weight, "unet_weight": f.unet_weight, "file": str(f.path.name), "sha256": f.sha256}
            for f in lora_files
        ]

        hyper = []
        for spec in hypernet_specs(tags, field="prompt"):
            ref, path, sha = self._file("hypernetworks", spec.name, "prompt")
            hyper.append(HypernetSpec(path=path, sha256=sha, name=spec.name, strength=spec.strength))
        out.warnings += self.hypernets.apply(hyper)
        out.infotext.update(hypernetwork.infotext_params(hyper))
        out.records["hypernetworks"] = hypernetwork.records(hyper)

        stems = {Path(ref.name).stem: ref for ref in self.store.list("embeddings")}
        used = find_embedding_names(f"{prompt}\n{negative}", list(stems))
        specs = []
        for stem in used:
            path = self.store.fetch(stems[stem])
            sha, _ = self.hashes.file_hashes(path)
            specs.append(EmbeddingSpec(path=path, sha256=sha, token=stem))
        self.embeddings.ensure(specs)
        # multi-vector embeddings expand only when written as their registered (lower-case) token
        out.prompt = self.embeddings.canonical_prompt(out.prompt)
        out.negative_prompt = self.embeddings.canonical_prompt(out.negative_prompt)
        out.infotext.update(textual_inversion.infotext_params([(s.token, s.sha256) for s in specs]))
        out.records["embeddings"] = [{"name": s.token, "sha256": s.sha256} for s in specs]

        try:
            choice = choose_vae(params.sd_vae, self.checkpoint_stem, [ref.name for ref in self.store.list("VAE")])
        except ModelNotFound:  # a listing remembered from before the VAE was uploaded? ask the store once more
            choice = choose_vae(params.sd_vae, self.checkpoint_stem, [ref.name for ref in self.store.list("VAE", fresh=True)])
        if choice is None:
            self.vae.apply(None)
            out.records["vae"] = None
        else:
            ref, path, sha = self._file("VAE", choice, "override_settings.sd_vae")
            self.vae.apply(path, sha)
            out.vae_infotext = self.vae.infotext_params()
            out.records["vae"] = {"name": choice, "sha256": sha}
        return out
