"""Pair A and B iterations and compare them with a BCa bootstrap CI of the mean difference (B - A)."""

from __future__ import annotations

import os

REPORT_COLUMNS = [
    "suite", "benchmark", "kind", "pairs", "mean_a_ns", "mean_b_ns", "mean_diff_ns", "mean_ratio",
    "ci_low_ns", "ci_high_ns", "rel_ci_width", "mannwhitney_p", "verdict",
]  # fmt: skip


def _overlap(a0: int, a1: int, b0: int, b1: int) -> int:
    return max(0, min(a1, b1) - max(a0, b0))


def pair_iterations(frame, min_overlap: float = 0.4):
    """Pairs (A row, B row) of one benchmark: duet iterations that overlap by >= ``min_overlap`` of
    both durations (each B used once, the largest overlap first), sequential ones by run and index.

    Returns a DataFrame with kind, runid, a_ns, b_ns, diff_ns (B - A), ratio (B / A)."""
    import pandas as pd

    out = []
    for (kind, runid), run in frame.groupby(["kind", "runid"], sort=True):
        a = run[run.pair == "A"].sort_values("iteration")
        b = run[run.pair == "B"].sort_values("iteration")
        if kind == "seq":
            for (_, ra), (_, rb) in zip(a.iterrows(), b.iterrows()):
                out.append((kind, runid, ra.iteration_time_ns, rb.iteration_time_ns))
            continue
        cands = []
        for ia, ra in a.iterrows():
            for ib, rb in b.iterrows():
                ov = _overlap(
                    ra.iteration_start_ns, ra.iteration_end_ns, rb.iteration_start_ns, rb.iteration_end_ns
                )
                if (
                    ov >= min_overlap * ra.iteration_time_ns
                    and ov >= min_overlap * rb.iteration_time_ns
                    and ov > 0
                ):
                    cands.append((ov, ia, ib))
        used_a, used_b = set(), set()
        for _ov, ia, ib in sorted(cands, reverse=True):
            if ia in used_a or ib in used_b:
                continue
            used_a.add(ia)
            used_b.add(ib)
            out.append((kind, runid, a.loc[ia].iteration_time_ns, b.loc[ib].iteration_time_ns))
    pairs = pd.DataFrame(out, columns=["kind", "runid", "a_ns", "b_ns"]).astype(
        {"a_ns": float, "b_ns": float}
    )
    pairs["diff_ns"] = pairs.b_ns - pairs.a_ns
    pairs["ratio"] = pairs.b_ns / pairs.a_ns
    return pairs


def _ci(diffs, seed: int, resamples: int):
    import numpy as np
    from scipy import stats

    if len(diffs) < 2:
        return float("nan"), float("nan")
    if np.allclose(diffs, diffs[0]):
        return float(diffs[0]), float(diffs[0])
    res = stats.bootstrap(
        (np.asarray(diffs),), np.mean, n_resamples=resamples, confidence_level=0.95, method="BCa",
        random_state=np.random.default_rng(seed),
    )  # fmt: skip
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def analyze(frame, min_overlap: float = 0.4, seed: int = 0, resamples: int = 9999):
    """One row per (suite, benchmark, duet|seq) of a :func:`process` frame::

    report = analyze(pd.read_csv("out.csv"))
    report[["benchmark", "kind", "ci_low_ns", "ci_high_ns", "verdict"]]

    ``verdict`` is "no change" when the 95% BCa CI of mean(B - A) contains 0, else
    "B slower by X%" / "B faster by X%" (the mean difference relative to mean A)."""
    import math

    import pandas as pd
    from scipy import stats

    rows = []
    for (suite, bench), part in frame.groupby(["suite", "benchmark"], sort=True):
        pairs = pair_iterations(part, min_overlap)
        for kind, pk in pairs.groupby("kind", sort=True):
            low, high = _ci(pk.diff_ns.to_numpy(), seed, resamples)
            mean_a, mean_b, mean_d = pk.a_ns.mean(), pk.b_ns.mean(), pk.diff_ns.mean()
            if math.isnan(low):
                verdict = "too few pairs"
            elif low <= 0 <= high:
                verdict = "no change"
            else:
                verdict = f"B {'slower' if mean_d > 0 else 'faster'} by {abs(mean_d) / mean_a * 100:.1f}%"
            try:
                p = float(stats.mannwhitneyu(pk.a_ns, pk.b_ns, alternative="two-sided").pvalue)
            except ValueError:
                p = float("nan")
            rows.append([suite, bench, kind, len(pk), mean_a, mean_b, mean_d, pk.ratio.mean(), low, high,
                         (high - low) / mean_a, p, verdict])  # fmt: skip
    return pd.DataFrame(rows, columns=REPORT_COLUMNS)


def plot(frame, report, output: str | os.PathLike, min_overlap: float = 0.4) -> None:
    """Histograms of A and B times per benchmark and run kind, the CI of the difference in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(report))
    fig, axes = plt.subplots(n, 1, figsize=(7, 3 * n), squeeze=False)
    for ax, (_, r) in zip(axes[:, 0], report.iterrows()):
        pairs = pair_iterations(
            frame[(frame.suite == r.suite) & (frame.benchmark == r.benchmark)], min_overlap
        )
        pk = pairs[pairs.kind == r.kind]
        ax.hist(pk.a_ns / 1e6, bins=20, alpha=0.5, label="A")
        ax.hist(pk.b_ns / 1e6, bins=20, alpha=0.5, label="B")
        ax.axvline(r.mean_a_ns / 1e6, color="C0")
        ax.axvspan((r.mean_a_ns + r.ci_low_ns) / 1e6, (r.mean_a_ns + r.ci_high_ns) / 1e6, color="C1", alpha=0.2,
                   label="mean A + 95% CI of B-A")  # fmt: skip
        ax.set_title(f"{r.suite}.{r.benchmark} ({r.kind}): {r.verdict}, CI [{r.ci_low_ns / 1e6:.3g}, "
                     f"{r.ci_high_ns / 1e6:.3g}] ms", fontsize=9)  # fmt: skip
        ax.set_xlabel("iteration time (ms)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output)
    plt.close(fig)
