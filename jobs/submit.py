"""Run copydet as a Ray Job on a cluster (Ray Jobs SDK), and follow, inspect or stop it.

The job's working directory is this repository (minus .venv, runs, models, .git), so the
cluster runs exactly the code that submitted it; the entrypoint runs ``jobs.cli.main`` on
``STAGE CONFIG --address auto``, which connects the job's driver to the cluster it runs on.
A config outside the repository is copied into it for the upload and removed afterwards.
"""
from __future__ import annotations

import asyncio
import os
import shlex
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from core.yamlconf import read_yaml, with_output
from jobs.config import ConfigError, PipelineConfig, load_config
from jobs.runtime import OFFLINE_ENV

if TYPE_CHECKING:  # torch-free at import: `copydet status`, `logs` and `stop` start in a second
    from ray.job_submission import JobSubmissionClient

    from pretrain.train_config import TrainConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
# "/x": top level only
EXCLUDES = ["/.venv", "/runs", "/models", "/.git", "**/__pycache__", "*.egg-info", ".pytest_cache"]
STAGING = ".submit"  # configs from outside the repo are copied here while the job is uploaded
# The driver's ray.init repeats the offline env vars; let the job's copy win instead of failing.
JOB_ENV = {**OFFLINE_ENV, "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1", "COPYDET_DEBUG": "1"}
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TRAIN_STAGES = ("pretrain", "finetune", "train-verifier")  # `copydet STAGE TRAINING_CONFIG` as a job
CLI_MAIN = "import sys; from jobs.cli import main; sys.exit(main())"  # works without the console script


@dataclass(frozen=True)
class JobSpec:
    """Everything ``submit_job`` needs; built without touching the cluster (testable)."""

    entrypoint: str
    runtime_env: dict
    metadata: dict


def job_address(address: str | None) -> str:
    """The Jobs API (dashboard) address: the argument, else $RAY_ADDRESS, else localhost."""
    return address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def _shared(value: str | None) -> bool:
    return value is None or "://" in value or os.path.isabs(value)


def check_locations(cfg: PipelineConfig, source: str) -> list[str]:
    """Refuse an output folder or registry the cluster cannot share; return warnings for local data
    paths and registered models without a registry.

    The job runs in a temporary copy of the repository on the head node, so a relative
    ``output`` would be written there and lost; data paths must exist on every node.
    """
    if not _shared(cfg.output):
        raise ConfigError(f"{source}: output {cfg.output!r} is a relative local path; a submitted job runs in "
                          "a temporary working dir on the cluster, so pass --out with an absolute path on "
                          "shared storage or a URI (s3://..., gs://...)")
    if not _shared(cfg.registry):
        raise ConfigError(f"{source}: registry {cfg.registry!r} is a relative local path; the job resolves it in its "
                          "temporary working dir on the cluster (models/ is not uploaded): use an absolute path on "
                          "shared storage")
    from core.models.backbones import list_backbones

    warnings = []
    registered = [m.name for m in cfg.models if m.name not in list_backbones() and not os.path.isabs(m.name)]
    if cfg.registry is None and registered:
        warnings.append(f"{source}: no registry set; {registered} resolve in the job's working dir on the cluster, "
                        "where only SSCD is fetched on first use: set registry to an absolute path on shared storage")
    for key in ("root", "train", "references", "queries", "ground_truth"):
        value = getattr(cfg.data, key)
        if value and "://" not in value and not os.path.isabs(value):
            warnings.append(f"{source}: data.{key} {value!r} is relative; it resolves inside the job's temporary "
                            "working dir on the cluster, and the run folder records that copy, gone after the job: "
                            "use an absolute path on shared storage")
    if cfg.ray.num_cpus is not None:
        warnings.append(f"{source}: ray.num_cpus is ignored when the job connects to a cluster")
    return warnings


def check_train_locations(cfg: TrainConfig, source: str) -> list[str]:
    """A training job's run folders, registry and photos must be on storage every node shares."""
    init = cfg.finetune.init  # random | byol | a registry name (no "/") | a checkpoint path
    checkpoint = init if "/" in init or os.path.isfile(init) else None
    for key, value in (("output", cfg.output), ("registry", cfg.registry), ("data.train", cfg.data.train),
                       ("finetune.init", checkpoint)):
        if not _shared(value):
            raise ConfigError(f"{source}: {key} {value!r} is a relative local path; a submitted training job "
                              "runs on several nodes, so use an absolute path on shared storage")
    return [] if cfg.registry else [f"{source}: no registry set; models land in the job's temporary working dir"]


