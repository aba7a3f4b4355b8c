"""`python -m sodm.report --experiment NAME`: from an MLflow experiment (a local store or a
tracking server), the paper's table of every certified run (certified accuracy at each radius,
ACR, images) as Markdown, their curves overlaid as PNG and beside them the distribution of their
certified lower bounds on p_A; the same numbers `sodm.analyze` gives for the runs' certify.tsv
files."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from sodm import cli, tracking
from sodm.metrics import Results, format_markdown, read_results
from sodm.plots import certified_accuracy_curve, p_a_distribution_curve

RESULTS_ARTIFACT = f"{tracking.CERTIFICATION_DIR}/certify.tsv"  # where a certified run keeps its rows
PROVENANCE_ARTIFACT = RESULTS_ARTIFACT + ".json"  # and what was certified (sigma among it)


def certified_runs(uri: str, experiment: str,
                   dst: Path) -> tuple[dict[str, Results], dict[str, float]]:
    """Every run of the experiment that holds a certification, by run name (oldest first), and
    the sigma each was certified at (from its provenance, where it has one)."""
    c = tracking.client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in c.search_experiments()]
        raise cli.UsageError(f"no experiment {experiment!r} at {uri} (there: {', '.join(names) or 'none'})")
    runs = c.search_runs([exp.experiment_id], max_results=10_000, order_by=["attributes.start_time ASC"])
    found, sigmas = {}, {}
    for run in runs:
        stored = {a.path for a in c.list_artifacts(run.info.run_id, tracking.CERTIFICATION_DIR)}
        if RESULTS_ARTIFACT not in stored:
            continue
        local = c.download_artifacts(run.info.run_id, RESULTS_ARTIFACT, str(dst / run.info.run_id))
        name = run.info.run_name or run.info.run_id
        name = name if name not in found else f"{name} ({run.info.run_id[:8]})"
        found[name] = read_results(local)
        if PROVENANCE_ARTIFACT in stored:
            provenance = c.download_artifacts(run.info.run_id, PROVENANCE_ARTIFACT,
                                              str(dst / run.info.run_id))
            sigmas[name] = float(json.loads(Path(provenance).read_text())["sigma"])
    return found, sigmas


def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="sodm.report", description=__doc__)
    p.add_argument("--experiment", required=True, help="the MLflow experiment (a search's: see its space file)")
    p.add_argument("--mlflow-uri", default=None,
                   help="tracking URI: a server (http://host:5000) or a store (default: "
                        "MLFLOW_TRACKING_URI, or ./mlflow.db)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for report.md and curves.png (default ./report-<experiment>)")
    args = p.parse_args(argv)
    uri = tracking.resolve_uri(args.mlflow_uri)
    out = args.out or Path(f"report-{args.experiment}")
    with tempfile.TemporaryDirectory(prefix="sodm-report-") as tmp:
        rows, sigmas = certified_runs(uri, args.experiment, Path(tmp))
    if not rows:
        raise cli.UsageError(f"experiment {args.experiment!r} has no certified run yet")
    table = format_markdown(rows)
    out.mkdir(parents=True, exist_ok=True)
    with_sigma = {name: res for name, res in rows.items() if name in sigmas}
    figures = "![curves](curves.png)" + (" ![p_A](p_a.png)" if with_sigma else "")
    (out / "report.md").write_text(f"# {args.experiment}\n\n{table}\n\n{figures}\n")
    certified_accuracy_curve(rows, out / "curves.png", title=args.experiment)
    if with_sigma:  # a run certified without provenance has no sigma to read p_A back with
        p_a_distribution_curve(with_sigma, sigmas, out / "p_a.png", title=args.experiment)
    print(table)
    print(f"\nreport: {out / 'report.md'}, curves: {out / 'curves.png'}"
          + (f", p_A: {out / 'p_a.png'}" if with_sigma else ""), file=sys.stderr)
    return 0


def console() -> None:
    sys.exit(cli.run(main, "sodm.report"))


if __name__ == "__main__":
    console()
