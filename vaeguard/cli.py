"""The ``vaeguard`` command group (click)."""

from __future__ import annotations

import json
import sys

import click

from vaeguard import __version__
from vaeguard.plugins import PluginError, PluginRegistry, get_plugin_manager, register_commands


class UserError(click.ClickException):
    """A one-line error a user can act on; exit code 2, no traceback."""

    exit_code = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vaeguard")
def cli() -> None:
    """vaeguard: variational autoencoders that score data by log-likelihood.

    \b
    Examples:
      vaeguard demo              train on the shipped thyroid data and show the anomalies
      vaeguard plugins --json    list plugins and the parts they register
    """


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


try:
    register_commands(cli)
except Exception as exc:  # a broken plugin must not take every command down
    click.echo(f"warning: plugin commands not loaded: {exc}", err=True)
