"""The ``vaeguard`` command group (click)."""

from __future__ import annotations

import difflib
import functools
import json
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import click

from vaeguard import __version__
from vaeguard.detector import decision, is_outlier
from vaeguard.plugins import PluginError, PluginRegistry, get_plugin_manager, register_commands
from vaeguard.storage import atomic_write

if TYPE_CHECKING:  # for type hints only: this module reaches the estimator lazily
    from vaeguard.estimators import VAEAnomalyDetector


class UserError(click.ClickException):
    """A one-line error a user can act on; exit code 2, no traceback."""

    exit_code = 2


class _CommandGroup(click.Group):
    """The command group; plugins' commands are added on first need (a name that is not built in, or the
    list of commands), so that the built-in commands, ``--version`` and ``--help`` of a command do not
    import every plugin (and torch with them)."""

    plugins_loaded = False

    def load_plugin_commands(self) -> None:
        if self.plugins_loaded:
            return
        self.plugins_loaded = True
        try:
            register_commands(self)
        except Exception as exc:  # a broken plugin must not take every command down
            click.echo(f"warning: plugin commands not loaded: {exc}", err=True)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands:
            self.load_plugin_commands()
        return super().get_command(ctx, cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        self.load_plugin_commands()
        return super().list_commands(ctx)


@click.group(cls=_CommandGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vaeguard")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """vaeguard: variational autoencoders that score data by log-likelihood.

    \b
    Examples:
      vaeguard demo                                 train on the shipped thyroid data, show the anomalies
      vaeguard fit train.csv -o model.h5 --id-column id
      vaeguard score model.h5 big.parquet -o scores.parquet --explain
      vaeguard evaluate model.h5 test.csv --label-column label
      vaeguard report model.h5 test.csv -o report.html
      vaeguard plugins --json                       list plugins and the parts they register
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the errors a user can cause (bad files, bad values, bad settings) into one line and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default", UserWarning)
            try:
                return command(*args, **kwargs)
            except BrokenPipeError:
                raise
            except (ValueError, OSError, PluginError) as exc:
                ctx = click.get_current_context(silent=True)
                if ctx is not None and (ctx.find_root().obj or {}).get("debug"):
                    traceback.print_exc()
                message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise UserError(message) from exc
            finally:
                _echo_warnings(caught)

    return wrapper


def _echo_warnings(caught: list[warnings.WarningMessage]) -> None:
    """The data warnings a command raised (a cell that is not a number, ...), one line each on stderr."""
    for item in caught:
        if issubclass(item.category, UserWarning):
            click.echo(f"warning: {str(item.message).splitlines()[0]}", err=True)
        else:
            warnings.showwarning(item.message, item.category, item.filename, item.lineno)


def _progress(total: int | None, show: bool, unit: str = "rows") -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, unit_scale=True, disable=not show, file=sys.stderr, dynamic_ncols=True)


#: Environment variables holding the key that signs model files written by ``fit``, and the keys whose
#: signatures every command that reads a model file accepts (whitespace-separated). Unset: no signing, no check.
SIGNING_KEY_VARIABLE = "VAEGUARD_SIGNING_KEY"
TRUSTED_KEYS_VARIABLE = "VAEGUARD_TRUSTED_KEYS"


def _trusted_keys() -> list[str] | None:
    keys = os.environ.get(TRUSTED_KEYS_VARIABLE, "").split()
    return keys or None


def _load_model(path: str, device: str = "auto", jobs: int | None = None) -> Any:
    """The detector in a model file; ``jobs`` (``--jobs``), where given, replaces its ``n_jobs``."""
    from vaeguard.persistence import load

    det = load(path, device=device, trusted_keys=_trusted_keys())
    if jobs is not None:
        det.set_params(n_jobs=jobs)
    return det


def _jobs_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--jobs N``: the estimator's ``n_jobs`` (torch threads) for this command."""

    def checked(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
        from vaeguard.detector import threads_for

        if value is not None:
            try:
                threads_for(value)
            except ValueError as exc:
                raise UserError(f"--jobs: {exc}") from None
        return value

    return click.option(
        "--jobs",
        type=int,
        default=None,
        callback=checked,
        help="Torch threads (the estimator's n_jobs): 1 unless the model says otherwise; -1 every CPU. More than "
        "one pays on an idle machine for images and wide tables, and slows everything on a busy one.",
    )(command)


def _parse_param(values: tuple[str, ...], allowed: Iterable[str] | None = None) -> dict[str, Any]:
    """``--param KEY=VALUE`` items as a dict (VALUE read as JSON where it is JSON); with ``allowed``, a KEY
    outside it is a one-line :class:`UserError` that names the nearest allowed keys."""
    params: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--param")
        if allowed is not None and key not in allowed:
            names = sorted(allowed)
            near = difflib.get_close_matches(key, names, n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(map(repr, near))}? " if near else ""
            raise UserError(f"--param {key}: no such parameter; {hint}the parameters are {', '.join(names)}")
        try:
            params[key] = json.loads(raw)
        except json.JSONDecodeError:
            params[key] = raw
    return params


def _estimator_params(values: tuple[str, ...]) -> dict[str, Any]:
    """``vaeguard fit``'s ``--param`` items, checked against the estimator's constructor arguments."""
    from vaeguard.estimators import VAEAnomalyDetector

    return _parse_param(values, VAEAnomalyDetector._get_param_names())


@cli.command(name="fit")
@click.argument("data")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Model file to write (.h5).")
@click.option("--config", "preset", help="A preset name (see configs/) or a .toml file.")
@click.option("--columns", help="Comma-separated columns to train on (default: all but --id-column).")
@click.option("--id-column", help="A column that identifies rows; not a feature.")
@click.option(
    "--condition-columns",
    help="Comma-separated columns that condition the model (a conditional VAE of the other columns given these); "
    "scoring then reads them from the file too.",
)
@click.option(
    "--max-rows",
    type=click.IntRange(1),
    default=1_000_000,
    show_default=True,
    help="Train on a uniform random sample of this many rows when the file holds more (said on stderr).",
)
@click.option(
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="A constructor argument, e.g. --param epochs=50 --param likelihood=gaussian (repeatable).",
)
@click.option(
    "--contamination",
    type=click.FloatRange(0, 0.5, min_open=True),
    help="The threshold flags this share of the training rows (the estimator's contamination; default 0.1).",
)
@click.option("--offset", type=float, help="The threshold itself, in nats of log p(x): rows scoring below are flagged.")
@click.option("--seed", type=int, default=0, show_default=True, help="random_state of the model and the sampling.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Training progress on stderr (default: on): a bar on a terminal, else a line every tenth of the epochs.",
)
@click.option(
    "--nproc-per-node",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Train across N processes on this machine (PyTorch DDP: gloo on CPU, NCCL with one GPU per process); "
    "--param batch_size is then the global batch. Rank 0 writes the model file.",
)
@_jobs_option
@user_errors
def fit_command(
    data: str,
    output: str,
    preset: str | None,
    columns: str | None,
    id_column: str | None,
    condition_columns: str | None,
    max_rows: int,
    params: tuple[str, ...],
    contamination: float | None,
    offset: float | None,
    seed: int,
    device: str,
    progress: bool | None,
    nproc_per_node: int,
    jobs: int | None,
) -> None:
    """Train a model on DATA (CSV, Parquet, FILE.h5:/DATASET or FILE.npz:ARRAY) and write it to a model file.

    \b
    Examples:
      vaeguard fit train.csv -o model.h5
      vaeguard fit train.csv -o model.h5 --contamination 0.02
      vaeguard fit train.parquet -o model.h5 --id-column id --config tabular-fast
      vaeguard fit digits.npz:images -o digits.h5 --param epochs=100
      vaeguard fit sales.csv -o sales.h5 --condition-columns shop,weekday
      vaeguard fit big.parquet -o big.h5 --nproc-per-node 4
      torchrun --standalone --nproc-per-node 4 -m vaeguard fit big.parquet -o big.h5
    """
    settings = _estimator_params(params)  # a malformed or unknown --param is one line here (not one per process)
    if contamination is not None and offset is not None:
        raise UserError("--contamination and --offset both set the threshold: give one")
    for name, value in (("contamination", contamination), ("offset", offset)):
        if name in settings and value is not None:
            raise UserError(f"--{name} and --param {name} both given: give one")
    options = dict(click.get_current_context().params)
    del options["nproc_per_node"]
    options["progress"] = progress is not False  # a bar on a terminal, a line per tenth of the epochs in a log
    if nproc_per_node == 1:
        _fit_to_file(**options)
        return
    from vaeguard.ddp import DistributedError, launch

    try:
        launch(fit_worker, (options,), nproc_per_node)
    except DistributedError as exc:
        raise click.ClickException(str(exc)) from None


def fit_worker(options: dict[str, Any]) -> None:
    """One process of ``vaeguard fit --nproc-per-node N``: the fit of :func:`fit_command` as one rank."""
    import torch.distributed

    try:
        _fit_to_file(**options)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _fit_to_file(
    data: str,
    output: str,
    preset: str | None,
    columns: str | None,
    id_column: str | None,
    condition_columns: str | None,
    max_rows: int,
    params: tuple[str, ...],
    contamination: float | None,
    offset: float | None,
    seed: int,
    device: str,
    progress: bool,
    jobs: int | None,
) -> None:
    """Read DATA, fit, write the model file (in a process group: every rank fits, rank 0 reports and writes)."""
    import pandas as pd

    from vaeguard.data import Source, read_all
    from vaeguard.ddp import current_group
    from vaeguard.estimators import VAEAnomalyDetector, resolve_device

    source = Source.parse(data)
    frame, total = read_all(source, max_rows=max_rows, seed=seed)
    group = current_group(resolve_device(device))  # under torchrun: join its group (NCCL for CUDA, else gloo)
    main_rank = group is None or group.is_main
    if len(frame) < total and main_rank:
        click.echo(f"{source}: {total} rows; training on a random sample of {len(frame)} (--max-rows)", err=True)
    conditioned = [c.strip() for c in condition_columns.split(",")] if condition_columns else []
    conditions = None
    if isinstance(frame, pd.DataFrame):
        _check_named(frame, [id_column] if id_column else [], source)
        _check_named(frame, conditioned, source)
        if columns:
            features = [c.strip() for c in columns.split(",")]
        else:
            features = [c for c in frame.columns if c != id_column and c not in conditioned]
        _check_named(frame, features, source)
        overlap = sorted(set(features) & set(conditioned))
        if overlap:
            raise click.UsageError(f"column(s) {', '.join(map(repr, overlap))} cannot be both features and conditions")
        conditions = frame[conditioned] if conditioned else None
        frame = frame[features]
    elif columns or id_column or conditioned:
        raise click.UsageError("--columns, --id-column and --condition-columns are for tables; this file holds images")
    settings = {"random_state": seed, "device": device, "verbose": progress, **_estimator_params(params)}
    if jobs is not None:
        settings["n_jobs"] = jobs
    if contamination is not None:
        settings["contamination"] = contamination
    if offset is not None:
        settings["offset"] = offset
    if conditions is not None:
        settings["conditional"] = True
    det = VAEAnomalyDetector.from_config(preset, **settings) if preset else VAEAnomalyDetector(**settings)
    det.fit(frame, conditions)
    if main_rank:
        digest = det.save(output, signing_key=os.environ.get(SIGNING_KEY_VARIABLE) or None)
        click.echo(
            f"wrote {output} (sha256 {digest[:12]}): {len(frame)} rows, {det.n_features_in_} features, "
            f"latent_dim={det.latent_dim_}, threshold {det.offset_:.3f} nats ({det.threshold_rule_['rule']})",
            err=True,
        )
    if group is not None:  # leave together: a rank that exits while another still writes can abort in gloo
        group.finish()


def _show(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress


def _write_npz(path: str, **arrays: Any) -> None:
    """A compressed .npz written atomically (numpy would add ".npz" to a temporary name, so it gets a handle)."""
    import numpy as np

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)

    atomic_write(path, write)


def _check_named(frame: Any, names: list[str], source: Any) -> None:
    missing = [n for n in names if n not in frame.columns]
    if missing:
        shown = ", ".join(map(repr, list(frame.columns)[:10]))
        raise click.UsageError(f"{source} has no column(s) {', '.join(map(repr, missing))}; its columns: {shown}")


#: ``vaeguard score`` options the Dask engine does not implement: option name → (flag, the value it may keep).
LOCAL_ONLY_OPTIONS = {
    "explain": ("--explain", False),
    "resume": ("--resume", False),
    "on_bad_row": ("--on-bad-row", "error"),
    "chunk_rows": ("--chunk-rows", None),
    "progress": ("--progress/--no-progress", None),
    "jobs": ("--jobs", None),
}


def _refuse_local_only_options() -> None:
    """One line (exit 2) for any option given with ``--engine dask`` that the Dask engine would not honour.

    Under Dask each partition is scored whole (no chunks to resume, no progress bar) and a
    row that cannot be scored stops the job, as ``--on-bad-row error`` does locally.
    """
    ctx = click.get_current_context()
    given = [
        flag
        for name, (flag, allowed) in LOCAL_ONLY_OPTIONS.items()
        if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)
        and (allowed is None or ctx.params[name] != allowed)
    ]
    if given:
        raise click.UsageError(
            f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} not available with --engine dask "
            "(partitions are scored whole, and a bad row stops the job); use --engine local for "
            f"{'it' if len(given) == 1 else 'them'}"
        )


