"""The YAML pipeline config: typed, strict, and read the same way by every stage.

Unknown keys and bad values are rejected with the dotted key that is wrong, e.g.
``configs/x.yaml: models.0.scales.1: Input should be a valid integer``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from core.knn import IndexSpec
from core.models.registry import registry_path
from core.yamlconf import (
    ConfigError,
    ConfigModel,
    apply_overrides,
    read_yaml,
    set_key,
    source_of,
    validate_as,
)
from patchers.views import ViewConfig

__all__ = ["ConfigError", "PipelineConfig", "apply_overrides", "load_config", "set_key", "validate"]

SPLIT_FOLDERS = {"train": "train", "reference": "references", "query": "queries"}
DEFAULT_SAMPLE = Path(__file__).resolve().parent.parent / "bench" / "sample"
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml"


class DataConfig(ConfigModel):
    """Where the images are: an ISC21-layout ``root`` and/or explicit folders."""

    root: str | None = Field(None, description="folder with train/, references/, queries/, ground_truth.csv")
    train: str | None = None
    references: str | None = None
    queries: str | None = None
    ground_truth: str | None = None
    limit: int | None = Field(None, ge=1, description="use at most this many images per split")
    max_pixels: int = Field(64_000_000, ge=1, description="decode cap: a JPEG over it is decoded at 1/2..1/8 "
                            "size, any other image over it is listed in errors.parquet")

    def folders(self) -> dict[str, str]:
        """split -> folder, for the splits that are configured and exist."""
        out = {}
        for split, sub in SPLIT_FOLDERS.items():
            given = getattr(self, sub)
            path = given or (str(Path(self.root) / sub) if self.root else None)
            if path and (given or Path(path).is_dir()):
                out[split] = path
        return out

    def ground_truth_path(self) -> str | None:
        if self.ground_truth:
            return self.ground_truth
        if self.root and (Path(self.root) / "ground_truth.csv").is_file():
            return str(Path(self.root) / "ground_truth.csv")
        return None


class RayConfig(ConfigModel):
    address: str | None = Field(None, description="cluster address; None starts a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray (default: all)")


class PatchSides(ConfigModel):
    query: ViewConfig = ViewConfig()
    reference: ViewConfig = ViewConfig()
    train: ViewConfig = ViewConfig()
    shard_size: int = Field(1000, ge=1, description="images per manifest/patch shard")


class ModelEntry(ConfigModel):
    name: str = Field(description="registry name, backbone name or checkpoint path")
    scales: list[int] = Field([224], min_length=1)
    dim: int | None = Field(None, ge=8, description="projection size for random-init backbones")
    pool: str | None = Field(None, description="read a backbone out with this pooling (e.g. gem_grid2); "
                             "trained models need dim: null")
    batch_size: int = Field(32, ge=1)
    dtype: Literal["float32", "float16"] = Field("float32", description="stored embedding type")
    precision: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="torch members on a GPU run under autocast at this precision (CPU: float32)")

    @model_validator(mode="after")
    def _scales(self) -> "ModelEntry":
        if any(s < 32 or s > 2048 for s in self.scales):
            raise ValueError(f"scales must be between 32 and 2048 px, got {self.scales}")
        return self


class ExtractConfig(ConfigModel):
    min_actors: int = Field(1, ge=1, description="model actors kept up; the pool grows to max_actors under load")
    max_actors: int | None = Field(None, ge=1, description="None: one per GPU the cluster can have "
                                   "(its autoscaler's node types included), else 1 on the CPU")
    cpus_per_actor: float = Field(0.5, gt=0)
    gpus_per_actor: float = Field(1.0, ge=0, description="asked for by every model actor when GPUs are used")
    use_gpu: Literal["auto", "yes", "no"] = Field("auto", description="auto: when the cluster has or can add GPUs")
    num_threads: int | None = Field(None, ge=1, description="torch threads per CPU actor")
    chunk_patches: int = Field(256, ge=1, description="patches per feature file (whole images)")
    decode_cpus: float = Field(0.5, gt=0, description="CPUs per decode task (decode, cut, resize)")
    shape_bucket: int = Field(0, ge=0, description="aspect-kept members: round the free side to a multiple "
                              "of this many pixels so patches batch together on a GPU (0: exact sizes; 32 "
                              "cost minidisc-hard 0.0015 uAP and 0.020 R@P90 with SSCD, no speed on a CPU)")
    chunk_retries: int = Field(3, ge=0, description="a chunk whose model actor dies (out of memory, a lost node) "
                               "runs again on a new actor at most this many times, then the stage fails (Ray Data's "
                               "default retries it forever)")

    @field_validator("use_gpu", mode="before")
    @classmethod
    def _yes_no(cls, v: Any) -> Any:
        return ("yes" if v else "no") if isinstance(v, bool) else v  # YAML 1.1 reads yes / no as booleans


class NormalizeConfig(ConfigModel):
    enabled: bool = False
    beta: float = Field(1.0, ge=0)
    neighbours: int = Field(1, ge=1, description="mean of this many nearest train descriptors")


class ReduceConfig(ConfigModel):
    """Derived descriptors fit on train/: PCA/whitening, stretching, member concatenation."""

    dim: int | None = Field(None, ge=2, description="PCA output size (None: no PCA)")
    whiten: bool = True
    fit_rows: int = Field(200_000, ge=2, description="most train descriptors PCA is fit on (every n-th row)")
    stretch: bool = Field(False, description="push query/reference descriptors away from train neighbours")
    stretch_neighbours: int = Field(10, ge=1)
    stretch_beta: float = Field(0.5, ge=0)
    concat: bool = Field(False, description="concatenate all members into one descriptor (feature ensemble)")

    @property
    def active(self) -> bool:
        return bool(self.dim or self.stretch or self.concat)

    def tag(self) -> str:
        parts = ([f"pca{self.dim}{'w' if self.whiten else ''}"] if self.dim else []) + \
            ([f"st{self.stretch_neighbours}b{self.stretch_beta:g}"] if self.stretch else [])
        return "~".join(parts)


class SearchConfig(ConfigModel):
    k: int = Field(10, ge=1, description="reference patches kept per query patch")
    pairs: Literal["all", "d2lv"] = Field(
        "all", description="all: every query patch x every reference patch; d2lv: the whole query x every "
                           "reference patch and every query patch x whole references (no patch-to-patch)")
    normalize: NormalizeConfig = NormalizeConfig()
    shard_size: int = Field(1_000_000, ge=1, description="max reference rows per search shard (one actor each)")
    exact_max: int = Field(2_000_000, ge=1, description="shards with fewer rows use an exact IndexFlatIP")
    index: Literal["ivfpq", "hnsw"] = Field("ivfpq", description="approximate index for shards >= exact_max")
    nlist: int = Field(4096, ge=1, description="IVF lists (capped at rows / 39 per shard)")
    nprobe: int = Field(32, ge=1, description="IVF lists visited per query")
    pq_m: int = Field(32, ge=1, description="PQ sub-quantizers; must divide the feature dim")
    refine: Literal["none", "sq8", "fp16", "flat"] = Field(
        "sq8", description="re-rank IVF-PQ hits with stored vectors (sq8: 1 byte per dim) so copies stay found")
    refine_k: float = Field(4.0, ge=1, description="hits re-ranked per requested neighbour")
    hnsw_m: int = Field(32, ge=4, description="HNSW neighbours per node")
    ef_search: int = Field(128, ge=1, description="HNSW search depth")
    cpus_per_shard: float = Field(0.5, gt=0, description="CPUs reserved by each shard actor")
    gpus_per_shard: float = Field(0.0, ge=0, description="GPUs per shard actor (0: CPU faiss)")
    query_batch: int = Field(65536, ge=1, description="query rows sent to the shards per call")

    def index_spec(self) -> IndexSpec:
        """The index settings the search stage and ``copydet plan`` both use."""
        return IndexSpec(exact_max=self.exact_max, kind=self.index, nlist=self.nlist, nprobe=self.nprobe,
                         pq_m=self.pq_m, refine=self.refine, refine_k=self.refine_k, hnsw_m=self.hnsw_m,
                         ef_search=self.ef_search)


class FuseConfig(ConfigModel):
    rule: Literal["max", "mean", "confidence", "completeness"] = Field(
        "max", description="max over members; mean over members; or the max filtered by per-member thresholds")
    thresholds: dict[str, float] = {}
    calibration: dict[str, float] = Field(
        {}, description="per-member score factors that put members on one scale before fusion (feature key -> "
        "factor); `copydet tune` measures them on the normalisation background (ensemble.calibrate)")
    k: int = Field(10, ge=1, description="predictions kept per query")
    demote_others: float = Field(0.1, ge=0, description="each query's candidates below its best lose this share "
                                 "of the best's score (final scores): a query copies at most one reference. "
                                 "Chosen on six synthetic splits of train/ photos; 0: off")
    threshold: float | Literal["auto"] | None = Field(
        None, description="is-copy threshold on the final score (predictions.csv, after verification when "
        "verify.enabled): pairs at or above it are listed in copies.csv. `auto`: estimated in each run from "
        "its own queries against train/ decoys to reach fuse.threshold_precision (ensemble.decoys); a number: "
        "e.g. what `copydet tune` calibrated on synthetic copies of train/")
    threshold_precision: float = Field(0.9, gt=0, lt=1, description="the precision fuse.threshold is "
                                       "estimated (auto) or calibrated (copydet tune) for")
    decoy_folds: int = Field(5, ge=2, description="fuse.threshold auto: train photos are split into this many "
                             "folds by id; a decoy is normalised against the other folds only")

    @model_validator(mode="after")
    def _rule(self) -> "FuseConfig":
        if self.rule == "mean" and self.thresholds:
            raise ValueError("rule 'mean' takes no thresholds (they filter the max rules)")
        if self.rule in ("confidence", "completeness") and not self.thresholds:
            raise ValueError(f"rule {self.rule!r} keeps a pair by per-member thresholds: give fuse.thresholds "
                             "(feature key -> score, e.g. from copydet tune), or use rule 'max'")
        bad = {k: v for k, v in self.calibration.items() if not v > 0}
        if bad:
            raise ValueError(f"calibration factors must be > 0, got {bad}")
        return self


class LearnedVerifyConfig(ConfigModel):
    """copydet's learned verifier (``copydet train-verifier``): its P(copy) adds a bonus. The
    defaults (and ``combine: max``) are the best rule on a synthetic split of train/ photos
    (``bench/verify_rule.py``)."""

    model: str = Field("copydet-verifier", description="registered verifier card")
    floor: float = Field(0.9, ge=0, lt=1, description="no bonus at or below this P(copy)")
    weight: float = Field(0.25, ge=0, description="bonus at P(copy) = 1, linear from the floor")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per verify task of the learned verifier (0: CPU; above 0 "
                            "its models run on the GPU; the service's verifier follows serve.num_gpus)")


class VerifyConfig(ConfigModel):
    """Verification of each query's best candidates: keypoint inliers and/or the learned
    verifier's P(copy) add a bonus to the fused score (methods: jobs.stages.verify.VERIFY_METHODS)."""

    enabled: bool = False
    top_k: int = Field(3, ge=1, description="candidates verified per query")
    decoy_top_k: int = Field(2, ge=1, description="fuse.threshold auto: train decoys verified per query (at most "
                             "top_k; the rest keep their fused score). The threshold rests on each query's best "
                             "decoys: 2 gave the thresholds of 5 on ten synthetic splits at 2/5 of the time")
    method: Literal["sift", "rootsift", "orb", "learned", "learned+sift", "learned+rootsift", "learned+orb"] = \
        "rootsift"
    max_side: int = Field(512, ge=64, description="keypoint methods: longer image side")
    min_side: int = Field(256, ge=0, description="keypoint methods: images whose longer side is shorter are "
                          "enlarged to it, never past max_side (a thumbnail has too few keypoints; 0: never)")
    coarse_side: int = Field(0, ge=0, description="keypoint methods: also match both images shrunk to this longer "
                             "side (then enlarged to min_side) and keep the better count: blurred, pixelated or "
                             "shrunk copies keep their coarse structure (0: off; 128: 1.5 x the time per pair)")
    window: int = Field(4096, ge=1, description="queries verified at a time: the scratch store of described "
                        "images holds one window's queries and candidates (keypoints: ~80 kB an image at 384 px), "
                        "emptied before the next window; a candidate of two windows is described in both")
    mirror: bool = Field(True, description="keypoint methods: also match the query's mirror image (flipped copies)")
    min_inliers: int = Field(8, ge=0, description="no bonus below this many inliers")
    saturate: int = Field(40, ge=1, description="inliers at which the bonus is full")
    weight: float = Field(0.5, ge=0, description="full keypoint bonus added to the fused score")
    confirm: float = Field(0.1, ge=0, description="added at once to a pair with min_inliers inliers or more "
                           "(a confirmation is evidence however few inliers above the bar it has)")
    penalty: float = Field(0.05, ge=0, description="most subtracted from a checked pair with fewer than min_inliers "
                           "inliers, in proportion to the smaller image's keypoints")
    penalty_keypoints: int = Field(800, ge=1, description="keypoints at which the penalty is full")
    learned: LearnedVerifyConfig = LearnedVerifyConfig()
    combine: Literal["max", "sum"] = Field("max", description="learned+<keypoints>: how the two bonuses combine")


