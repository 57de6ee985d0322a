"""Experiment trackers (``train.report_to``) through Accelerate's: TensorBoard, Weights & Biases,
MLflow.

``metrics.jsonl`` stays the record of the run; the trackers get the same scalars at the same
steps (``RunLogger`` sends them): every numeric field of a training record as ``train/<key>``
(``val/<part>`` as it is), every numeric eval metric as ``eval/<key>`` (nested groups joined
with ``/``), and the resolved config as hyperparameters (flattened to dotted keys, lists as
JSON). Only the main process logs (Accelerate's trackers run there).

The life cycle is Accelerate's: ``build`` makes the tracker objects that go into
``Accelerator(log_with=...)`` (``trainer.accel.start_runtime``), ``start`` runs
``accelerator.init_trackers`` once the run directory is ready, ``RunLogger`` logs to
``accelerator.trackers`` (what ``accelerator.log`` does, one tracker at a time, so that a failing
one costs neither the run nor the others: the loop's ``tracker_log``), and the runtime's
``accelerator.end_training()`` finishes them.

Where each writes:

* ``tensorboard``: ``OUTPUT_DIR/tensorboard`` (``tensorboard --logdir OUTPUT_DIR/tensorboard``);
  a resumed run purges the steps after its checkpoint, as before.
* ``wandb``: ``wandb.init(project=train.tracker_project, name=train.run_name)``; ``WANDB_MODE``
  decides online/offline (``WANDB_MODE=offline`` needs no network or account; ``wandb sync``
  uploads later); files under ``OUTPUT_DIR/wandb`` unless ``WANDB_DIR`` is set.
* ``mlflow``: experiment ``train.tracker_project`` (``MLFLOW_EXPERIMENT_NAME`` first), run
  ``train.run_name``, store ``MLFLOW_TRACKING_URI``. MLflow 3 refuses a file store unless
  ``MLFLOW_ALLOW_FILE_STORE=true``: a ``file:`` URI set in ``MLFLOW_TRACKING_URI`` is taken as that
  choice (the variable is set for it unless already set). MLflow metric names allow no ``@``:
  there ``R@1`` is logged as ``R_at_1`` (the one renaming).

A resumed run starts a new tracker run (same name); its steps continue from the checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

from mmpretrain.trainer.config import TRACKER_NAMES  # noqa: F401 (the names, with the config)

# name -> (module to import, pip requirement)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "mlflow": ("mlflow", "mlflow-skinny")}

PARAM_MAX_CHARS = 250
"""Config values longer than this (as text) reach the trackers as a short note (config.yaml has
them whole): MLflow drops long parameters, TensorBoard's hparams table cannot show them."""


class TrackerError(ValueError):
    """A tracker cannot be used as configured (one line; ``mmpretrain train`` exits 2)."""


def check_installed(names: list[str]) -> None:
    """Before any work: every tracker's package is importable, and MLflow's store can be used."""
    for name in names:
        module, pip = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise TrackerError(f"train.report_to includes {name!r} but the {module} package is not installed: "
                               f"pip install {pip}  (or pip install 'mmpretrain[trackers]' for all trackers)")
    if "mlflow" in names:
        _check_mlflow_store()


def _check_mlflow_store() -> None:
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri.startswith(("file:", "/", "./", "../", "~")):  # a local directory: a file store
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # the user chose a file store
        return
    if uri:
        return
    import mlflow

    resolved = mlflow.get_tracking_uri()  # MLflow 3: sqlite:///<cwd>/mlflow.db
    if resolved.startswith("sqlite") and importlib.util.find_spec("sqlalchemy") is None:
        raise TrackerError(f"train.report_to includes 'mlflow' and MLFLOW_TRACKING_URI is not set: MLflow's default "
                           f"store {resolved} needs the full package (pip install mlflow); with mlflow-skinny set "
                           "MLFLOW_TRACKING_URI to a server (http://...) or a local store "
                           "(MLFLOW_TRACKING_URI=file:./mlruns)")


def run_name(tcfg) -> str:
    return tcfg.run_name or Path(tcfg.output_dir).resolve().name


def mlflow_key(key: str) -> str:
    """A metric name MLflow accepts (letters, digits, ``_ - . / : space``): ``@`` -> ``_at_``."""
    return re.sub(r"[^\w\-./: ]", "_", key.replace("@", "_at_"))


