"""Agreement between annotators and win rates with intervals (pure functions of label lists).

A label's category is what it says about the two candidates, independent of which side was shown
on the left: 'a', 'b', 'tie' or 'both_bad'.
"""

from __future__ import annotations

import math
from collections import Counter


def cohen_kappa(first: list[str], second: list[str]) -> float:
    """Cohen's kappa of two annotators over the same items (Cohen, 1960): (p_o - p_e) / (1 - p_e), with
    p_o the observed agreement and p_e = sum_k p1(k) p2(k) the agreement expected by chance. 1.0 when
    both always use one and the same category (no disagreement possible), NaN for no items."""
    if len(first) != len(second):
        raise ValueError("cohen_kappa needs labels of the same items")
    n = len(first)
    if n == 0:
        return float("nan")
    observed = sum(x == y for x, y in zip(first, second)) / n
    c1, c2 = Counter(first), Counter(second)
    expected = sum(c1[k] * c2[k] for k in set(c1) | set(c2)) / (n * n)
    return 1.0 if expected == 1.0 else (observed - expected) / (1 - expected)


def krippendorff_alpha_nominal(units: list[list[str]]) -> float:
    """Krippendorff's alpha for nominal data with any number of annotators per item (Krippendorff, 2011,
    "Computing Krippendorff's Alpha-Reliability", sec. B): alpha = 1 - D_o / D_e from the coincidence
    matrix o_ck = sum_u (number of c-k pairs in unit u) / (m_u - 1); items with fewer than two labels
    are not pairable and are left out. NaN when nothing is pairable, 1.0 when only one category occurs."""
    pairable = [u for u in units if len(u) >= 2]
    coincidence: Counter = Counter()
    for unit in pairable:
        counts, m = Counter(unit), len(unit)
        for c in counts:
            for k in counts:
                pairs = counts[c] * (counts[k] - (1 if c == k else 0))
                coincidence[(c, k)] += pairs / (m - 1)
    n = sum(coincidence.values())
    if n == 0:
        return float("nan")
    marginal: Counter = Counter()
    for (c, _), v in coincidence.items():
        marginal[c] += v
    observed_disagreement = sum(v for (c, k), v in coincidence.items() if c != k)
    expected_disagreement = sum(marginal[c] * marginal[k] for c in marginal for k in marginal if c != k) / (n - 1)
    if expected_disagreement == 0:
        return 1.0
    return 1.0 - observed_disagreement / expected_disagreement


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (Wilson, 1927); a tie counted as half a success."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def majority(votes: list[str]) -> tuple[str, float]:
    """The most common category and the share of votes it got; 'no_majority' when the top categories tie
    (annotators split evenly: not the same as a majority calling the pair a tie)."""
    counts = Counter(votes).most_common()
    top, count = counts[0]
    if len(counts) > 1 and counts[1][1] == count:
        return "no_majority", count / len(votes)
    return top, count / len(votes)