@cli.command(name="score")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("data")
@click.option("-o", "--output", required=True, help="Results file (.csv or .parquet), or - for CSV on stdout.")
@click.option("--id-column", help="Copy this column to the output's id column (default: the row number).")
@click.option(
    "--explain",
    is_flag=True,
    help="Add top_features: the 3 columns most unusual for their column, given the rest of the row.",
)
@click.option("--n-samples", type=click.IntRange(1), help="K, importance samples per row (default: the model's).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option(
    "--chunk-rows",
    type=click.IntRange(1),
    default=10_000,
    show_default=True,
    help="Rows per chunk: memory grows with it, not with the file; --resume restarts after the last whole chunk.",
)
@click.option("--resume", is_flag=True, help="Continue a run that was stopped, after its last complete chunk.")
@click.option(
    "--on-bad-row",
    type=click.Choice(["error", "skip", "nan"]),
    default="error",
    show_default=True,
    help="A row that cannot be scored: stop (exit 2), leave it out, or give it NaN scores.",
)
@click.option("--engine", type=click.Choice(["local", "dask"]), default="local", show_default=True)
@click.option(
    "--scheduler",
    default="local",
    show_default=True,
    help="With --engine dask: a scheduler address, or 'local' for a LocalCluster.",
)
@click.option("--progress/--no-progress", default=None, help="Rows/s and ETA on stderr (default: on a terminal).")
@_jobs_option
@user_errors
def score_command(
    model: str,
    data: str,
    output: str,
    id_column: str | None,
    explain: bool,
    n_samples: int | None,
    device: str,
    chunk_rows: int,
    resume: bool,
    on_bad_row: str,
    engine: str,
    scheduler: str,
    progress: bool | None,
    jobs: int | None,
) -> None:
    """Score DATA with MODEL in chunks: log-likelihood (nats), its error and k̂, the outlier flag per row.

    Memory stays flat whatever the file's size. The output appears under its name only
    when complete; a stopped run can be continued with --resume.

    \b
    Examples:
      vaeguard score model.h5 big.csv -o scores.parquet --id-column id
      vaeguard score model.h5 big.csv -o - --explain | head
      vaeguard score model.h5 big.csv -o scores.csv --resume --on-bad-row skip
      vaeguard score model.h5 'parts/*.parquet' -o scores.parquet --engine dask --scheduler local
    """
    if engine == "dask":
        _refuse_local_only_options()
        from vaeguard.distributed import score_files

        rows = score_files(
            model, data, output, scheduler=scheduler, id_column=id_column, n_samples=n_samples, device=device
        )
        click.echo(f"scored {rows} rows with dask into {output}", err=True)
        return
    from vaeguard.batch import score_file
    from vaeguard.data import Source, count_rows

    det = _load_model(model, device, jobs)
    source = Source.parse(data)
    show = _show(progress)
    total = count_rows(source) if show else None  # a pass over the file, only for the ETA
    with _progress(total, show) as bar:
        run = score_file(
            det,
            source,
            None if output == "-" else output,
            chunk_rows=chunk_rows,
            id_column=id_column,
            n_samples=n_samples,
            explain=explain,
            on_bad_row=on_bad_row,
            resume=resume,
            progress=bar.update,
            notify=lambda message: click.echo(message, err=True),
            stream=sys.stdout,
        )
    if run.skipped:
        verb = "left out" if on_bad_row == "skip" else "given NaN scores"
        click.echo(f"{run.skipped} row(s) could not be scored and were {verb} (--on-bad-row {on_bad_row})", err=True)
    if output != "-":
        written = run.rows - (run.skipped if on_bad_row == "skip" else 0)
        click.echo(f"scored {written} rows into {output}", err=True)


