"""Bar chart of the win rates in compare.py result lines, with 95% confidence intervals as error bars; or,
with --curves, the training curves of runs (halos/curves.py).

    python visualize.py results.jsonl -o winrates.png
    python visualize.py --curves RUN_DIR [RUN_DIR ...] -o training_curves.png

One bar per result line, labelled with the run, the two sample keys and the judge. Lines written by
the original HALOs compare.py (no `win_rate`) are read too: their win rate is wins / total, with a
Wilson interval.
"""
import os
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.backend_bases import FigureCanvasBase  # noqa: E402

from compare import RESULT_FIELDS, wilson_interval  # noqa: E402
from halos.curves import plot_training_curves  # noqa: E402
from halos.errors import ArgumentParser, DataError, MissingFileError, reported_as_one_line  # noqa: E402
from halos.jsonl import read_json_lines  # noqa: E402


@dataclass
class Bar:
    label: str
    win_rate: float
    interval: Tuple[float, float]


def load_results(path: str) -> List[dict]:
    """The result lines of a compare.py results file (JSON Lines); a bad line is named with its number."""
    if os.path.isdir(path):
        raise DataError(f"{path}: a directory, not a compare.py results file; --curves plots a run directory's "
                        f"training curves")
    try:
        results = read_json_lines(path, RESULT_FIELDS)
    except FileNotFoundError:
        raise MissingFileError(f"{path}: no such file") from None
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error})") from None
    except DataError as error:
        raise DataError(f"{error}: not a compare.py result line") from None
    for number, result in enumerate(results, 1):
        if not {'win_rate', 'total'} & set(result):
            raise DataError(f"{path}: result {number} has neither win_rate nor total: not a compare.py result line")
    return results


def bar_for(result: dict) -> Optional[Bar]:
    """The bar of one result line, or None when it judged nothing."""
    judge = os.path.basename(str(result['judge']).rstrip('/'))  # a judge served from a directory: its name
    label = f"{result.get('exp_name')}: {result['candidate']['name']} vs {result['baseline']['name']}\n(judge {judge})"
    if 'win_rate' in result:
        if result['win_rate'] is None:
            return None
        return Bar(label, result['win_rate'], tuple(result['win_rate_ci95']))
    if not result['total']:
        return None
    wins = result['candidate']['wins']
    return Bar(label, wins / result['total'], wilson_interval(wins, result['total']))


def plot_win_rates(bars: List[Bar], path: str) -> None:
    """Horizontal bars, one per line from top to bottom, so that long labels never overlap."""
    figure, axis = plt.subplots(figsize=(8, 1.2 + 0.8 * len(bars)))
    positions = range(len(bars))
    errors = [[bar.win_rate - bar.interval[0] for bar in bars], [bar.interval[1] - bar.win_rate for bar in bars]]
    axis.barh(positions, [bar.win_rate for bar in bars], xerr=errors, capsize=6, color='tab:blue', height=0.6)
    axis.axvline(0.5, color='grey', linestyle='--', linewidth=1)
    axis.set_yticks(list(positions), [bar.label for bar in bars], fontsize=8)
    axis.invert_yaxis()
    axis.set_xlim(0, 1)
    axis.set_xlabel('win rate (ties count 1/2), 95% CI')
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = ArgumentParser(prog='visualize.py', description='Plot the win rates of compare.py result lines.')
    parser.add_argument('results_file', help='JSONL file of compare.py result lines (with --curves: a run directory)')
    parser.add_argument('more_runs', nargs='*', help='with --curves: more run directories, one column each')
    parser.add_argument('--curves', action='store_true', help="plot the runs' training curves instead")
    parser.add_argument('--output', '-o', default=None, help='the image file to write (default winrates.png, training_curves.png; .pdf, .svg, ...)')
    args = parser.parse_args(argv)
    if args.output is not None:
        check_output(parser, args.output)
    if args.curves:
        return plot_curves([args.results_file, *args.more_runs], args.output or 'training_curves.png')
    if args.more_runs:
        parser.error('one results file (several run directories only with --curves)')
    args.output = args.output or 'winrates.png'
    with reported_as_one_line('visualize.py'):
        results = load_results(args.results_file)
        bars = [bar for bar in map(bar_for, results) if bar is not None]
        if not bars:
            raise DataError(f"{args.results_file}: no judged comparison to plot")
        plot_win_rates(bars, args.output)
    print(f"plotted {len(bars)} win rates ({len(results) - len(bars)} lines without judgments skipped) to {args.output}")
    return 0


def check_output(parser: ArgumentParser, path: str) -> None:
    """An image file name whose extension is a format matplotlib writes (it would add .png to a name without one)."""
    formats = FigureCanvasBase.get_supported_filetypes()
    extension = os.path.splitext(path)[1][1:].lower()
    if os.path.isdir(path) or extension not in formats:
        what = 'is a directory' if os.path.isdir(path) else 'has no extension of an image format'
        parser.error(f"argument --output/-o: {path} {what}; give a file name ending in one of "
                     f".{', .'.join(sorted(formats))}")


def plot_curves(run_dirs: List[str], output: str) -> int:
    with reported_as_one_line('visualize.py'):
        for run_dir in run_dirs:
            if not os.path.isdir(run_dir):
                what = 'a file: give the run directory that holds metrics.jsonl' if os.path.exists(run_dir) else \
                    'no such directory'
                raise MissingFileError(f"{run_dir}: {what}")
            if not os.path.isfile(os.path.join(run_dir, 'metrics.jsonl')):
                raise MissingFileError(f"{run_dir}: no metrics.jsonl (not a run directory)")
        names = [os.path.basename(os.path.normpath(run_dir)) for run_dir in run_dirs]
        plot_training_curves(dict(zip(names, run_dirs)), output)
    print(f"plotted the training curves of {len(run_dirs)} run(s) to {output}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