class IndexConfig(ConfigModel):
    """The living reference index (``copydet index``)."""

    chunk_images: int = Field(64, ge=1, description="images embedded and written per step of `index add`")
    merge_fanout: int = Field(4, ge=0, description="`index add` merges this many small shards of one size tier "
                              "into one, so that a request searches few shards (below 2: never merges)")
    num_workers: int = Field(1, ge=1, description="`index add` embeds its chunks on this many workers: one in the "
                             "command's process, more as Ray actors (the embedded local Ray, or --address)")
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved by each `index add` worker on Ray")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per `index add` worker (0: CPU; above 0 its models run on "
                            "the GPU, in the command's own process too)")


class ServeConfig(ConfigModel):
    """The query service (``copydet serve``): replicas, batching and request limits."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    num_replicas: int = Field(1, ge=1, description="model replicas (each holds the models and the index)")
    num_cpus: float = Field(0.5, gt=0, description="CPUs reserved by each replica")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (0: CPU; above 0 its models run on the GPU)")
    num_threads: int | None = Field(None, ge=1, description="torch threads per replica (None: torch's default)")
    max_batch_size: int = Field(8, ge=1, description="concurrent requests embedded as one batch")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="wait this long for a batch to fill")
    max_ongoing_requests: int = Field(64, ge=1, description="requests queued per replica")
    max_queued_requests: int = Field(256, ge=1, description="requests the HTTP proxy holds beyond what the "
                                     "replicas take; more get 503 (a burst must not grow memory without bound)")
    max_upload_bytes: int = Field(20 * 2**20, ge=1, description="larger uploads (each file of a batch) get 413")
    max_request_bytes: int = Field(128 * 2**20, ge=1, description="a larger multipart request (a batch) gets 413, "
                                   "counted as it arrives (a chunked body declares no length)")
    max_pixels: int = Field(50_000_000, ge=1, description="images declaring more pixels get 422 (bombs)")
    poll_s: float = Field(2.0, gt=0, description="how often replicas look for a newly published index version")
    threshold: float = Field(0.0, description="is_copy when the best score reaches this; used until the fuse "
                             "section carries a calibrated threshold. 0 suits normalised scores: a query "
                             "closer to a reference than to any train/ image")
    thumbnail_side: int = Field(256, ge=16, description="reference thumbnails on the match page")


class PipelineConfig(ConfigModel):
    name: str = "run"
    output: str = Field("runs/run", description="run folder (local path or pyarrow URI)")
    registry: str | None = Field(None, description="model registry folder (default: $COPYDET_REGISTRY or models/)")
    data: DataConfig = DataConfig()
    ray: RayConfig = RayConfig()
    patches: PatchSides = PatchSides()
    models: list[ModelEntry] = Field(min_length=1)
    extract: ExtractConfig = ExtractConfig()
    reduce: ReduceConfig = ReduceConfig()
    search: SearchConfig = SearchConfig()
    fuse: FuseConfig = FuseConfig()
    verify: VerifyConfig = VerifyConfig()
    index: IndexConfig = IndexConfig()
    serve: ServeConfig = ServeConfig()

    def model_keys(self) -> list[tuple[ModelEntry, int, str]]:
        """(entry, scale, key) for every model and scale; key names feature folders."""
        return [(m, s, f"{model_label(m.name)}{'-' + m.pool if m.pool else ''}@{s}")
                for m in self.models for s in m.scales]

    @model_validator(mode="after")
    def _concat_of_several(self) -> "PipelineConfig":
        if self.reduce.concat and not self.reduce.tag() and len(self.model_keys()) < 2:
            raise ValueError("reduce.concat joins two or more members (model x scale); this config has one, so "
                             "it would derive nothing: drop reduce.concat or add a member")
        return self

    @model_validator(mode="after")
    def _members_apart(self) -> "PipelineConfig":
        """Each member has its own feature folder, and fuse's per-member keys name members."""
        keys = [k for _, _, k in self.model_keys()]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise ValueError(f"models: {', '.join(twice)} made twice (one feature folder each): give each entry "
                             "another model, pool or scale")
        for section in ("thresholds", "calibration"):
            unknown = sorted(set(getattr(self.fuse, section)) - set(self.search_keys()))
            if unknown:
                raise ValueError(f"fuse.{section}: {', '.join(unknown)} is no member of this config (would be "
                                 f"ignored); its members: {', '.join(self.search_keys())}")
        return self

    def reduce_groups(self) -> list[tuple[list[str], str]]:
        """(source feature keys, derived key) per searched member when ``reduce`` is active."""
        keys = [k for _, _, k in self.model_keys()]
        groups = [keys] if self.reduce.concat else [[k] for k in keys]
        tag = self.reduce.tag()
        return [(g, "+".join(g) + (f"~{tag}" if tag else "")) for g in groups]

    def copy_threshold(self) -> float:
        """The score from which a served match counts as a copy: a calibrated ``fuse.threshold``
        when the config has a number, else ``serve.threshold``."""
        calibrated = self.fuse.threshold  # `auto` is estimated per batch run, not per request
        return float(calibrated) if isinstance(calibrated, float) else self.serve.threshold

    def decoys(self) -> bool:
        """Whether search and fuse score train/ decoys (``fuse.threshold: auto``, ensemble.decoys)."""
        return self.fuse.threshold == "auto"

    def whole_reference_index(self) -> bool:
        """Whether search needs a second index of whole references (``search.pairs: d2lv`` with
        reference patches other than the whole image)."""
        return self.search.pairs == "d2lv" and not self.patches.reference.whole_only()

    def search_keys(self) -> list[str]:
        """The feature keys that search and fuse work on."""
        if self.reduce.active:
            return [out for _, out in self.reduce_groups()]
        return [k for _, _, k in self.model_keys()]