@cli.command(name="threshold")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("data")
@click.option(
    "--fpr",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    required=True,
    help="The share of DATA's rows (all normal) that the threshold flags: the false-positive rate.",
)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Model file to write (default: MODEL, replaced).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@_jobs_option
@user_errors
def threshold_command(model: str, data: str, fpr: float, output: str | None, device: str, jobs: int | None) -> None:
    """Set MODEL's threshold from rows known to be normal: a share FPR of them is flagged.

    What set_threshold does in Python: the threshold becomes the 100·FPR percentile of
    DATA's log-likelihoods, whatever the training data's contamination. The model file is
    written atomically (a crash leaves the old one).

    \b
    Example:
      vaeguard threshold model.h5 normal.csv --fpr 0.01
    """
    from vaeguard.batch import check_columns, condition_columns, feature_columns
    from vaeguard.data import Source, read_all
    from vaeguard.estimators import VAEAnomalyDetector

    det = _load_model(model, device, jobs)
    if not isinstance(det, VAEAnomalyDetector):
        raise UserError(f"{model} holds a {type(det).__name__}; set its threshold from Python")
    source = Source.parse(data)
    frame, _ = read_all(source)
    columns, conditioned = feature_columns(det), condition_columns(det)
    conditions = None
    if columns is not None:
        check_columns(det, [str(c) for c in frame.columns], str(source))
        conditions = None if conditioned is None else frame[conditioned]
        frame = frame[columns]
    before = det.offset_
    det.set_threshold(frame, fpr=fpr, condition=conditions)
    target = output or model
    digest = det.save(target, signing_key=os.environ.get(SIGNING_KEY_VARIABLE) or None)
    click.echo(
        f"wrote {target} (sha256 {digest[:12]}): threshold {before:.3f} -> {det.offset_:.3f} nats, flagging "
        f"{fpr:.2%} of the {len(frame)} normal rows of {source}",
        err=True,
    )