def build(tcfg) -> list:
    """The Accelerate tracker objects for ``tcfg.report_to`` (``tcfg``: the train section;
    nothing started yet)."""
    names = list(tcfg.report_to)
    if not names:
        return []
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    class MLflow(MLflowTracker):
        """Accelerate's MLflow tracker with metric names MLflow accepts, logging asynchronously
        (a tracking server's round trip stays off the step; ``end_run`` waits for the queue)
        unless MLFLOW_ENABLE_ASYNC_LOGGING says otherwise."""

        def log(self, values: dict, step=None, **kwargs):
            if "MLFLOW_ENABLE_ASYNC_LOGGING" not in os.environ:
                kwargs.setdefault("synchronous", False)
            super().log({mlflow_key(k): v for k, v in values.items()}, step=step, **kwargs)

    out = Path(tcfg.output_dir)
    name = run_name(tcfg)
    trackers = []
    for tracker in names:
        if tracker == "tensorboard":
            # run_name '' -> exactly OUTPUT_DIR/tensorboard (the layout before trackers)
            trackers.append(TensorBoardTracker("", str(out / "tensorboard")))
        elif tracker == "wandb":
            kwargs = {"name": name}
            if not os.environ.get("WANDB_DIR"):
                kwargs["dir"] = str(out)
            trackers.append(WandBTracker(tcfg.tracker_project, **kwargs))
        elif tracker == "mlflow":
            trackers.append(MLflow(experiment_name=tcfg.tracker_project, run_name=name))
    return trackers


def flat_config(tree: dict, prefix: str = "") -> dict:
    """The config as ``{"section.key": value}`` with values every tracker stores: numbers, text
    and booleans as they are, anything else as JSON, long values as a note."""
    flat: dict = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
            continue
        if not isinstance(value, (bool, int, float, str)):
            value = json.dumps(value)
        if isinstance(value, str) and len(value) > PARAM_MAX_CHARS:
            value = f"({len(value)} characters: see config.yaml)"
        flat[prefix + key] = value
    return flat


def train_scalars(record: dict) -> dict:
    """A metrics.jsonl training record -> tracker scalars (``train/<key>``, ``val/...`` as is)."""
    out = {}
    for key, value in record.items():
        if key in ("step", "time") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[key if key.startswith("val/") else f"train/{key}"] = value
    return out


def eval_scalars(results: dict, prefix: str = "eval/") -> dict:
    """An eval result (``run_evaluation``'s dict) -> ``eval/<key>`` scalars, nested groups flattened."""
    out = {}
    for key, value in results.items():
        if key == "step" and prefix == "eval/":
            continue
        if isinstance(value, dict):
            out.update(eval_scalars(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[prefix + key] = value
    return out


def start(accelerator, cfg, start_step: int) -> None:
    """``accelerator.init_trackers`` with the flattened config (every rank: the trackers start on
    the main process only, and every rank learns whether they did, so a tracker that cannot start
    stops all ranks with one line)."""
    import torch

    from mmpretrain import distributed
    from mmpretrain.config import to_dict

    failed = ""
    if accelerator.log_with:
        for tracker in accelerator.log_with:
            if getattr(tracker, "name", "") == "tensorboard":
                tracker.init_kwargs["purge_step"] = start_step + 1  # a resume re-does the later steps
        try:
            accelerator.init_trackers(cfg.train.tracker_project, config=flat_config(to_dict(cfg)))
        except Exception as e:  # noqa: BLE001 - any failure of a third-party start-up is reported in one line
            failed = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    flag = torch.tensor(float(bool(failed)), device=accelerator.device)
    if float(distributed.global_mean(flag)) > 0:
        # end what did start; end_training() (the runtime's teardown) then has nothing half-started
        for tracker in list(accelerator.trackers):
            try:
                tracker.finish()
            except Exception:  # noqa: BLE001 - the tracker that failed to start has nothing to finish
                pass
        accelerator.trackers.clear()
        raise TrackerError(f"train.report_to={list(cfg.train.report_to)}: a tracker failed to start"
                           + (f" ({failed})" if failed else " on the main process"))


def where(accelerator) -> list[str]:
    """One line per started tracker: where its data is and how to look at it."""
    lines = []
    for tracker in getattr(accelerator, "trackers", []):
        name = getattr(tracker, "name", "")
        try:
            if name == "tensorboard":
                lines.append(f"tensorboard --logdir {tracker.logging_dir.rstrip('/')}")
            elif name == "wandb":
                run = tracker.run
                if run.offline:  # run.dir is RUN_DIR/files
                    lines.append(f"wandb (offline): wandb sync {Path(run.dir).parent}")
                else:
                    lines.append(f"wandb: {run.url}")
            elif name == "mlflow":
                import mlflow

                info = tracker.active_run.info
                lines.append(f"mlflow: run {info.run_id} (experiment {info.experiment_id}) at "
                             f"{mlflow.get_tracking_uri()}")
        except Exception:  # noqa: BLE001 - a summary line never fails a finished run
            lines.append(name)
    return lines