def model_label(name: str) -> str:
    """A folder-safe label for a model name or checkpoint path."""
    return Path(name).stem if os.sep in name or name.endswith((".safetensors", ".pt", ".pth", ".onnx")) else name


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> PipelineConfig:
    """Read, override and validate a pipeline config (``None``: the smoke config)."""
    path = Path(path) if path else DEFAULT_CONFIG
    return validate(apply_overrides(read_yaml(path), list(overrides), PipelineConfig), source_of(path, overrides))


DATA_PATHS = ("root", "train", "references", "queries", "ground_truth")


def pinned_paths(raw: dict) -> dict:
    """A config mapping whose data folders and model registry are absolute paths, so that a command
    run from another folder (a run folder's config.yaml, a tuned config) reads the same images and
    models; the registry's default ($COPYDET_REGISTRY, else ./models) is resolved here."""
    data = raw.setdefault("data", {})
    data.update({k: os.path.abspath(v) for k, v in data.items() if k in DATA_PATHS and v and "://" not in v})
    if "://" not in (raw.get("registry") or ""):
        raw["registry"] = os.path.abspath(registry_path(raw.get("registry")))
    return raw


# a key that only another command's config has -> what that config is
OTHER_CONFIGS = {"pretrain": "a training config (copydet pretrain / finetune CONFIG)",
                 "finetune": "a training config (copydet pretrain / finetune CONFIG)",
                 "verifier": "a verifier training config (copydet train-verifier CONFIG)",
                 "synth": "a detector training config (copydet detector train CONFIG)"}


def validate(raw: dict, source: str = "config") -> PipelineConfig:
    other = next((what for key, what in OTHER_CONFIGS.items() if key in raw and "models" not in raw), None)
    if other:
        raise ConfigError(f"{source}: {other}, not a pipeline config such as configs/smoke.yaml")
    cfg = validate_as(PipelineConfig, raw, source)
    if cfg.data.root is None and not any([cfg.data.train, cfg.data.references, cfg.data.queries]):
        cfg.data.root = str(DEFAULT_SAMPLE)
    return cfg