@cli.command(name="evaluate")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("data")
@click.option("--label-column", required=True, help="The ground truth: non-zero / true = anomaly.")
@click.option("--n-samples", type=click.IntRange(1), help="K, importance samples per row (default: the model's).")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option(
    "--fpr",
    "target_fpr",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    help="Also print the threshold that flags this share of DATA's normal rows, and what it catches.",
)
@click.option(
    "--recall",
    "target_recall",
    type=click.FloatRange(0, 1, min_open=True),
    help="Also print the lowest threshold that flags this share of DATA's anomalies, and its false positives.",
)
@_jobs_option
@user_errors
def evaluate_command(
    model: str,
    data: str,
    label_column: str,
    n_samples: int | None,
    device: str,
    as_json: bool,
    target_fpr: float | None,
    target_recall: float | None,
    jobs: int | None,
) -> None:
    """Measure how well MODEL's scores find the anomalies labelled in DATA.

    Prints AUROC and average precision of the log-likelihood (lower = more anomalous),
    and precision and recall of is_outlier at the model's threshold.

    With --fpr or --recall it also prints the threshold that would flag that share of the
    normal rows (or catch that share of the anomalies), with the precision, recall and
    false-positive rate there; `vaeguard threshold` or --offset at fit sets it.

    \b
    Examples:
      vaeguard evaluate model.h5 test.csv --label-column is_anomaly --json
      vaeguard evaluate model.h5 test.csv --label-column is_anomaly --fpr 0.01 --recall 0.9
    """
    import numpy as np
    from sklearn.metrics import average_precision_score, roc_auc_score

    from vaeguard.batch import check_columns, score_chunk
    from vaeguard.data import Source, iter_chunks

    det = _load_model(model, device, jobs)
    source = Source.parse(data)
    scores, labels = [], []
    offset = 0
    for chunk in iter_chunks(source, 50_000):
        if offset == 0:
            if label_column not in chunk.columns:
                raise click.UsageError(f"{source} has no column {label_column!r} for --label-column")
            check_columns(det, [str(c) for c in chunk.columns], str(source))
        label = chunk[label_column]
        if label.isna().any():
            raise click.UsageError(f"{source}: row {offset + int(np.flatnonzero(label.isna())[0])} has no label")
        results, _ = score_chunk(det, chunk, row_offset=offset, n_samples=n_samples)
        scores.append(results["log_likelihood"].to_numpy())
        labels.append(label.astype(bool).to_numpy() if label.dtype == bool else label.to_numpy() != 0)
        offset += len(chunk)
    log_px, y = np.concatenate(scores), np.concatenate(labels)
    if y.all() or not y.any():
        raise click.UsageError(f"{label_column!r} holds only one class; AUROC needs both normal and anomalous rows")
    flagged = is_outlier(decision(log_px, det.offset_))
    metrics = {
        "rows": len(y),
        "anomalies": int(y.sum()),
        "auroc": float(roc_auc_score(y, -log_px)),
        "average_precision": float(average_precision_score(y, -log_px)),
        "threshold": float(det.offset_),
        "flagged": int(flagged.sum()),
        "precision_at_threshold": float(y[flagged].mean()) if flagged.any() else None,
        "recall_at_threshold": float(flagged[y].mean()),
    }
    targets = {}
    if target_fpr is not None:
        targets[f"threshold_for_fpr_{target_fpr:g}"] = threshold_for_fpr(log_px[~y], target_fpr)
    if target_recall is not None:
        targets[f"threshold_for_recall_{target_recall:g}"] = threshold_for_recall(log_px[y], target_recall)
    for name, value in targets.items():
        metrics[name] = {"threshold": value, **rates_at(log_px, y, value)}
    if as_json:
        click.echo(json.dumps(metrics, indent=2))
        return
    precision = metrics["precision_at_threshold"]
    click.echo(f"rows {metrics['rows']}, anomalies {metrics['anomalies']}")
    click.echo(f"AUROC {metrics['auroc']:.4f}   average precision {metrics['average_precision']:.4f}")
    click.echo(
        f"at the threshold {det.offset_:.3f} nats: {metrics['flagged']} flagged, "
        f"precision {'n/a' if precision is None else f'{precision:.3f}'}, recall {metrics['recall_at_threshold']:.3f}"
    )
    for name in targets:
        at = metrics[name]
        goal = name.removeprefix("threshold_for_").replace("_", " ")
        shown = "n/a" if at["precision"] is None else f"{at['precision']:.3f}"
        click.echo(
            f"for {goal}: threshold {at['threshold']:.3f} nats: {at['flagged']} flagged, precision {shown}, "
            f"recall {at['recall']:.3f}, false-positive rate {at['fpr']:.4f}"
        )