def entrypoint(stage: str, config_rel: str, sets: Sequence[str] = (), out: str | None = None,
               reuse: str | None = None) -> str:
    """The shell command the job runs, with every argument quoted."""
    argv = ["python", "-c", CLI_MAIN, stage, config_rel, "--address", "auto"]
    for s in sets:
        argv += ["--set", s]
    argv += ["--out", out] if out else []
    argv += ["--reuse", reuse] if reuse else []
    return shlex.join(argv)


@contextmanager
def staged_config(config: str, root: Path = REPO_ROOT) -> Iterator[str]:
    """Yield the config's path relative to ``root``; a config outside it is copied in (and removed
    after), the configs it ``extends`` merged into the copy."""
    path = Path(config).resolve()
    if path.is_relative_to(root):
        yield path.relative_to(root).as_posix()
        return
    staged = root / STAGING / f"{uuid.uuid4().hex[:8]}-{path.name}"
    staged.parent.mkdir(exist_ok=True)
    staged.write_text(yaml.safe_dump(read_yaml(path), sort_keys=False))  # what it extends is not uploaded: merged in
    try:
        yield staged.relative_to(root).as_posix()
    finally:
        staged.unlink(missing_ok=True)  # the folder stays: removing it races another submit's copy


def job_spec(config_rel: str, stage: str, sets: Sequence[str], out: str | None,
             root: Path = REPO_ROOT, reuse: str | None = None) -> JobSpec:
    return JobSpec(
        entrypoint=entrypoint(stage, config_rel, sets, out, reuse),
        runtime_env={"working_dir": str(root), "excludes": list(EXCLUDES), "env_vars": dict(JOB_ENV)},
        metadata={"copydet_stage": stage, "copydet_config": config_rel},
    )


def submit(config: str | None, address: str | None, stage: str = "run", sets: Sequence[str] = (),
           out: str | None = None, client_factory: Callable | None = None,
           warn: Callable[[str], None] = print, reuse: str | None = None) -> str:
    """Validate the config locally, upload the repo + config and start the job; returns its id.
    ``reuse``: the run folder whose shards the run starts from (``copydet run --reuse``)."""
    from ray.job_submission import JobSubmissionClient

    config = config or str(REPO_ROOT / "configs" / "smoke.yaml")
    overrides = with_output(sets, out)
    if reuse and (stage != "run" or not os.path.isabs(reuse)):  # hard links: no URI
        raise ConfigError(f"--reuse {reuse}: the whole run (--stage run) starts from a run folder's shards, given "
                          "as an absolute path on storage the cluster's nodes share")
    if stage in TRAIN_STAGES:
        from pretrain.train_config import load_train_config  # torch and timm: only a training job's config needs them

        if out:
            raise ConfigError(f"--stage {stage}: set the training output with --set output=PATH, not --out")
        warnings = check_train_locations(load_train_config(config, overrides), config)
    else:
        warnings = check_locations(load_config(config, overrides), config)
    for w in warnings:
        warn(f"warning: {w}")
    client = (client_factory or JobSubmissionClient)(job_address(address))
    with staged_config(config) as rel:
        spec = job_spec(rel, stage, sets, out, reuse=reuse)
        return client.submit_job(entrypoint=spec.entrypoint, runtime_env=spec.runtime_env,
                                 metadata=spec.metadata)


def client(address: str | None) -> JobSubmissionClient:
    """Ray's Jobs client of the cluster at ``address`` (:func:`job_address`)."""
    from ray.job_submission import JobSubmissionClient
    return JobSubmissionClient(job_address(address))


def job_status(job_id: str, address: str | None) -> str:
    """``STATUS message`` of a job (e.g. ``SUCCEEDED Job finished successfully.``)."""
    info = client(address).get_job_info(job_id)
    return f"{info.status.value} {info.message or ''}".strip()


def job_logs(job_id: str, address: str | None, follow: bool = False,
             write: Callable[[str], None] = lambda s: print(s, end="", flush=True)) -> None:
    """Print a job's logs; with ``follow``, stream them until the job ends."""
    c = client(address)
    if not follow:
        write(c.get_job_logs(job_id))
        return

    async def tail() -> None:
        async for chunk in c.tail_job_logs(job_id):
            write(chunk)

    asyncio.run(tail())


def stop_job(job_id: str, address: str | None) -> bool:
    """Ask the cluster to stop a job; False if it had already ended."""
    return client(address).stop_job(job_id)
