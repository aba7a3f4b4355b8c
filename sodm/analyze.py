"""`python -m sodm.analyze results.tsv [more.tsv ...]`: the paper's table row and the curve PNG."""

from __future__ import annotations

import sys
from pathlib import Path

from sodm import cli
from sodm.metrics import format_markdown, format_table, read_results
from sodm.plots import certified_accuracy_curve


def labels(paths: list[Path]) -> list[str]:
    """Short names for the table and legend: the file names, or, when those repeat (every run's
    certify.tsv), the names of their folders."""
    for names in ([p.stem for p in paths], [p.resolve().parent.name for p in paths]):
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="sodm.analyze", description=__doc__)
    p.add_argument("results", nargs="+", type=Path, help="certification TSV files (sodm.certify --out)")
    p.add_argument("--plot", type=Path, default=None,
                   help="PNG of certified accuracy vs radius (default: beside the first TSV)")
    p.add_argument("--no-plot", action="store_true", help="print the table only")
    p.add_argument("--markdown", action="store_true", help="the table as Markdown")
    args = p.parse_args(argv)

    rows = {}
    for name, path in zip(labels(args.results), args.results):
        if not path.is_file():
            raise cli.UsageError(f"no such results file: {path}")
        try:
            rows[name] = read_results(path)
        except ValueError as e:
            raise cli.UsageError(str(e)) from None
    print(format_markdown(rows) if args.markdown else format_table(rows))
    if not args.no_plot:
        out = args.plot or args.results[0].with_suffix(".png")
        certified_accuracy_curve(rows, out)
        print(f"curve: {out}")
    return 0


def console() -> None:
    sys.exit(cli.run(main, "sodm.analyze"))


if __name__ == "__main__":
    console()