def threshold_for_fpr(normal_scores: Any, fpr: float) -> float:
    """The threshold that flags a share ``fpr`` of the normal rows: their 100·fpr percentile (set_threshold's rule)."""
    import numpy as np

    return float(np.percentile(normal_scores, 100.0 * fpr))


def threshold_for_recall(anomaly_scores: Any, recall: float) -> float:
    """The lowest threshold (fewest rows flagged) under which at least a share ``recall`` of the anomalies scores:
    just above the ⌈recall·n⌉-th lowest anomaly score, as a row is flagged when its score is below the threshold."""
    import math

    import numpy as np

    ordered = np.sort(np.asarray(anomaly_scores, dtype=np.float64))
    k = max(1, math.ceil(recall * len(ordered) - 1e-9))
    return float(np.nextafter(ordered[k - 1], np.inf))


def rates_at(log_px: Any, y: Any, threshold: float) -> dict[str, Any]:
    """Flagged rows, precision (None when none is flagged), recall and false-positive rate at ``threshold``."""
    flagged = is_outlier(decision(log_px, threshold))
    return {
        "flagged": int(flagged.sum()),
        "precision": float(y[flagged].mean()) if flagged.any() else None,
        "recall": float(flagged[y].mean()),
        "fpr": float(flagged[~y].mean()),
    }


