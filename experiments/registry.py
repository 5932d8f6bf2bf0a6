"""Register an exported cell in MLflow's model registry (``make pick|export ... REGISTER=<name>``).

The exported folder is logged as an MLflow model with the ``sentence_transformers`` flavour into the training run
(so the version links to it), with an input example, a signature (texts in, ``dim`` floats out; a ``prompt_name``
parameter defaulting to the run's query prompt) and the run's prompts as metadata; a new version of ``<name>`` is
registered with the cell, its scores and costs as version tags. ``mlflow.sentence_transformers.load_model`` returns
the exported ``SentenceTransformer``; ``mlflow.pyfunc.load_model(...).predict(texts)`` its query embeddings.
"""

from __future__ import annotations

from pathlib import Path

EXAMPLE = ["The file could not be opened.", "Die Datei konnte nicht geöffnet werden."]


class RegistryError(ValueError):
    """A registration that cannot be done (no MLflow run for the training run); the message says why."""


def version_tags(cell_name: str, mode: str, scores: dict[str, float], costs: dict[str, float | None],
                 extra: dict[str, str] | None = None) -> dict[str, str]:
    """Tags of a registered version: ``cell``, ``mode``, ``score.<task>``, ``cost.<key>`` (keys of
    :data:`lightning_modules.costs.COSTS` that have a number) and ``extra``."""
    tags = {"cell": cell_name, "mode": mode}
    tags |= {f"score.{task}": f"{value:.4f}" for task, value in scores.items()}
    tags |= {f"cost.{key}": f"{value:.1f}" if isinstance(value, float) else str(value)
             for key, value in costs.items() if value is not None}
    return tags | (extra or {})


def register(export_path: Path, name: str, tracking_uri: str, run_id: str, tags: dict[str, str]):
    """Logs ``export_path`` (an exported cell) into the MLflow run ``run_id`` and registers it as a new version of
    ``name`` carrying ``tags``; returns the ``ModelVersion``."""
    import mlflow
    import mlflow.sentence_transformers
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    from lightning_modules.cell_export import load_exported

    if not name or "/" in name or ":" in name:
        raise RegistryError(f"REGISTER={name!r} is not a model name (no '/' or ':')")
    model = load_exported(export_path)
    prompts = {key: value for key, value in model.prompts.items() if value}
    params = {"prompt_name": "query"} if "query" in prompts else None
    signature = infer_signature(EXAMPLE, model.encode(EXAMPLE, **(params or {})), params=params)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    try:
        client.get_run(run_id)
    except mlflow.exceptions.MlflowException as error:
        raise RegistryError(f"no MLflow run {run_id} in {tracking_uri} to link the version to ({error})") from None
    with mlflow.start_run(run_id=run_id):
        logged = mlflow.sentence_transformers.log_model(
            model, name=f"cell-{tags['cell'].replace('/', '-')}", input_example=EXAMPLE, signature=signature,
            metadata={"prompts": prompts, "cell": tags["cell"]}, registered_model_name=name,
            await_registration_for=60)
    version = client.get_model_version(name, logged.registered_model_version)
    for key, value in {**tags, **{f"prompt.{key}": value for key, value in prompts.items()}}.items():
        client.set_model_version_tag(name, version.version, key, value)
    client.update_model_version(name, version.version,
                                description=f"cell {tags['cell']} of MLflow run {run_id} (exported from {export_path})")
    return client.get_model_version(name, version.version)
