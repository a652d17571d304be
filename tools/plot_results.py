"""Write the comparison plot and markdown table of some run folders, e.g. for committed benchmarks.

    python tools/plot_results.py runs/fp runs/w4a4 --out-dir tools/results --name fmnist_resnet20

writes tools/results/fmnist_resnet20.png and tools/results/fmnist_resnet20.md.
"""
import argparse
import sys
from pathlib import Path

# Run from a checkout without installing rsq: the package lives one folder up.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rsq.errors import RsqError  # noqa: E402
from rsq.plots import plot_runs  # noqa: E402
from rsq.report import compare_table, format_table, load_run, run_table  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="first one is the baseline")
    parser.add_argument("--out-dir", default=".", help="folder for NAME.png and NAME.md")
    parser.add_argument("--name", default="results", help="file name stem (default: results)")
    args = parser.parse_args(argv)
    try:
        out_dir = Path(args.out_dir)
        if not out_dir.is_dir():
            raise RsqError(f"output folder {str(out_dir)!r} does not exist")
        runs = [load_run(d) for d in args.run_dirs]
        png = plot_runs(runs, out_dir / f"{args.name}.png")
        table = run_table(runs[0]) if len(runs) == 1 else compare_table(runs)
        markdown = out_dir / f"{args.name}.md"
        text = f"![{args.name}]({png.name})\n\n{format_table(table)}"
        markdown.write_text(text, encoding="utf-8")
    except (RsqError, OSError) as exc:
        print(f"plot_results: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {png} and {markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