@cli.command(name="report")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("data")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The HTML file to write.")
@click.option(
    "--max-rows",
    type=click.IntRange(1),
    default=50_000,
    show_default=True,
    help="Report on a uniform random sample of this many rows when the file holds more.",
)
@click.option("--id-column", help="Name the rows by this column (default: their row numbers).")
@click.option(
    "--label-column", help="The ground truth (non-zero / true = anomaly): adds ROC and PR curves, AUROC, the confusion."
)
@click.option("--device", default="auto", show_default=True)
@_jobs_option
@user_errors
def report_command(
    model: str,
    data: str,
    output: str,
    max_rows: int,
    id_column: str | None,
    label_column: str | None,
    device: str,
    jobs: int | None,
) -> None:
    """Write a self-contained HTML report of MODEL on DATA (needs the [plot] extra).

    The page holds the histogram of log-likelihoods with the threshold, the most
    anomalous rows with their top contributing columns, a 2-D map of the latent means,
    the training curves, and samples for image models; images are embedded.

    \b
    Examples:
      vaeguard report model.h5 test.csv -o report.html
      vaeguard report model.h5 test.csv -o report.html --id-column id --label-column is_anomaly
    """
    from pathlib import Path

    import numpy as np

    from vaeguard.batch import check_columns
    from vaeguard.data import Source, read_all
    from vaeguard.report import build_report

    det = _load_model(model, device, jobs)
    source = Source.parse(data)
    frame, total = read_all(source, max_rows=max_rows)
    labels = None
    if hasattr(frame, "columns"):
        check_columns(det, [str(c) for c in frame.columns], str(source))
        _check_named(frame, [c for c in (id_column, label_column) if c], source)
        if label_column:
            label = frame[label_column]
            if label.isna().any():
                raise UserError(f"{source}: row {int(np.flatnonzero(label.isna())[0])} has no label")
            labels = label.astype(bool).to_numpy() if label.dtype == bool else label.to_numpy() != 0
    elif id_column or label_column:
        raise click.UsageError("--id-column and --label-column are for tables; this file holds images")
    page = build_report(det, frame, title=f"vaeguard report: {Path(model).name} on {source.path.name}",
                        rows_in_file=total, id_column=id_column, labels=labels)  # fmt: skip
    atomic_write(output, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    click.echo(f"wrote {output} ({len(page) / 1e6:.1f} MB)", err=True)


@cli.command(name="compress")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("data")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The compressed file (.vgz).")
@click.option("--codec", default="bitsback", show_default=True, help="A registered codec (vaeguard plugins).")
@click.option("--param", "params", multiple=True, metavar="KEY=VALUE", help="A codec setting (repeatable).")
@click.option("--columns", help="Comma-separated columns of a table (default: the model's).")
@click.option("--progress/--no-progress", default=None, help="Samples/s and ETA on stderr (default: on a terminal).")
@user_errors
def compress_command(
    model: str, data: str, output: str, codec: str, params: tuple[str, ...], columns: str | None, progress: bool | None
) -> None:
    """Compress DATA with MODEL's codec into one file; prints the size in bits per dimension.

    \b
    Examples:
      vaeguard compress digits.h5 held_out.npz:images -o held_out.vgz
      vaeguard compress table.h5 rows.csv -o rows.vgz --codec bitsback --param latent_bits=10
    """
    from pathlib import Path

    import numpy as np

    from vaeguard import storage
    from vaeguard.batch import feature_columns
    from vaeguard.compression import compress, read_header
    from vaeguard.data import Source, read_all

    det = _load_model(model, "cpu")
    frame, _ = read_all(Source.parse(data))
    if hasattr(frame, "columns"):
        names = [c.strip() for c in columns.split(",")] if columns else feature_columns(det)
        _check_named(frame, names, data)
        frame = frame[names]
        if getattr(det, "column_coder_", None) is None:
            frame = frame.to_numpy()  # a table of numbers: compressed and restored as an array
    with _progress(len(frame), _show(progress), unit="samples") as bar:
        blob = compress(det, frame, codec=codec, codec_params=_parse_param(params), progress=bar.update)
    storage.atomic_write(output, lambda tmp: Path(tmp).write_bytes(blob))
    header, _ = read_header(blob)
    dims = int(np.prod(header["shape"]))
    click.echo(f"wrote {output}: {len(blob):,} bytes, {8 * len(blob) / dims:.4f} bits/dim", err=True)


@cli.command(name="decompress")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.argument("compressed", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "-o",
    "--output",
    required=True,
    help="Where to write the data: .npz for arrays (key 'images' for images, as sample writes them; 'X' for a "
    "table's array), .csv/.parquet for tables.",
)
@click.option("--progress/--no-progress", default=None, help="Samples/s and ETA on stderr (default: on a terminal).")
@user_errors
def decompress_command(model: str, compressed: str, output: str, progress: bool | None) -> None:
    """Restore the data in COMPRESSED with the MODEL that compressed it.

    \b
    Example:
      vaeguard decompress digits.h5 held_out.vgz -o held_out.npz
    """
    from pathlib import Path

    import pandas as pd

    from vaeguard.compression import decompress, read_header
    from vaeguard.data import write_table

    det = _load_model(model, "cpu")
    data = Path(compressed).read_bytes()
    with _progress(read_header(data)[0]["n_samples"], _show(progress), unit="samples") as bar:
        restored = decompress(det, data, progress=bar.update)
    if isinstance(restored, pd.DataFrame):
        write_table(restored, output)
    elif output.endswith(".npz"):  # under the name sample gives images (and tables' arrays are X, as in ADBench)
        _write_npz(output, **{"images" if restored.ndim > 2 else "X": restored})
    elif restored.ndim == 2:
        write_table(pd.DataFrame(restored, columns=_columns_of(det)), output)
    else:
        raise click.UsageError("images are written to a .npz file")
    click.echo(f"wrote {output}: {len(restored)} samples", err=True)


@cli.command(name="sample")
@click.argument("model", type=click.Path(exists=True, dir_okay=False))
@click.option("-n", "--n-samples", type=click.IntRange(1), default=100, show_default=True)
@click.option("-o", "--output", required=True, help=".csv or .parquet for tables, .npz for images; - for stdout.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--source",
    type=click.Choice(["prior", "aggregate"]),
    default="prior",
    show_default=True,
    help="Codes from the prior N(0, I), or from the aggregate posterior (a mixture fitted to the training codes).",
)
@click.option(
    "--png",
    "png_prefix",
    default=None,
    metavar="PREFIX",
    help="Image models: also write PREFIX-samples.png, PREFIX-traversals.png and PREFIX-interpolation.png.",
)
@click.option(
    "--condition",
    "conditions",
    multiple=True,
    metavar="[NAME=]VALUE",
    help="Conditional models: the condition every sample is drawn under; NAME=VALUE once per condition column "
    "(VALUE alone for a model with one).",
)
@user_errors
def sample_command(
    model: str, n_samples: int, output: str, seed: int, source: str, png_prefix: str | None, conditions: tuple[str]
) -> None:
    """Draw new samples from MODEL, in the training data's units (images as .npz).

    \b
    Examples:
      vaeguard sample model.h5 -n 100 -o samples.csv
      vaeguard sample digits.h5 -n 64 -o samples.npz --source aggregate --png digits
      vaeguard sample digits-by-class.h5 -n 64 -o sevens.npz --condition 7
    """
    import numpy as np
    import pandas as pd

    from vaeguard.data import write_table

    det = _load_model(model, "cpu")
    condition = _parse_conditions(det, conditions)
    drawn = det.sample(n_samples, random_state=seed, source=source, condition=condition)
    images = isinstance(drawn, np.ndarray) and drawn.ndim > 2
    if png_prefix is not None and not images:
        raise click.UsageError("--png draws pictures of an image model's samples; this model is of a table")
    if images:
        if not output.endswith(".npz"):
            raise click.UsageError("an image model's samples go to a .npz file")
        _write_npz(output, images=drawn)
    else:
        frame = drawn if isinstance(drawn, pd.DataFrame) else pd.DataFrame(drawn, columns=_columns_of(det))
        if condition is not None:  # the rows say what they were drawn under
            for name in condition.columns:
                frame[name] = condition[name].iloc[0]
        if output == "-":
            frame.to_csv(sys.stdout, index=False)
            return
        write_table(frame, output)
    click.echo(f"wrote {n_samples} samples to {output}", err=True)
    if png_prefix is not None:
        from vaeguard.report import latent_pictures

        base = det.sample(
            2, random_state=seed + 1, source="aggregate" if source == "aggregate" else "prior", condition=condition
        )
        for name, (fig, _) in latent_pictures(det, base[0], base[1], seed=seed, condition=condition).items():
            path = f"{png_prefix}-{name}.png"
            atomic_write(path, lambda tmp, fig=fig: fig.savefig(tmp, format="png"))
            click.echo(f"wrote {path}", err=True)


def _parse_conditions(det: VAEAnomalyDetector, conditions: tuple[str, ...]) -> Any:
    """``--condition`` values as a one-row frame of the model's condition columns (None for other models)."""
    import pandas as pd

    encoder = getattr(det, "condition_encoder_", None)
    if encoder is None:
        if conditions:
            raise click.UsageError("--condition is for conditional models; this model was fitted without conditions")
        return None
    if not conditions:
        raise click.UsageError(
            f"this model is conditional on {', '.join(encoder.columns)}: give --condition "
            + ("VALUE" if len(encoder.columns) == 1 else "NAME=VALUE for each")
        )
    values = {}
    for item in conditions:
        name, sep, value = item.partition("=")
        if not sep and len(encoder.columns) == 1:
            name, value = encoder.columns[0], item
        if name not in encoder.columns:
            raise click.UsageError(f"--condition {item!r}: the model's condition columns are {encoder.columns}")
        values[name] = value
    missing = [c for c in encoder.columns if c not in values]
    if missing:
        raise click.UsageError(f"--condition lacks a value for {', '.join(missing)}")
    frame = pd.DataFrame({c: [values[c]] for c in encoder.columns})
    try:
        encoder.transform(frame, 1)
    except ValueError as exc:
        raise click.UsageError(f"--condition: {exc}") from exc
    return frame


def _columns_of(det: VAEAnomalyDetector) -> list[str]:
    from vaeguard.batch import feature_columns

    return feature_columns(det) or []


@cli.command(name="datasets")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object name → description.")
def datasets_command(as_json: bool) -> None:
    """List the data sets that ship with vaeguard (load them with vaeguard.datasets.load_dataset).

    \b
    Example:
      vaeguard datasets --json
    """
    from vaeguard.datasets import list_datasets

    found = list_datasets()
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    width = max(map(len, found))
    for name, description in found.items():
        click.echo(f"{name.ljust(width)}  {description}")


@cli.command(name="plugins")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def plugins_command(as_json: bool) -> None:
    """List plugins: where each came from and the parts it registers.

    \b
    Example:
      vaeguard plugins --json
    """
    try:
        infos = PluginRegistry(get_plugin_manager()).plugins()
    except PluginError as exc:
        raise UserError(str(exc)) from exc
    if as_json:
        click.echo(json.dumps([info.as_dict() for info in infos], indent=2))
        return
    rows = [("plugin", "source", "version", "parts")]
    for info in infos:
        parts = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in info.parts.items() if names) or "-"
        rows.append((info.name, info.source, info.version or "-", parts))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)) + "  " + row[3])


@cli.command(name="demo")
@click.option("--dataset", default="thyroid", show_default=True, help="A shipped data set (see vaeguard.datasets).")
@click.option("--seed", default=0, show_default=True, help="Seed for the split and the model.")
@click.option("--top", default=10, show_default=True, help="How many of the most anomalous rows to print.")
def demo_command(dataset: str, seed: int, top: int) -> None:
    """Train on a shipped data set and show how well the log-likelihood finds its anomalies.

    Splits the data 70/30 (stratified), fits a VAEAnomalyDetector on the training part
    without its labels, scores the test part and prints AUROC, average precision and the
    most anomalous test rows with their log-likelihoods.
    """
    import time

    import numpy as np
    from sklearn.metrics import average_precision_score, roc_auc_score
    from sklearn.model_selection import train_test_split

    from vaeguard import VAEAnomalyDetector
    from vaeguard.datasets import load_dataset

    try:
        X, y = load_dataset(dataset, return_X_y=True, as_frame=True)
        y = y.to_numpy()
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--dataset") from exc
    X_train, X_test, _, y_test = train_test_split(X, y, test_size=0.3, stratify=y, random_state=seed)
    click.echo(
        f"data set {dataset!r}: {len(X)} rows x {X.shape[1]} columns; training on {len(X_train)} unlabeled rows",
        err=True,
    )
    start = time.perf_counter()
    det = VAEAnomalyDetector(random_state=seed, verbose=True).fit(X_train)
    fit_s = time.perf_counter() - start
    scores = det.score_samples(X_test)  # a Series with X_test's index
    auroc = roc_auc_score(y_test, -scores)
    ap = average_precision_score(y_test, -scores)
    flagged = (det.predict(X_test) == -1).to_numpy()
    click.echo(
        f"\nfitted in {fit_s:.1f} s: latent_dim={det.latent_dim_}, epochs={len(det.history_.train_loss)} "
        f"(best {det.history_.best_epoch + 1})"
    )
    click.echo(f"test rows: {len(X_test)}, anomalies: {int(y_test.sum())}")
    click.echo(
        f"AUROC {auroc:.3f}   average precision {ap:.3f}   "
        f"flagged {int(flagged.sum())} rows at contamination={det.contamination} "
        f"(precision {y_test[flagged].mean() if flagged.any() else float('nan'):.2f})"
    )
    order = np.argsort(scores.to_numpy())[:top]
    table = X_test.iloc[order].copy()
    table.insert(0, "log_likelihood", scores.iloc[order].round(2))
    table.insert(1, "is_anomaly", y_test[order])
    click.echo(f"\nthe {top} most anomalous test rows (log p(x) in nats; lower = more anomalous):")
    click.echo(table.round(4).to_string())


def main() -> None:
    """Entry point that turns plugin failures into one-line errors."""
    try:
        cli(standalone_mode=True)
    except PluginError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    except BrokenPipeError:  # e.g. `vaeguard score ... -o - | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
